"""The one place reports are written: strict JSON files (atomic) and Markdown tables.

Every command's report (report.json of ptycho-run, parity.json, the export manifest's
neighbours, training reports, benchmark results) goes through :func:`write_json`, so they
all read back with a strict parser: numpy scalars become Python numbers, paths strings,
and a non-finite float either ``null`` or, where infinity means something (a ratio to a
limit of zero), the strings ``"inf"`` / ``"-inf"`` / ``"nan"``; never the bare ``NaN`` that
``json.dumps`` writes by default and other tools refuse.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from runtime.atomic import write_atomic

NonFinite = Literal["null", "text"]


def json_safe(value: Any, non_finite: NonFinite = "null") -> Any:
    """``value`` with every part JSON can hold strictly: dict keys as strings, tuples as
    lists, numpy scalars and arrays as Python values, paths as strings, objects with a
    ``to_dict`` as that dict, non-finite floats as ``non_finite`` says."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, non_finite) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), non_finite)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if non_finite == "null":
            return None
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return json_safe(to_dict(), non_finite)
    return value


def json_text(payload: Any, *, non_finite: NonFinite = "null", sort_keys: bool = True,
              indent: int | None = 2) -> str:
    """Strict JSON text (trailing newline); anything else unknown is written as str()."""
    return json.dumps(json_safe(payload, non_finite), indent=indent, sort_keys=sort_keys,
                      allow_nan=False, default=str) + "\n"


def write_json(path: str | os.PathLike[str], payload: Any, *,
               non_finite: NonFinite = "null", sort_keys: bool = True,
               indent: int | None = 2) -> Path:
    """Write ``payload`` to ``path`` atomically (a temp file beside it, then renamed: a
    reader never sees half a file, and a failure leaves the previous one)."""
    path = Path(path)
    text = json_text(payload, non_finite=non_finite, sort_keys=sort_keys, indent=indent)
    with write_atomic(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """A text file (a Markdown table, say) written atomically, as :func:`write_json`."""
    path = Path(path)
    with write_atomic(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; a ``|`` inside a cell is escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return "\n".join(lines)
