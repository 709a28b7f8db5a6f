"""Upstream PtychoPINN's model bundle (`wts.h5.zip`), read for weights and plain config.

The archive holds `manifest.dill` ({'models': [...], 'version': ...}) and, per model,
`<name>/model.pth` (a torch state dict) and `<name>/params.dill` (the legacy config dict).
The weights are read with `torch.load(weights_only=True)`; the two dill files are never
unpickled: `plain_pickle` walks their opcodes and keeps only plain values (numbers,
strings, lists, dicts), listing whatever would have needed code.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptycho_export.export.plain_pickle import PlainPickleError, read_plain_pickle
from runtime.errors import PtychoError

MANIFEST_MEMBER = "manifest.dill"
INFERENCE_MODEL = "diffraction_to_obj"  # upstream's name for the diffraction -> object model
MAX_MEMBER_BYTES = 4 << 30  # refuse a member claiming more (a zip bomb, not a model)
MAX_CONFIG_BYTES = 16 << 20


class UpstreamBundleError(PtychoError):
    """The archive is not a readable upstream bundle; the message names the member."""

    exit_code = 3


@dataclass
class UpstreamBundle:
    path: Path
    member: str  # the model whose weights were read
    models: list[str]
    weights: Any  # what torch.load(weights_only=True) returned
    config: dict[str, Any] = field(default_factory=dict)  # plain, JSON-safe values
    skipped: list[str] = field(default_factory=list)

    def note(self) -> str:
        """One line: what was read, and what was skipped without being unpickled."""
        text = (f"{self.path.name}: upstream bundle; read {self.member}/model.pth with "
                f"torch.load(weights_only=True) and {len(self.config)} plain config value(s) "
                f"from {self.member}/params.dill without unpickling it")
        others = [m for m in self.models if m != self.member]
        if others:
            text += f"; not used: {', '.join(others)}"
        if self.skipped:
            text += ("; skipped (would need code to build, never unpickled): "
                     + ", ".join(self.skipped[:6])
                     + (f" and {len(self.skipped) - 6} more" if len(self.skipped) > 6 else ""))
        return text


def is_upstream_bundle(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return MANIFEST_MEMBER in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _read(archive: zipfile.ZipFile, path: Path, name: str, cap: int) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise UpstreamBundleError(f"{path}: has no member {name}") from None
    if info.file_size > cap:
        raise UpstreamBundleError(f"{path}: member {name} claims {info.file_size} bytes, over "
                                  f"the {cap}-byte cap")
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UpstreamBundleError(f"{path}: member {name} is damaged ({err})") from None


def _json_safe(config: dict[Any, Any]) -> tuple[dict[str, Any], list[str]]:
    kept, dropped = {}, []
    for key, value in config.items():
        try:
            if isinstance(key, str) and json.loads(json.dumps(value)) == value:
                kept[key] = value
                continue
        except (TypeError, ValueError):
            pass
        dropped.append(f"{key!r} ({type(value).__name__})")
    return kept, dropped


def read_upstream_bundle(path: str | os.PathLike,
                         load_weights: Callable[[str, bytes], Any]) -> UpstreamBundle:
    """The inference model's weights (through `load_weights(member name, bytes)`, the
    caller's weights_only loader) and its plain config."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UpstreamBundleError(f"{path}: not a readable zip ({err})") from None
    with archive:
        try:
            manifest, skipped = read_plain_pickle(_read(archive, path, MANIFEST_MEMBER,
                                                        MAX_CONFIG_BYTES))
        except PlainPickleError as err:
            raise UpstreamBundleError(f"{path}: {MANIFEST_MEMBER}: {err}") from None
        listed = manifest.get("models") if isinstance(manifest, dict) else None
        names = set(archive.namelist())
        models = [m for m in listed if isinstance(m, str)] if isinstance(listed, list) else \
            sorted({n.split("/")[0] for n in names if n.endswith("/model.pth")})
        present = [m for m in models if f"{m}/model.pth" in names]
        if not present:
            raise UpstreamBundleError(f"{path}: lists models {models or 'none'} but holds no "
                                      "<model>/model.pth")
        member = INFERENCE_MODEL if INFERENCE_MODEL in present else present[0]
        weights = load_weights(f"{member}/model.pth",
                               _read(archive, path, f"{member}/model.pth", MAX_MEMBER_BYTES))
        config: dict[str, Any] = {}
        params = f"{member}/params.dill"
        if params in names:
            try:
                raw, skipped_params = read_plain_pickle(_read(archive, path, params,
                                                              MAX_CONFIG_BYTES))
            except PlainPickleError as err:
                raise UpstreamBundleError(f"{path}: {params}: {err}") from None
            if isinstance(raw, dict):
                config, dropped = _json_safe(raw)
                skipped += skipped_params + dropped
            else:
                skipped.append(f"{params} is not a dict")
    return UpstreamBundle(path=path, member=member, models=models, weights=weights,
                          config=config, skipped=skipped)
