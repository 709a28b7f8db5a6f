"""The supported formats as data: name, file, and which options each accepts."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from runtime.errors import PtychoError


class UsageError(PtychoError):
    exit_code = 2


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str
    description: str
    dynamic_batch: bool  # can the artifact accept any batch size?


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat("onnx", "model.onnx", "ONNX (dynamo exporter), one file", True),
    "torchscript": ExportFormat("torchscript", "model.ts", "TorchScript trace (deprecated "
                                "upstream; kept for C++/LibTorch users)", True),
    "pt2": ExportFormat("pt2", "model.pt2", "torch.export program (torch.export.load)", True),
}
# Reduced precisions keep float32 graph I/O and the input scaling in float32; only the
# generator's weights and arithmetic change. Each has its own recorded tolerance.
PRECISIONS = ("fp32", "fp16", "bf16")


def parse_formats(requested: str) -> list[str]:
    """'all' or a comma list; typos get a suggestion rather than a traceback."""
    names = list(FORMATS) if requested == "all" else [p.strip() for p in requested.split(",")]
    for name in names:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, [*FORMATS, "all"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"unknown format {name!r} (choose from {', '.join(FORMATS)}, "
                             f"all){hint}")
    return list(dict.fromkeys(names))
