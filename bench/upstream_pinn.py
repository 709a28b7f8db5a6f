"""The whole chain on upstream PtychoPINN's own PyTorch model, from a checkout of it.

    PTYCHOPINN_SRC=/path/to/PtychoPINN python -m bench.upstream_pinn [-o DIR] [--steps 40]

Needs what upstream's modules import (torch, lightning, tensordict, mlflow, pandas; dill
for its bundle writer). Nothing of upstream is copied here: the script imports it.
For gridsize 1 and 2 it
1. writes a scan with this project's independent forward model (bench/forward_model.py:
   natural images, fractional positions, float64, N = 64),
2. builds `ptycho_torch.model:PtychoPINN_Lightning` and trains it a few steps with
   Lightning's Trainer on upstream's own `training_step` (per-sample scale factors from
   upstream's `helper.get_rms_scaling_factor`, normalize='Group'), then writes the
   checkpoint with `Trainer.save_checkpoint` and upstream's bundle with
   `model_manager.save_torch_bundle` (wts.h5.zip),
3. runs the user's commands: `ptycho-export --format all` from the checkpoint (no
   --init-args: its hyper_parameters rebuild the model) with the in-graph per-sample
   scale `--input-scale input_scale_factor=rms`, `ptycho-export` from the wts.h5.zip,
   `ptycho-run` and `ptycho-parity`,
4. records exit codes, the gate's worst numbers, accepted trace warnings, device rewrites,
   complex rewrites, reconstruction figures and timings in
   bench/results/upstream-pinn-<machine>.{json,md}.

CI does not run it (no network to fetch upstream there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from bench.forward_model import ScanSpec, simulate
from ptycho_export.bench.speed import cpu_facts, default_machine_name, library_versions

RESULTS = Path(__file__).resolve().parent / "results"
N = 64


def _upstream_path() -> Path:
    src = os.environ.get("PTYCHOPINN_SRC")
    if not src or not (Path(src) / "ptycho_torch" / "model.py").is_file():
        sys.exit("set PTYCHOPINN_SRC to a checkout of hoidn/PtychoPINN (it holds "
                 "ptycho_torch/model.py)")
    return Path(src).resolve()


def _init_args(gridsize: int) -> dict[str, Any]:
    c = gridsize * gridsize
    return {"model_config": {"C_model": c, "C_forward": c},
            "data_config": {"N": N, "C": c, "grid_size": [gridsize, gridsize],
                            "normalize": "Group"},
            "training_config": {"device": "cpu", "strategy": None},
            "inference_config": {}}


def _groups(scan: dict[str, np.ndarray], gridsize: int) -> tuple[np.ndarray, np.ndarray]:
    """(groups (G, C), offsets (G, C, 2) in px from the group centroid, x then y)."""
    from runtime.grouping import group_neighbours

    positions = np.stack([scan["ycoords"], scan["xcoords"]], axis=1)
    groups = group_neighbours(positions, gridsize)
    members = positions[groups]
    offsets = members - members.mean(axis=1, keepdims=True)
    return groups, offsets[..., ::-1].astype(np.float32)


def train_upstream(gridsize: int, scan: dict[str, np.ndarray], steps: int, work: Path
                   ) -> dict[str, Any]:
    """Upstream's model trained `steps` steps by Lightning on upstream's training_step."""
    import lightning as L
    import torch
    from ptycho_torch import helper as hh
    from ptycho_torch.config_params import DataConfig
    from ptycho_torch.model import PtychoPINN_Lightning

    init = _init_args(gridsize)
    model = PtychoPINN_Lightning(**init)
    groups, offsets = _groups(scan, gridsize)
    images = torch.from_numpy(scan["diffraction"][groups].astype(np.float32))  # (G, C, N, N)
    data_config = DataConfig(**init["data_config"])
    rms = hh.get_rms_scaling_factor(images, data_config).float()
    physics = hh.get_physics_scaling_factor(images, data_config).float()
    probe = torch.from_numpy(scan["probeGuess"].astype(np.complex64))
    c = gridsize * gridsize

    class Groups(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(groups)

        def __getitem__(self, i: int):  # noqa: ANN204 - upstream's (fields, probe, scale)
            fields = {"images": images[i], "coords_relative": torch.from_numpy(offsets[i])
                      .reshape(c, 1, 2), "experiment_id": torch.tensor(0),
                      "rms_scaling_constant": rms[i], "physics_scaling_constant": physics[i]}
            return fields, probe.reshape(1, 1, N, N).expand(c, 1, N, N), torch.ones(1, 1, 1)

    loader = torch.utils.data.DataLoader(Groups(), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    with torch.no_grad():
        before = model.forward_predict(images[:8], None, None, rms[:8]).abs()
    started = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        after = model.forward_predict(images[:8], None, None, rms[:8]).abs()
        other = model.forward_predict(images[8:16], None, None, rms[8:16]).abs()
    ckpt = work / f"upstream_gs{gridsize}.ckpt"
    trainer.save_checkpoint(ckpt)
    loss = trainer.callback_metrics
    facts = {"steps": int(trainer.global_step), "train_seconds": round(seconds, 1),
             "final_loss": {k: float(v) for k, v in loss.items()},
             "response": {  # a model that ignores its input makes parity meaningless
                 "output_change_from_training": float((after - before).abs().max()
                                                      / before.abs().max()),
                 "output_change_between_inputs": float((after - other).abs().max()
                                                       / after.abs().max())},
             "scale_factor_spread": float(rms.std() / rms.mean()),
             "checkpoint": str(ckpt)}
    try:
        facts["bundle"] = str(_save_bundle(model, gridsize, work))
    except ImportError as err:
        facts["bundle_error"] = f"{type(err).__name__}: {err}"
    constants = work / f"constants_gs{gridsize}.npz"
    np.savez(constants, positions=np.zeros((1, c, 1, 2), np.float32),
             probe=probe.numpy().reshape(1, 1, 1, N, N))
    golden = work / f"golden_gs{gridsize}.npz"
    np.savez(golden, diffraction=images[:16].numpy())
    facts.update({"constants": str(constants), "golden": str(golden)})
    return facts


def _save_bundle(model: Any, gridsize: int, work: Path) -> Path:
    """Upstream's wts.h5.zip via its own writer. Its `ptycho.params` imports TensorFlow
    only to hold a global dict; a stand-in dict is put in its place for this call."""
    import ptycho
    from ptycho.config.config import ModelConfig, TrainingConfig

    stand_in = types.ModuleType("ptycho.params")
    stand_in.cfg = {}
    sys.modules.setdefault("ptycho.params", stand_in)
    ptycho.params = sys.modules["ptycho.params"]
    from ptycho_torch.model_manager import save_torch_bundle

    base = work / f"wts_gs{gridsize}.h5"
    save_torch_bundle({"autoencoder": model, "diffraction_to_obj": model}, str(base),
                      TrainingConfig(model=ModelConfig(N=N, gridsize=gridsize)))
    return Path(f"{base}.zip")


def _cli(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in (done.stdout + done.stderr).splitlines()
             if ln.strip() and "No attention module" not in ln]
    return {"command": " ".join(args), "rc": done.returncode,
            "seconds": round(time.perf_counter() - started, 1), "tail": lines[-12:]}


def _gate(manifest: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in manifest["parity"]["rows"] if r["gated"]]
    amp = max(r["outputs"]["amplitude"]["rel_max"] for r in rows)
    phase = max(r["outputs"]["phase"]["weighted_max"] or 0.0 for r in rows)
    return {"checks": len(rows), "cases": sorted({r["case"] for r in rows}),
            "worst_amplitude_rel": amp, "worst_phase_weighted_rad": phase}


def run_chain(gridsize: int, facts: dict[str, Any], scan_path: Path, work: Path,
              env: dict[str, str]) -> dict[str, Any]:
    c = gridsize * gridsize
    art = work / f"art_gs{gridsize}"
    common = ["--model-class", "ptycho_torch.model:PtychoPINN_Lightning",
              "--method", "forward_predict", "--input-shape", f"{c},{N},{N}",
              "--constants", facts["constants"], "--input-scale", "input_scale_factor=rms",
              "--model-output", "complex", "--golden-inputs", facts["golden"]]
    out: dict[str, Any] = {"gridsize": gridsize, "training": facts}
    out["export"] = _cli(["ptycho-export", *common, "--checkpoint", facts["checkpoint"],
                          "--format", "all", "-o", str(art)], env)
    if out["export"]["rc"] == 0:
        manifest = json.loads((art / "manifest.json").read_text())
        out["artifacts"] = sorted(manifest["artifacts"])
        out["gate"] = _gate(manifest)
        out["lint"] = manifest["lint"]
        out["complex_rewrites"] = manifest.get("complex_rewrites", [])
        out["run"] = _cli(["ptycho-run", str(art), str(scan_path), "-o",
                           str(work / f"run_gs{gridsize}"), "--provider", "cpu"], env)
        report = work / f"run_gs{gridsize}" / "report.json"
        if report.is_file():
            out["reconstruction"] = json.loads(report.read_text()).get("quality")
        out["parity"] = _cli(["ptycho-parity", facts["checkpoint"], str(art), str(scan_path),
                              "-o", str(work / f"parity_gs{gridsize}")], env)
    if "bundle" in facts:
        bundle_art = work / f"art_bundle_gs{gridsize}"
        shape_free = [a for i, a in enumerate(common)
                      if a != "--input-shape" and common[i - 1] != "--input-shape"]
        # a bundle carries no constructor arguments (its params.dill is the legacy config);
        # the input shape comes from that config's N and gridsize
        out["export_bundle"] = _cli(["ptycho-export", *shape_free, "--checkpoint",
                                     facts["bundle"], "--init-args",
                                     json.dumps(_init_args(gridsize)), "--format", "onnx",
                                     "-o", str(bundle_art)], env)
        if out["export_bundle"]["rc"] == 0 and out["export"]["rc"] == 0:
            a = np.load(art / "golden.npz")
            b = np.load(bundle_art / "golden.npz")
            out["bundle_same_outputs"] = bool(all(np.array_equal(a[k], b[k])
                                                  for k in a.files))
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Upstream PtychoPINN through the chain: {results['machine']}", "",
             f"CPU: {results['cpu'].get('model', '?')}; upstream commit "
             f"{results['upstream_commit']}; command `{results['command']}`.", "",
             "| gridsize | train steps (s) | export rc | formats | gate worst amp / phase | "
             "trace warnings accepted | devices rewritten | ptycho-run rc | ptycho-parity rc "
             "| bundle export rc (same outputs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["cases"]:
        t = r["training"]
        gate = r.get("gate") or {}
        lint = r.get("lint") or {}
        accepted = lint.get("trace_warnings_accepted", [])
        lines.append(
            f"| {r['gridsize']} | {t['steps']} ({t['train_seconds']}) | {r['export']['rc']} | "
            f"{', '.join(r.get('artifacts', []))} | "
            f"{gate.get('worst_amplitude_rel', float('nan')):.1e} / "
            f"{gate.get('worst_phase_weighted_rad', float('nan')):.1e} rad | "
            f"{', '.join(w['where'].split('/')[-1] for w in accepted)}"
            f" | {len(lint.get('devices_made_input_relative', []))} | "
            f"{(r.get('run') or {}).get('rc')} | {(r.get('parity') or {}).get('rc')} | "
            f"{(r.get('export_bundle') or {}).get('rc')} ({r.get('bundle_same_outputs')}) |")
    lines += ["", "Model response (relative max change of |object|): after training vs "
              "before, and between two different input batches:", ""]
    for r in results["cases"]:
        resp = r["training"]["response"]
        lines.append(f"- gridsize {r['gridsize']}: {resp['output_change_from_training']:.2e}"
                     f" from training, {resp['output_change_between_inputs']:.2e} between "
                     f"inputs; per-sample scale factor spread (std/mean) "
                     f"{r['training']['scale_factor_spread']:.3f}")
    lines += ["", "Parity cases gated: " + ", ".join(
        (results["cases"][0].get("gate") or {}).get("cases", [])), ""]
    for r in results["cases"]:
        said = [ln for ln in (r.get("run") or {}).get("tail", []) if "vs objectGuess" in ln]
        if said:
            lines.append(f"- gridsize {r['gridsize']} ptycho-run: {said[0]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gridsizes", default="1,2")
    parser.add_argument("--work", type=Path, default=None,
                        help="Folder for the scan, checkpoints and artifacts (default: a "
                        "temporary folder, kept on failure)")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--upstream-commit", default=None,
                        help="Recorded in the results when PTYCHOPINN_SRC is not a git checkout")
    args = parser.parse_args(argv)
    src = _upstream_path()
    sys.path.insert(0, str(src))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="upstream_pinn_"))
    work.mkdir(parents=True, exist_ok=True)
    scan = simulate(ScanSpec(kind="natural", object_px=160, patch=N, step_px=8.0))
    scan_path = work / "scan.npz"
    np.savez(scan_path, **scan)
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    cpu = cpu_facts()
    results: dict[str, Any] = {
        "machine": args.machine or default_machine_name(cpu), "cpu": cpu,
        "versions": library_versions(),
        "upstream_commit": commit or args.upstream_commit or "unknown (not a git checkout)",
        "command": " ".join(["python -m bench.upstream_pinn", *(argv or sys.argv[1:])]),
        "scan": {"patterns": int(len(scan["diffraction"])), "patch": N,
                 "kind": "natural (bench/forward_model.py)"},
        "cases": []}
    for gridsize in (int(g) for g in args.gridsizes.split(",")):
        facts = train_upstream(gridsize, scan, args.steps, work)
        results["cases"].append(run_chain(gridsize, facts, scan_path, work, env))
        print(json.dumps({k: v for k, v in results["cases"][-1].items()
                          if k not in ("training",)}, default=str)[:2000])
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"upstream-pinn-{results['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.json, {stem}.md (work files in {work})")


if __name__ == "__main__":
    main()
