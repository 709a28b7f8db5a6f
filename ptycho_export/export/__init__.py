"""Freeze a bundle's eval-mode model into TorchScript / ONNX / .pt2, audited and parity-gated."""

from ptycho_export.export.formats import FORMATS, ExportFormat
from ptycho_export.export.lint import ExportLintError, lint_module
from ptycho_export.export.pipeline import ExportOptions, ExportResult, export_bundle

__all__ = [
    "FORMATS",
    "ExportFormat",
    "ExportLintError",
    "ExportOptions",
    "ExportResult",
    "export_bundle",
    "lint_module",
]
