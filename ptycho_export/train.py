"""`ptycho-train`: one scan file in, one verified bundle out (plus a run folder).

The Trainer holds the engineering (devices, strategies, checkpoints, logging); the
LightningModule holds the science. Only rank 0 writes the bundle and reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ptycho_export.bundle import load_predictor, read_bundle, sha256_file, write_bundle
from ptycho_export.data.module import ScanDataModule
from ptycho_export.export.formats import UsageError
from ptycho_export.model.config import ModelConfig
from ptycho_export.model.lightning import PtychoModule
from ptycho_export.normalization import compute_normalization
from ptycho_export.reconstruct import quality_report, reconstruct_eager, stitch_with_probe
from ptycho_export.warm_start import apply_warm_start, load_warm_start
from runtime.atomic import written_atomic
from runtime.errors import DataError, EnvironmentProblem
from runtime.report_io import write_json
from runtime.scan import ScanData, load_scan

# Training time the tool plans for when no --epochs/--steps are given (object solve
# included): minutes on a laptop CPU. Quality still rises with time on 2 cores (about
# +0.1 amplitude SSIM per doubling past 4 minutes, bench/results/quality-*-time.md), so
# --max-minutes buys more.
DEFAULT_MAX_MINUTES = 4.0


@dataclass
class TrainOptions:
    # Length: epochs, else steps, else as many steps as fit in max_minutes (measured).
    epochs: int | None = None
    steps: int | None = None
    # With epochs/steps: a cap only; without: the budget (None = DEFAULT_MAX_MINUTES).
    max_minutes: float | None = None
    batch_size: int = 16
    learning_rate: float = 1e-3
    preset: str = "default"
    # Object-guided training (ptycho_export.object_solver): solve the scan's object first,
    # then train on the likelihood plus agreement with it.
    guide: bool = True
    guide_weight: float = 10.0
    solver_steps: int | None = None
    gridsize: int = 1
    loss: str = "poisson"
    val_fraction: float = 0.1
    seed: int = 0
    accelerator: str = "auto"
    devices: str | int = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    golden_count: int = 8
    pixel_size_m: float | None = None  # object pixel size, recorded for downstream tools
    progress: bool = True
    resume: bool = False
    # Warm start: the learned weights of an earlier bundle (ptycho_export.warm_start).
    init_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    bundle_path: Path
    run_dir: Path
    history: list[dict[str, float]]
    quality: dict[str, Any]
    seconds: float
    steps: int = 0  # optimizer steps taken
    plan_how: str = ""  # how the training length was chosen


class LossHistory(Callback):
    """Per-epoch train/val loss, kept in memory for the curve and the run report."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": float(trainer.current_epoch)}
        for key in HISTORY_KEYS:
            if key in metrics:
                row[key] = float(metrics[key])
        self.rows.append(row)


HISTORY_KEYS = ("train_loss", "val_loss", "train_likelihood", "val_likelihood")


LOSS_LABELS = {"poisson": "Poisson NLL (0 = perfect fit)", "mae": "amplitude MAE"}


