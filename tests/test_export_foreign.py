"""Exporting models we did not train: each failure class of upstream models, reproduced by a
small module written here, either exports with parity or is refused with its reason."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
L = pytest.importorskip("lightning")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ptycho_export.export.foreign import (  # noqa: E402
    CheckpointError,
    InferenceAdapter,
    export_foreign,
    export_foreign_command,
    load_checkpoint,
    load_model,
    synthetic_inputs,
)
from ptycho_export.export.formats import UsageError  # noqa: E402
from ptycho_export.export.lint import ExportLintError  # noqa: E402
from ptycho_export.export.pipeline import ExportOptions  # noqa: E402
from runtime.manifest import load_artifact  # noqa: E402

N = 16
SHAPE = (1, N, N)
AMP_TOL = 1e-5


def _marked_line(cls: type, method: str = "forward") -> int:
    lines, start = inspect.getsourcelines(getattr(cls, method))
    return start + next(i for i, line in enumerate(lines) if "# <- here" in line)


class TinyHeads(nn.Module):
    """conv -> amplitude (sigmoid) and phase (pi tanh) heads, shared by the small modules."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.channels = channels

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return torch.sigmoid(y[:, :self.channels]), torch.pi * torch.tanh(y[:, self.channels:])


# ---------------------------------------------------------------- the failure classes
class ComplexExp(TinyHeads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp, phase = self.heads(x)
        return torch.exp(torch.complex(torch.log(amp), phase))  # <- here


class ComplexScalar(TinyHeads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp, phase = self.heads(x)
        return amp * torch.cos(phase) + 1j * (amp * torch.sin(phase))  # <- here


class ComplexPad(TinyHeads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp, phase = self.heads(x)
        inner = torch.polar(amp, phase)[..., 2:-2, 2:-2]
        return F.pad(inner, (2, 2, 2, 2))  # <- here


class ProbeFarField(TinyHeads):
    """The upstream combination times a complex64 probe buffer, then fft2 (kept by torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("probe", torch.polar(torch.rand(N, N), torch.rand(N, N)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp, phase = self.heads(x)
        exit_wave = amp * torch.exp(1j * phase) * self.probe  # <- here
        return torch.fft.fft2(exit_wave, norm="ortho")


class UntranslatableComplex(TinyHeads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp, phase = self.heads(x)
        return torch.sqrt(torch.polar(amp, phase))  # <- here


class TensorBranch(TinyHeads):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amp, phase = self.heads(x)
        if amp.mean() > 0.5:  # <- here
            phase = -phase
        return amp, phase


class ShapeAsNumber(TinyHeads):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amp, phase = self.heads(x)
        return amp * (1.0 / float(x.shape[-1])), phase  # <- here


class ValueAsNumber(TinyHeads):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amp, phase = self.heads(x)
        return amp * x.mean().item(), phase  # <- here


class Float64Buffer(TinyHeads):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.full((1,), 0.25, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amp, phase = self.heads(x)
        return amp + self.offset.to(amp.dtype), phase


class NeedsTrainer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return torch.sigmoid(y[:, :1]), torch.pi * torch.tanh(y[:, 1:])

    def predict_patch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.trainer.datamodule.scale  # <- here
        return self(x * scale)

    def predict_logged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(x)
        self.log("mean_amp", out[0].mean())  # <- here
        return out


# ---------------------------------------------------------------- PtychoPINN-style
@dataclasses.dataclass
class PinnConfig:
    n_filters: int = 4


class PinnGenerator(nn.Module):
    """Encoder (conv-conv-ReLU, max-pool) and two decoders (nearest up-sampling) like the
    upstream CNN, with a sigmoid amplitude head and a pi*tanh phase head."""

    def __init__(self, channels: int, n_filters: int) -> None:
        super().__init__()
        f = n_filters
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, f, 3, padding=1), nn.ReLU(), nn.Conv2d(f, f, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(f, 2 * f, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        def decoder() -> nn.Sequential:
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                 nn.Conv2d(2 * f, f, 3, padding=1), nn.ReLU(),
                                 nn.Upsample(scale_factor=2, mode="nearest"),
                                 nn.Conv2d(f, channels, 3, padding=1))
        self.amp_decoder = decoder()
        self.phase_decoder = decoder()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return torch.sigmoid(self.amp_decoder(code)), torch.pi * torch.tanh(
            self.phase_decoder(code))


class PinnStyle(L.LightningModule):
    """Mimics PtychoPINN_Lightning's inference path: forward_predict(x, positions, probe,
    input_scale_factor) scales the input by a float64 factor, runs the generator and returns
    `amp.to(complex64) * torch.exp(1j * phi.to(complex64))`; probe and positions are
    accepted but unused at inference, as upstream."""

    def __init__(self, channels: int = 1, n_filters: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(7)
        self.generator = PinnGenerator(channels, n_filters)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator(x)

    def forward_predict(self, x: torch.Tensor, positions: torch.Tensor, probe: torch.Tensor,
                        input_scale_factor: torch.Tensor) -> torch.Tensor:
        x = x * input_scale_factor
        amp, phi = self.generator(x)
        return amp.to(torch.complex64) * torch.exp(1j * phi.to(torch.complex64))

    def training_step(self, batch, index):  # noqa: ANN001, ANN201
        amp, _ = self.generator(batch[0])
        loss = amp.mean()
        self.log("loss", loss)  # fine in training; refused in the predict path
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _pinn_constants(channels: int = 1) -> dict[str, object]:
    yy, xx = np.mgrid[0:N, 0:N] - N / 2
    probe = np.exp(-(yy**2 + xx**2) / 20.0) * np.exp(0.1j * (yy**2 + xx**2))
    return {"positions": np.zeros((channels, 2), dtype=np.float64),
            "probe": torch.from_numpy(probe.astype(np.complex64)),
            "input_scale_factor": torch.tensor(math.sqrt((N / 2) ** 2 / 0.37),
                                               dtype=torch.float64)}


def _pinn_adapter(channels: int = 1) -> InferenceAdapter:
    return InferenceAdapter(input_shape=(channels, N, N), method="forward_predict",
                            constants=_pinn_constants(channels), output="complex")


def _worst(result, output: str = "amplitude") -> float:  # noqa: ANN001
    gated = [r for r in result.rows if r.gated]
    key = "rel_max" if output == "amplitude" else "weighted_max"
    return max(getattr(r.stats[output], key) or 0.0 for r in gated)


def _export(module: nn.Module, tmp_path: Path, adapter: InferenceAdapter | None = None,
            formats: tuple[str, ...] = ("onnx",)):  # noqa: ANN202
    adapter = adapter or InferenceAdapter(input_shape=SHAPE)
    return export_foreign(module, adapter, tmp_path / "out", ExportOptions(formats=list(formats)))


def _refusal(module: nn.Module, tmp_path: Path, adapter: InferenceAdapter | None = None,
             error: type[Exception] = ExportLintError) -> str:
    with pytest.raises(error) as caught:
        _export(module, tmp_path, adapter)
    assert not (tmp_path / "out").exists()
    return str(caught.value)


# ---------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def pinn_export(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    outdir = tmp_path_factory.mktemp("pinn") / "artifact"
    module = PinnStyle().eval()
    result = export_foreign(module, _pinn_adapter(), outdir,
                            ExportOptions(formats=["onnx", "torchscript"]))
    return module, result


def test_ptychopinn_style_module_exports_with_parity(pinn_export) -> None:  # noqa: ANN001
    module, result = pinn_export
    gated = [r for r in result.rows if r.gated]
    assert {r.candidate for r in gated} == {"onnxruntime cpu", "torchscript cpu"}
    assert _worst(result) <= AMP_TOL
    assert _worst(result, "phase") <= 1e-4
    manifest = result.manifest
    notes = "\n".join(manifest["notes"])
    # float64 constants are cast with a recorded note; the complex ops were rewritten
    assert "constant 'input_scale_factor' () was float64: cast to float32" in notes
    assert "constant 'positions' (1, 2) was float64" in notes
    assert "LightningModule" in notes
    rewrites = "\n".join(manifest["complex_rewrites"])
    # 1j * phi.to(complex64) is complex x complex scalar, which torch translates itself
    assert "aten.exp.default" in rewrites
    assert f"{__file__}:" in rewrites  # names the user's line
    assert manifest["source"]["class"].endswith("PinnStyle")
    assert manifest["adapter"]["method"] == "forward_predict"
    # independent check: onnxruntime on a fresh batch size vs the eager upstream formula
    x = synthetic_inputs(SHAPE, count=3, seed=5)
    session = ort.InferenceSession(str(result.outdir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    amp, phase = session.run(["amplitude", "phase"], {"diffraction": x})
    consts = _pinn_constants()
    with torch.no_grad():
        z = module.forward_predict(torch.from_numpy(x), torch.from_numpy(consts["positions"]),
                                   consts["probe"], consts["input_scale_factor"].float())
    ref = z.abs().numpy()
    assert np.abs(amp - ref).max() / np.abs(ref).max() <= AMP_TOL
    weighted = np.abs(np.angle(np.exp(1j * (phase - z.angle().numpy())))) * ref / ref.max()
    assert weighted.max() <= 1e-4
    # the runtime reads the folder like one of ours
    spec = load_artifact(result.outdir, check_golden=True)
    assert spec.input_shape == ("batch", 1, N, N) and spec.gridsize == 1


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # inside Lightning's fit
def test_lightning_checkpoint_through_cli_function(tmp_path: Path) -> None:
    # A checkpoint written by a real Trainer (state_dict, hyper_parameters, loops, optimizer
    # states): torch.load(weights_only=True) reads it; the class is rebuilt from its
    # hyper_parameters and exported with the float64 constants from an npz.
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trained = PinnStyle(n_filters=2)
    data = torch.utils.data.TensorDataset(torch.from_numpy(synthetic_inputs(SHAPE)))
    trainer.fit(trained, torch.utils.data.DataLoader(data, batch_size=2))
    ckpt = tmp_path / "pinn.ckpt"
    trainer.save_checkpoint(ckpt)
    np.savez(tmp_path / "constants.npz", positions=np.zeros((1, 2)),
             input_scale_factor=np.float64(13.0))
    result = export_foreign_command(
        f"{__name__}:PinnStyle", tmp_path / "out", checkpoint=ckpt, method="forward_predict",
        input_shape="1,16,16", constants=tmp_path / "constants.npz", constant=["probe=None"],
        formats="onnx,pt2", batch=2, command="ptycho-export --model-class ...")
    assert _worst(result) <= AMP_TOL
    source = result.manifest["source"]
    assert source["checkpoint"]["file"] == "pinn.ckpt"
    assert source["checkpoint"]["loader"] == "torch.load(weights_only=True)"
    assert len(source["checkpoint"]["sha256"]) == 64
    assert source["hyper_parameters"] == ["channels", "n_filters"]
    assert result.manifest["model"]["parameters"] == sum(p.numel() for p in trained.parameters())
    assert result.manifest["inputs"][0]["shape"] == [2, 1, N, N]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == source
    loaded, _ = load_model(PinnStyle, ckpt)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize(("cls", "op"), [(ComplexExp, "aten.exp.default"),
                                         (ComplexScalar, "aten.mul"),
                                         (ComplexPad, "aten.pad.default"),
                                         (ProbeFarField, "aten.exp.default")])
def test_complex_ops_are_rewritten_and_parity_checked(cls: type, op: str, tmp_path: Path
                                                      ) -> None:
    result = _export(cls().eval(), tmp_path)
    assert _worst(result) <= AMP_TOL
    rewrites = result.manifest["complex_rewrites"]
    assert any(op in r and f"{__file__}:{_marked_line(cls)}" in r for r in rewrites), rewrites


def test_untranslatable_complex_op_is_refused_with_its_line(tmp_path: Path) -> None:
    message = _refusal(UntranslatableComplex().eval(), tmp_path)
    assert "no translation of aten.sqrt.default for complex-valued input" in message
    assert f"{__file__}:{_marked_line(UntranslatableComplex)}" in message
    assert "torchscript/pt2" in message


def test_trainer_access_is_refused_naming_the_method(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, method="predict_patch", output="amp_phase")
    message = _refusal(NeedsTrainer().eval(), tmp_path, adapter)
    assert message.startswith("NeedsTrainer.predict_patch uses self.trainer")
    assert "is not attached to a `Trainer`" in message
    assert f"{__file__}:{_marked_line(NeedsTrainer, 'predict_patch')}" in message
    assert "method='forward'" in message


def test_self_log_in_the_predict_path_is_refused(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, method="predict_logged", output="amp_phase")
    message = _refusal(NeedsTrainer().eval(), tmp_path, adapter)
    assert message.startswith("NeedsTrainer.predict_logged calls self.log() at ")
    assert f"{__file__}:{_marked_line(NeedsTrainer, 'predict_logged')}" in message


def test_lightning_forward_exports_without_a_trainer(tmp_path: Path) -> None:
    # torch.jit.trace alone fails on a LightningModule ("is not attached to a Trainer");
    # the exporter traces it detached.
    adapter = InferenceAdapter(input_shape=SHAPE, output="amp_phase")
    result = _export(NeedsTrainer().train(), tmp_path, adapter, ("torchscript",))
    assert _worst(result) <= AMP_TOL


def test_tensor_to_bool_branch_is_refused_with_its_line(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, output="amp_phase")
    message = _refusal(TensorBranch().eval(), tmp_path, adapter)
    assert message.startswith("torch.export refused the model")
    assert "branches on tensor values" in message
    assert f"{__file__}:{_marked_line(TensorBranch)}" in message


def test_shape_only_trace_warning_is_proven_and_recorded(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, output="amp_phase")
    result = _export(ShapeAsNumber().eval(), tmp_path, adapter, ("onnx", "torchscript"))
    lint = result.manifest["lint"]
    assert lint["refused_formats"] == {}
    (warning,) = lint["trace_warnings_accepted"]
    assert warning["where"] == f"{__file__}:{_marked_line(ShapeAsNumber)}"
    assert warning["accepted"].startswith("proven harmless")
    assert set(result.manifest["artifacts"]) == {"onnx", "torchscript"}


def test_unsafe_trace_refuses_torchscript_alone(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, output="amp_phase")
    # batch 1: x.mean() over the batch is then a per-sample value (no batch dependence)
    result = export_foreign(ValueAsNumber().eval(), adapter, tmp_path / "out", ExportOptions(
        formats=["onnx", "torchscript", "pt2"], batch=1))
    assert set(result.manifest["artifacts"]) == {"onnx", "pt2"}
    assert sorted(p.name for p in result.outdir.iterdir() if p.suffix in (".ts", ".onnx",
                                                                          ".pt2")) \
        == ["model.onnx", "model.pt2"]
    why = result.manifest["lint"]["refused_formats"]["torchscript"]
    assert why.startswith(f"tracing is unsafe at {__file__}:{_marked_line(ValueAsNumber)}")
    assert any(note.startswith("torchscript refused: ") for note in result.manifest["notes"])
    # asked for TorchScript alone, the same model is refused with the same line
    with pytest.raises(ExportLintError) as caught:
        export_foreign(ValueAsNumber().eval(), adapter, tmp_path / "ts", ExportOptions(
            formats=["torchscript"], batch=1))
    assert str(caught.value) == why


def test_float64_module_buffer_refused_then_cast_on_request(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, output="amp_phase")
    message = _refusal(Float64Buffer().eval(), tmp_path, adapter)
    assert "buffer 'offset' is torch.float64" in message and "cast_float64=True" in message
    adapter.cast_float64 = True
    result = _export(Float64Buffer().eval(), tmp_path, adapter)
    assert any("offset" in note for note in result.manifest["notes"])


def test_adapter_output_mismatch_is_refused(tmp_path: Path) -> None:
    adapter = InferenceAdapter(input_shape=SHAPE, output="complex")
    message = _refusal(NeedsTrainer().eval(), tmp_path, adapter)
    assert "output='complex' but NeedsTrainer.forward returned a tuple of 2" in message


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling it runs `_touch(sentinel)`: stands for any code in a checkpoint."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):  # noqa: ANN204
        return (_touch, (str(self.sentinel),))


def test_unsafe_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    sentinel = tmp_path / "code-ran"

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": Payload(sentinel)}}, ckpt)
    with pytest.raises(CheckpointError) as caught:
        load_model(PinnStyle, ckpt)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{ckpt}: cannot be loaded safely")
    assert "weights_only=True" in message and "no unsafe fallback" in message
    assert f"{__name__}._touch" in message  # names the global it refused
    assert not sentinel.exists()


def test_safe_global_allows_a_named_config_class(tmp_path: Path) -> None:
    ckpt = tmp_path / "config.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": PinnConfig(3)}}, ckpt)
    with pytest.raises(CheckpointError, match="PinnConfig"):
        load_checkpoint(ckpt)
    loaded = load_checkpoint(ckpt, safe_globals=[f"{__name__}:PinnConfig"])
    assert loaded["hyper_parameters"]["cfg"] == PinnConfig(3)


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no method 'predict'"):
        _export(ComplexExp().eval(), tmp_path, InferenceAdapter(SHAPE, method="predict"))
    with pytest.raises(UsageError, match="package.module:Name"):
        export_foreign_command("no_colon", tmp_path / "x", input_shape="16")
    with pytest.raises(UsageError, match="input shape"):
        _export(ComplexExp().eval(), tmp_path, InferenceAdapter((1, N, N + 1)))


def test_untranslatable_complex_op_refuses_onnx_alone(tmp_path: Path) -> None:
    result = _export(UntranslatableComplex().eval(), tmp_path, formats=("onnx", "torchscript"))
    assert set(result.manifest["artifacts"]) == {"torchscript"}
    why = result.manifest["lint"]["refused_formats"]["onnx"]
    assert "no translation of aten.sqrt.default" in why
    assert not (result.outdir / "model.onnx").exists()


# ---------------------------------------------------------------- per-sample input scale
@pytest.mark.parametrize(("rule", "numerator"), [("rms", N * N), ("rms-half", (N / 2) ** 2)])
def test_per_sample_scale_matches_a_float64_reference(rule: str, numerator: float) -> None:
    from ptycho_export.export.adapter import per_sample_scale

    x = synthetic_inputs((4, N, N), count=3, input_max=7.0)
    x[2] = 0.0  # an all-zero sample (beam off) gets 1, as upstream's fallback
    got = per_sample_scale(torch.from_numpy(x), rule, N).numpy()
    power = np.square(x.astype(np.float64)).sum(axis=(-2, -1)).mean(axis=1)
    want = np.where(power > 0, np.sqrt(numerator / np.where(power > 0, power, 1.0)), 1.0)
    assert got.shape == (3, 1, 1, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-6)


def test_input_scale_inside_the_graph_takes_any_level(tmp_path: Path) -> None:
    constants = {k: v for k, v in _pinn_constants(4).items() if k != "input_scale_factor"}
    adapter = InferenceAdapter(input_shape=(4, N, N), method="forward_predict",
                               constants=constants, output="complex",
                               input_scale={"input_scale_factor": "rms"})
    golden = synthetic_inputs((4, N, N), count=6, input_max=3.0, seed=2)
    result = export_foreign(PinnStyle(channels=4).eval(), adapter, tmp_path / "out",
                            ExportOptions(formats=["onnx", "torchscript"]), golden=golden)
    cases = {r.case for r in result.rows if r.gated}
    assert {"golden x0.001", "golden x1000"} <= cases
    assert _worst(result) <= AMP_TOL
    record = result.manifest["adapter"]["input_scale"]["input_scale_factor"]
    assert record["rule"] == "rms" and record["per_sample"].startswith("sqrt(N^2 /")
    assert "any level" in result.manifest["inputs"][0]["meaning"]
    # the artifact itself is level-invariant: raw counts or normalised, the same object
    session = ort.InferenceSession(str(result.outdir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    base = session.run(None, {"diffraction": golden})
    spread = np.ptp(base[0])
    assert spread > 1e-3  # the model responds to its input (not a constant output)
    for level in (1e-3, 1e3):
        scaled = session.run(None, {"diffraction": golden * np.float32(level)})
        np.testing.assert_allclose(scaled[0], base[0], atol=1e-5 * float(base[0].max()))
    # without the rule the same model is not level-invariant (the test can fail)
    fixed = InferenceAdapter(input_shape=(4, N, N), method="forward_predict",
                             constants=_pinn_constants(4), output="complex")
    model = PinnStyle(channels=4).eval()
    from ptycho_export.export.adapter import AdaptedModule

    wrapper = AdaptedModule(model, fixed)
    with torch.no_grad():
        low = wrapper(torch.from_numpy(golden))[0]
        high = wrapper(torch.from_numpy(golden * 1e3))[0]
    assert float((low - high).abs().max()) > 1e-2


def test_input_scale_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="choose a rule from rms, rms-half"):
        InferenceAdapter((1, N, N), input_scale={"s": "max"}).validate()
    with pytest.raises(UsageError, match="both a constant and computed from the input"):
        InferenceAdapter((1, N, N), constants={"s": 1.0}, input_scale={"s": "rms"}).validate()
    with pytest.raises(UsageError, match="give argument=rule"):
        export_foreign_command("tests.test_export_foreign:PinnStyle", tmp_path / "x",
                               input_shape="16", input_scale=["input_scale_factor"])


def test_missing_dependency_of_the_model_module_is_named(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_missing.py").write_text(
        "import torch\nimport package_nobody_installed.sub\n"
        "class Model(torch.nn.Module):\n    pass\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('config not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError) as caught:
        export_foreign_command("needs_missing:Model", tmp_path / "x", input_shape="16")
    message = str(caught.value)
    assert "needs the package 'package_nobody_installed'" in message
    assert "pip install package_nobody_installed" in message and "\n" not in message
    with pytest.raises(UsageError, match="no module named 'not_a_module_at_all'"):
        export_foreign_command("not_a_module_at_all:Model", tmp_path / "x", input_shape="16")
    with pytest.raises(UsageError) as caught:
        export_foreign_command("raises_on_import:Model", tmp_path / "x", input_shape="16")
    assert "importing it raised RuntimeError" in str(caught.value)
    assert "raises_on_import.py:1" in str(caught.value)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- run what was exported
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_foreign_export_is_run_and_parity_checked_on_a_scan(tmp_path: Path) -> None:
    from ptycho_export.data.simulate import SimulationConfig, simulate_scan
    from ptycho_export.parity_report import run_parity_check
    from runtime.run import run_scan
    from runtime.scan import save_scan

    model = PinnStyle(channels=4, n_filters=4)
    ckpt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), ckpt)
    scan_path = tmp_path / "scan.npz"
    save_scan(scan_path, simulate_scan(SimulationConfig(
        patch_size=N, grid_shape=(5, 5), step_px=3, probe_diameter_px=8, defocus=2)))
    with np.load(scan_path) as data:
        golden = np.stack([data["diffraction"][i:i + 4] for i in range(4)]).astype(np.float32)
    constants = {k: v for k, v in _pinn_constants(4).items() if k != "input_scale_factor"}
    np.savez(tmp_path / "constants.npz",
             **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in constants.items()})
    np.savez(tmp_path / "golden.npz", diffraction=golden)
    out = tmp_path / "art"
    result = export_foreign_command(
        f"{__name__}:PinnStyle", out, checkpoint=ckpt, method="forward_predict",
        init_args='{"channels": 4, "n_filters": 4}', input_shape="4,16,16",
        constants=tmp_path / "constants.npz", input_scale=["input_scale_factor=rms"],
        golden_inputs=tmp_path / "golden.npz", formats="all")
    assert set(result.manifest["artifacts"]) == {"onnx", "torchscript", "pt2"}
    assert result.manifest["source"]["init_args"] == {"channels": 4, "n_filters": 4}
    assert (out / "constants.npz").is_file() and "constants.npz" in result.manifest["files"]

    # ptycho-run stitches it (gridsize 2: groups of 4 neighbours) ...
    run_scan(out, scan_path, tmp_path / "run")
    with np.load(tmp_path / "run" / "object.npz") as obj:
        stitched, mask = obj["object"], obj["mask"]
    assert np.isfinite(stitched).all() and mask.sum() > 100
    assert np.ptp(np.abs(stitched[mask])) > 1e-3  # the model's response, not a constant

    # ... and ptycho-parity rebuilds the eager model from manifest + checkpoint
    report = run_parity_check(ckpt, out, scan_path, tmp_path / "parity", cuda=False)
    assert report["status"] == "PASS" and report["bundle"]["kind"] == "checkpoint"
    gated = [r for r in report["rows"] if r["gated"] and r["status"] == "PASS"]
    assert {r["runner"] for r in gated} >= {"onnxruntime cpu", "torchscript cpu", "pt2 cpu"}
    other = tmp_path / "other.pt"
    torch.save(PinnStyle(channels=4, n_filters=4).state_dict() | {
        "generator.encoder.0.bias": torch.zeros(4)}, other)
    with pytest.raises(CheckpointError, match="not from .*other.pt"):
        run_parity_check(other, out, scan_path, tmp_path / "parity2", cuda=False)


class UpstreamPatterns(PinnStyle):
    """Every pattern of upstream's predict path at once: a size check on two branches, a
    mask made on the input's device, exp(1j * phase), a per-sample input scale argument."""

    def forward_predict(self, x: torch.Tensor, positions: torch.Tensor, probe: torch.Tensor,
                        input_scale_factor: torch.Tensor) -> torch.Tensor:
        amp, phi = self.generator(x * input_scale_factor)
        if amp.shape[-2:] != phi.shape[-2:]:  # <- here
            raise ValueError("branch shapes differ")
        border = torch.ones(amp.shape[-2:], dtype=amp.dtype, device=amp.device)
        border[2:-2, 2:-2] = 0
        amp = amp * (1 - 0.5 * border)
        return amp.to(torch.complex64) * torch.exp(1j * phi.to(torch.complex64))


def test_all_upstream_patterns_export_every_format_with_parity(tmp_path: Path) -> None:
    constants = {k: v for k, v in _pinn_constants(4).items() if k != "input_scale_factor"}
    adapter = InferenceAdapter(input_shape=(4, N, N), method="forward_predict",
                               constants=constants, output="complex",
                               input_scale={"input_scale_factor": "rms-half"})
    golden = synthetic_inputs((4, N, N), count=6, input_max=40.0, seed=3)
    result = export_foreign(UpstreamPatterns(channels=4).eval(), adapter, tmp_path / "out",
                            ExportOptions(formats=["onnx", "torchscript", "pt2"]),
                            golden=golden)
    assert set(result.manifest["artifacts"]) == {"onnx", "torchscript", "pt2"}
    assert _worst(result) <= AMP_TOL and _worst(result, "phase") <= 1e-4
    lint = result.manifest["lint"]
    assert lint["refused_formats"] == {}
    (warning,) = lint["trace_warnings_accepted"]
    assert warning["where"] == (f"{__file__}:"
                                f"{_marked_line(UpstreamPatterns, 'forward_predict')}")
    (device,) = lint["devices_made_input_relative"]
    assert "follows the input" in device
    assert any("aten.exp.default" in r for r in result.manifest["complex_rewrites"])
    from ptycho_export.export.lint import baked_devices

    traced = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    assert baked_devices(traced) == []
