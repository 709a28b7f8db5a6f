"""Freeze a bundle's eval-mode model into TorchScript / ONNX / .pt2, audited and parity-gated."""

from ptycho_export.export.adapter import InferenceAdapter
from ptycho_export.export.foreign import export_foreign, export_foreign_command
from ptycho_export.export.formats import FORMATS, ExportFormat
from ptycho_export.export.lint import ExportLintError, lint_module
from ptycho_export.export.pipeline import (
    ExportOptions,
    ExportResult,
    export_bundle,
    export_module,
)

__all__ = [
    "FORMATS",
    "ExportFormat",
    "ExportLintError",
    "ExportOptions",
    "ExportResult",
    "InferenceAdapter",
    "export_bundle",
    "export_foreign",
    "export_foreign_command",
    "export_module",
    "lint_module",
]
