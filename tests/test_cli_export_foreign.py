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