def history_from_csv(log_dir: str | os.PathLike | None) -> list[dict[str, float]]:
    """Per-epoch losses from the CSVLogger file: the record that survives process-spawning
    strategies (ddp_spawn), where callbacks ran in the worker processes."""
    import csv

    path = Path(log_dir or "") / "metrics.csv"
    if not path.is_file():
        return []
    merged: dict[int, dict[str, float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            entry = merged.setdefault(int(float(row["epoch"])), {})
            for key in HISTORY_KEYS:
                if row.get(key):
                    entry[key] = float(row[key])
    return [{"epoch": float(epoch), **values} for epoch, values in sorted(merged.items())
            if values]


def save_loss_curve(path: Path, rows: list[dict[str, float]], loss: str = "poisson") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        if points:
            epochs, values = zip(*points, strict=True)
            ax.plot(np.asarray(epochs) + 1, values, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss: {LOSS_LABELS.get(loss, loss)}")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with written_atomic(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def golden_index(amplitudes: torch.Tensor, preferred: np.ndarray, count: int
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """The scan's extremes first (brightest and darkest total counts, the most structured
    pattern: largest spread of log intensity), then `preferred` (validation) samples: the
    parity gate and the runtime self-check then see the range the deployment meets, not
    only typical patterns. Returns (group indices, {reason: group index})."""
    values = amplitudes.float()
    total = values.square().sum(dim=(1, 2, 3))
    structure = torch.log1p(values.square()).flatten(1).std(dim=1)
    extremes = {"brightest": int(total.argmax()), "darkest": int(total.argmin()),
                "most_structured": int(structure.argmax())}
    chosen: list[int] = []
    for group in [*extremes.values(), *(int(i) for i in preferred)]:
        if group not in chosen:
            chosen.append(group)
    return np.asarray(chosen[:count], dtype=np.int64), extremes


def golden_samples(module: PtychoModule, datamodule: ScanDataModule, count: int
                   ) -> dict[str, np.ndarray]:
    """Real inputs (the scan's extremes, then validation samples) with the eager CPU
    float32 outputs: the parity reference."""
    preferred = datamodule.val_index if len(datamodule.val_index) else datamodule.train_index
    index, _ = golden_index(datamodule.amplitudes, preferred, count)
    inputs = datamodule.amplitudes[torch.from_numpy(index)].float()
    net = module.net.to("cpu", torch.float32).eval()
    with torch.inference_mode():
        amplitude, phase = net(inputs)
    return {"amplitudes": inputs.numpy(), "amplitude": amplitude.numpy(),
            "phase": phase.numpy(), "group_index": index.astype(np.int64),
            "offsets": datamodule.offsets[torch.from_numpy(index)].numpy()}


def consistency_reference(net: torch.nn.Module, datamodule: ScanDataModule, probe: np.ndarray,
                          normalization: Any, batch: int = 256) -> dict[str, Any] | None:
    """The data-consistency figures (runtime.consistency) of the trained model on its own
    training scan, through the same physics graph the export writes (at gridsize > 1 each
    group's anchor patch after the overlap step, as ptycho-run checks it): what "normal"
    looks like, stored with the bundle so ptycho-run can say when a scan is far outside
    it."""
    from ptycho_export.export.wrapper import physics_wrapper
    from runtime.consistency import ConsistencyAccumulator
    from runtime.physics_check import physics_feed

    physics = physics_wrapper("matmul", probe, normalization, datamodule.groups.shape[1])
    names = physics.input_names()
    net = net.to("cpu", torch.float32).eval()
    accumulator = ConsistencyAccumulator()
    with torch.inference_mode():
        for start in range(0, len(datamodule.amplitudes), batch):
            measured = datamodule.amplitudes[start:start + batch].float()
            amplitude, phase = net(measured)
            feed = physics_feed(names, amplitude.numpy(), phase.numpy(), probe,
                                datamodule.offsets[start:start + batch].numpy())
            predicted = physics(*(torch.from_numpy(feed[name]) for name in names))
            accumulator.add(measured[:, :1].numpy(), predicted.numpy())
    report = accumulator.report()
    return {"patterns": report["patterns"], "r_factor": report["r_factor"],
            "deviance_per_pixel": report["deviance_per_pixel"],
            "source": "the training scan, every pattern, eager float32"}


def fit_interrupted(trainer: L.Trainer, module: L.LightningModule, datamodule: Any,
                    ckpt_path: str | None) -> None:
    """``trainer.fit`` where Ctrl-C stays a KeyboardInterrupt.

    On Ctrl-C Lightning shuts down, sets SIGINT to "ignore" for good and calls
    ``sys.exit(1)``: the command would exit 1 (not the documented 130) and a second Ctrl-C
    would no longer work. Here the handler is restored and the interrupt re-raised; no
    bundle is written either way."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit as err:
        if trainer.interrupted:  # the interrupt itself (Ctrl-C, or SIGTERM as Terminated)
            cause = err.__context__
            raise (cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt()
                   ) from None
        raise
    finally:
        with contextlib.suppress(ValueError, TypeError):  # not the main thread / no handler
            if handler is not None:
                signal.signal(signal.SIGINT, handler)


class _DropAdverts(logging.Filter):
    """Lightning's rank-zero log carries a product tip (litlogger) on every Trainer; the
    device lines and real warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide two lines a user can do nothing about: the litlogger tip and torch 2.13's
    FutureWarning on ``LeafSpec``, which Lightning's own pytree helper triggers."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    advert = _DropAdverts()
    log.addFilter(advert)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                    category=FutureWarning)
            yield
    finally:
        log.removeFilter(advert)


def _device_problem(options: TrainOptions, err: Exception) -> EnvironmentProblem:
    """Lightning's refusal of the accelerator/devices asked for, as one line: asking for
    a GPU where torch sees none (a CPU build of torch, no driver) is the machine's
    problem, not a crash."""
    detail = " ".join(str(err).split())
    if isinstance(err, ModuleNotFoundError):  # an accelerator whose package is missing
        detail = detail.split(" HINT:")[0]
    hint = ("use --accelerator cpu (or auto), or install the CUDA build of torch that fits "
            "this machine's driver" if options.accelerator in ("gpu", "cuda")
            else "use --accelerator auto, cpu or gpu")
    return EnvironmentProblem(f"--accelerator {options.accelerator} --devices "
                              f"{options.devices}: Lightning cannot use them ({detail}); {hint}")


def training_device(options: TrainOptions) -> torch.device:
    """Where the Trainer will run, for timing a step there before it starts."""
    wants_gpu = options.accelerator in ("gpu", "cuda") or (
        options.accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def seconds_per_step(module: PtychoModule, datamodule: ScanDataModule, device: torch.device,
                     timed: int = 8) -> float:
    """One optimizer step of a throwaway copy of the module on real batches, the median of
    ``timed`` steps after two warm-up steps: the cost the step plan divides the budget by."""
    import copy

    # the guide is training data, not state: share it with the copy instead of doubling it
    shared = {id(t): t for t in (module.guide_re, module.guide_im) if t is not None}
    probe = copy.deepcopy(module, memo=shared).to(device).train()
    probe.net.to(memory_format=torch.channels_last)  # as PtychoModule.on_fit_start trains
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.0)  # lr 0: time, do not learn
    loader = datamodule.train_dataloader()
    batches = []
    for batch in loader:
        batches.append([t.to(device) for t in batch])
        if len(batches) == 2:
            break
    times = []
    for i in range(timed + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss, _ = probe.losses(batches[i % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - started)
    # the median: a step slowed by another process on a shared machine does not shrink
    # the whole plan (a mean of 6 once read 135 ms where the steps then ran at 105)
    return float(np.median(times))


# Lightning's own work per step (logging, callbacks, the loader) relative to the bare
# timed step. Measured on 2 cores (natural benchmark scan, default model, 1.5 min): the
# fit's steps ran at 0.92x and 1.01x the timed one in two runs, and 0.85x in a 5-minute
# run where a margin of 1.15 left 82 of 300 s unused
# (bench/results/quality-*-disc-probe-5min.md); without a margin one run overshot its
# 90 s by 6 s. So a small one.
LIGHTNING_OVERHEAD = 1.05
MIN_STEPS, MAX_STEPS = 200, 50_000


def plan_steps(budget_s: float, step_s: float) -> int:
    """Optimizer steps that fit in ``budget_s`` at ``step_s`` each, within sane bounds."""
    return int(np.clip(budget_s / (step_s * LIGHTNING_OVERHEAD), MIN_STEPS, MAX_STEPS))


def plan_training(options: TrainOptions, module: PtychoModule, datamodule: ScanDataModule,
                  spent_s: float) -> dict[str, Any]:
    """How long to train: the epochs or steps asked for, else the steps that fit in the
    time budget (minus ``spent_s`` already spent on the object solve) at the step time
    measured here. Lightning's ``max_time`` holds the budget either way."""
    import datetime

    cap = None if options.max_minutes is None else options.max_minutes * 60.0  # checked > 0
    if options.epochs is not None:
        plan = {"how": f"{options.epochs} epochs, as asked", "max_epochs": options.epochs,
                "max_steps": -1}
    elif options.steps is not None:
        plan = {"how": f"{options.steps} steps, as asked", "max_epochs": -1,
                "max_steps": options.steps}
    else:
        budget = (cap if cap is not None else DEFAULT_MAX_MINUTES * 60.0) - spent_s
        step_s = seconds_per_step(module, datamodule, training_device(options))
        steps = plan_steps(max(budget, 0.0), step_s)
        plan = {"how": f"{steps} steps: what fits in {budget:.0f} s at the measured "
                       f"{step_s * 1e3:.1f} ms per step", "max_epochs": -1, "max_steps": steps,
                "measured_step_s": step_s}
        cap = max(budget, 0.0) * 1.25 + 30.0  # the plan's estimate may be a little off
    plan["max_time"] = None if cap is None else datetime.timedelta(seconds=cap)
    return plan


def build_guide(scan: ScanData, datamodule: ScanDataModule, normalization: Any,
                options: TrainOptions) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """The solved object's patch for every group and channel, (G, C, N, N) complex64, a
    record of the solve, and the patch at every scan position (M, N, N). Solved from the
    training groups' anchor patterns only, so the validation patterns stay unseen by both
    the network and its guide."""
    from ptycho_export.object_solver import patches_at, solve_object

    started = time.perf_counter()
    anchors = datamodule.groups[datamodule.train_index, 0]
    scaled = scan.amplitudes[anchors] * np.float32(normalization.amplitude_scale)
    probe = scan.probe.astype(np.complex128) * normalization.probe_scale
    solved = solve_object(scaled, probe, scan.positions_px[anchors], options.solver_steps,
                          seed=options.seed)
    patches = patches_at(solved, scan.positions_px, scan.patch_size)
    record = {"steps": solved.steps, "final_likelihood": solved.final_loss,
              "patterns": int(len(anchors)), "canvas": list(solved.obj.shape),
              "seconds": time.perf_counter() - started}
    return patches[datamodule.groups], record, patches


def object_solve_figures(patches: np.ndarray, scan: ScanData) -> dict[str, Any] | None:
    """The solved object scored like the network (its patches stitched the same way), when
    the scan has a ground truth: the ceiling of a network trained to agree with it, so a
    report can say whether the network or the data limits the result."""
    if scan.object_truth is None:
        return None
    report = quality_report(stitch_with_probe(patches, scan), scan)
    if "model" not in report:
        return None
    keep = ("amplitude_ssim", "amplitude_psnr_db", "amplitude_corr", "phase_ssim",
            "phase_corr", "phase_rmse_rad", "frc_resolution_px")
    return {k: report["model"][k] for k in keep}


def poisson_floor(amplitudes: np.ndarray, amplitude_scale: float, seed: int = 0,
                  sample: int = 512) -> float | None:
    """The likelihood loss a perfect model would still have on this data: Poisson noise
    alone. Estimated by redrawing counts around the measured ones and scoring them with
    the training loss itself. None when the data are not photon counts (amplitude squared
    not whole numbers: pre-normalised data), where counting noise has no fixed scale."""
    from ptycho_export.physics import poisson_nll

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(amplitudes), size=min(sample, len(amplitudes)), replace=False)
    counts = np.square(np.asarray(amplitudes[np.sort(picks)], dtype=np.float64))
    if counts.max() < 1 or not np.allclose(counts, np.round(counts), atol=1e-3):
        return None
    rate = np.round(counts)
    redrawn = rng.poisson(rate).astype(np.float64)
    scale = float(amplitude_scale)
    predicted = torch.from_numpy(np.sqrt(rate) * scale)
    measured = torch.from_numpy(np.sqrt(redrawn) * scale)
    return float(poisson_nll(predicted, measured))


# A final likelihood this many times the noise floor means the model explains the data
# much worse than counting noise would allow.
PLATEAU_FACTOR = 3.0


def fit_report(rows: list[dict[str, float]], floor: float | None, loss: str
               ) -> dict[str, Any]:
    """Ground-truth-free figures: the final likelihood against the data's Poisson floor."""
    last = next((r for r in reversed(rows) if "train_likelihood" in r), None)
    report: dict[str, Any] = {"poisson_floor": floor, "warnings": []}
    if last is None or loss != "poisson":
        return report
    final = last["train_likelihood"]
    report["final_likelihood"] = final
    if floor:
        ratio = final / floor
        report["likelihood_over_floor"] = ratio
        if ratio > PLATEAU_FACTOR:
            report["warnings"].append(
                f"the training likelihood ended {ratio:.1f}x above the data's Poisson noise "
                f"floor: the model does not explain the data well; train longer "
                f"(--max-minutes), or check the probe and positions")
    return report


def train(
    data_path: str | os.PathLike, bundle_path: str | os.PathLike,
    run_dir: str | os.PathLike | None = None, options: TrainOptions | None = None,
    scan: ScanData | None = None,
) -> TrainResult:
    options = options or TrainOptions()
    started = time.perf_counter()
    scan = scan if scan is not None else load_scan(data_path)
    bundle_path = Path(bundle_path)
    run = Path(run_dir) if run_dir else bundle_path.with_name(bundle_path.stem + "_run")
    try:  # before anything is created: a scan that cannot be normalised leaves no run folder
        normalization = compute_normalization(scan.amplitudes, scan.probe)
    except ValueError as err:
        raise DataError(f"{scan.source or data_path}: {err} (beam off, or a dark-only "
                        "file?); train on a scan with measured diffraction") from err
    try:  # options the scan cannot take are refused before anything is written
        config = ModelConfig.from_preset(options.preset, scan.patch_size, options.gridsize)
        if options.max_minutes is not None and not options.max_minutes > 0:
            raise ValueError(f"--max-minutes must be > 0, got {options.max_minutes}")
        if options.init_from and options.resume:
            raise ValueError("--init and --resume both given: --resume continues this run "
                             "folder's own checkpoint, --init starts a new run from a bundle")
    except ValueError as err:
        raise UsageError(f"{scan.source or data_path}: {err}") from err
    warm = load_warm_start(options.init_from, config) if options.init_from else None
    new_run_folder = not run.exists()
    run.mkdir(parents=True, exist_ok=True)

    L.seed_everything(options.seed, workers=True, verbose=False)
    datamodule = ScanDataModule(scan, options.gridsize, options.batch_size,
                                options.val_fraction, options.seed)
    guide, guide_record, solved_patches = None, None, None
    if options.guide:
        guide, guide_record, solved_patches = build_guide(scan, datamodule, normalization,
                                                          options)
    module = PtychoModule(config, scan.probe, normalization, options.learning_rate,
                          options.loss, guide=guide,
                          guide_weight=options.guide_weight)
    if warm is not None:
        apply_warm_start(module.net, warm)
    plan = plan_training(options, module, datamodule,
                         guide_record["seconds"] if guide_record else 0.0)
    history = LossHistory()
    logger = CSVLogger(run, name="logs")
    _ = logger.version  # fix the version folder now, so spawned workers log where we read
    checkpoints = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)
    with _quiet_lightning():
        try:
            trainer = L.Trainer(
                max_epochs=plan["max_epochs"],
                max_steps=plan["max_steps"],
                max_time=plan["max_time"],
                accelerator=options.accelerator,
                devices=options.devices,
                strategy=options.strategy,
                num_nodes=options.num_nodes,
                default_root_dir=run,
                logger=logger,
                callbacks=[history, checkpoints],
                enable_progress_bar=options.progress,
                enable_model_summary=False,
                log_every_n_steps=1,
            )
        except (MisconfigurationException, ModuleNotFoundError) as err:
            if new_run_folder:  # nothing was trained: leave no empty run folder behind
                shutil.rmtree(run, ignore_errors=True)
            raise _device_problem(options, err) from err
        last = run / "checkpoints" / "last.ckpt"
        # Our own run folder's checkpoint (Lightning's format) is trusted for resuming only;
        # bundles never contain pickles.
        fit_interrupted(trainer, module, datamodule,
                        str(last) if options.resume and last.exists() else None)

    quality: dict[str, Any] = {}
    if trainer.is_global_zero:
        if not history.rows:
            history.rows = history_from_csv(logger.log_dir)
        golden = golden_samples(module, datamodule, options.golden_count)
        reference = consistency_reference(module.net, datamodule, scan.probe, normalization)
        write_bundle(
            bundle_path, config=config, normalization=normalization,
            state_dict=module.net.state_dict(), probe=scan.probe, golden=golden,
            training={k: v for k, v in asdict(options).items() if k != "extra"}
            | {"epochs_run": trainer.current_epoch, "steps_run": trainer.global_step,
               "plan": {k: (str(v) if k == "max_time" else v) for k, v in plan.items()},
               "guide": guide_record, "history": history.rows,
               "init_from": warm.record() if warm is not None else None,
               "consistency_reference": reference},
            data={"source": Path(scan.source).name if scan.source else "<memory>",
                  "sha256": sha256_file(data_path) if data_path else None,
                  "n_patterns": scan.n_patterns, "patch_size": scan.patch_size,
                  "pixel_size_m": options.pixel_size_m},
        )
        if history.rows:
            save_loss_curve(run / "loss_curve.png", history.rows, options.loss)
        predictor = load_predictor(read_bundle(bundle_path), "cpu")
        quality = quality_report(reconstruct_eager(predictor, scan), scan)
        if solved_patches is not None and quality.get("ground_truth"):
            quality["object_solve"] = object_solve_figures(solved_patches, scan)
        quality["fit"] = fit_report(history.rows, poisson_floor(
            scan.amplitudes, normalization.amplitude_scale, options.seed), options.loss)
        quality["warnings"] = quality.get("warnings", []) + quality["fit"].pop("warnings")
        write_json(run / "quality.json", quality)
        write_json(run / "history.json", history.rows)
    return TrainResult(bundle_path=bundle_path, run_dir=run, history=history.rows,
                       quality=quality, seconds=time.perf_counter() - started,
                       steps=int(trainer.global_step), plan_how=plan["how"])
