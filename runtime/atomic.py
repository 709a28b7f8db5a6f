"""The one folder-swap every output folder goes through (export, run, Triton repository)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: Path, outdir: Path) -> None:
    """Swap the finished temp folder in; an older output survives until the swap."""
    backup = None
    if outdir.exists():
        backup = outdir.with_name(f".{outdir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(outdir, backup)
    try:
        os.replace(tmp, outdir)
    except BaseException:
        if backup is not None:
            os.replace(backup, outdir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
