"""`ptycho-export --model-class ... --checkpoint ...` end to end through the CLI."""

import json
import textwrap

import torch
from typer.testing import CliRunner

from cli.export import app

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class UpstreamLike(nn.Module):
        """Research-code style: complex output built with exp(1j * phase)."""

        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            out = self.body(x)
            amp = torch.sigmoid(out[:, :1])
            phase = torch.pi * torch.tanh(out[:, 1:])
            return amp.to(torch.complex64) * torch.exp(1j * phase.to(torch.complex64))
''')


def test_foreign_model_exports_through_the_cli(tmp_path):
    (tmp_path / "upstream_model.py").write_text(MODEL_SOURCE)
    namespace: dict = {}
    exec(compile(MODEL_SOURCE, "upstream_model.py", "exec"), namespace)  # noqa: S102
    torch.manual_seed(0)
    torch.save(namespace["UpstreamLike"]().state_dict(), tmp_path / "weights.pt")
    result = CliRunner().invoke(app, [
        "--model-class", f"{tmp_path / 'upstream_model.py'}:UpstreamLike",
        "--checkpoint", str(tmp_path / "weights.pt"), "--input-shape", "1,16,16",
        "--format", "onnx,torchscript", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASS" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["parity"]["status"] == "PASS"
    assert set(manifest["artifacts"]) == {"onnx", "torchscript"}


def test_bundle_and_model_class_are_mutually_exclusive(tmp_path):
    neither = CliRunner().invoke(app, ["-o", str(tmp_path / "x")])
    assert neither.exit_code == 2
    assert "either a bundle or --model-class" in neither.stderr


VALUE_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class ReadsAValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            out = self.body(x) * x.mean().item()
            return torch.sigmoid(out[:, :1]), torch.pi * torch.tanh(out[:, 1:])
''')


def test_refused_torchscript_is_named_and_the_override_is_recorded(tmp_path):
    (tmp_path / "reads_value.py").write_text(VALUE_SOURCE)
    namespace: dict = {}
    exec(compile(VALUE_SOURCE, "reads_value.py", "exec"), namespace)  # noqa: S102
    torch.save(namespace["ReadsAValue"]().state_dict(), tmp_path / "weights.pt")
    base = ["--model-class", f"{tmp_path / 'reads_value.py'}:ReadsAValue",
            "--checkpoint", str(tmp_path / "weights.pt"), "--input-shape", "1,16,16",
            "--model-output", "amp_phase", "--format", "onnx,torchscript", "--batch", "1"]
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output + result.stderr
    warning = [ln for ln in result.output.splitlines()
               if ln.startswith("warning: torchscript not written: ")]
    assert len(warning) == 1
    assert "reads_value.py:12" in warning[0] and "--allow-trace-warning" in warning[0]
    assert sorted(p.name for p in (tmp_path / "out").glob("model.*")) == ["model.onnx"]
    # The override silences the lint, not the gate: the trace really froze the example's
    # mean, so the parity gate fails it (exit 5) and names TorchScript.
    allowed = CliRunner().invoke(app, [*base, "--allow-trace-warning", "reads_value.py:12",
                                       "-o", str(tmp_path / "out2")])
    assert allowed.exit_code == 5, allowed.output + allowed.stderr
    assert "torchscript cpu" in allowed.stderr and "parity gate failed" in allowed.stderr
    bad = CliRunner().invoke(app, [*base, "--allow-trace-warning", "reads_value.py",
                                   "-o", str(tmp_path / "out3")])
    assert bad.exit_code == 2 and "give FILE:LINE" in bad.stderr
