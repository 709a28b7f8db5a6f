"""Test helpers for bundles: copy a bundle zip while a callback tampers with it.

Kept free of torch so importing it never breaks a runtime-only test run.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BundleParts:
    """A bundle's zip, opened up for editing by a `rewrite_bundle` callback.

    members: every member except manifest.json, in zip order (add, drop, rename, edit).
    manifest: the parsed manifest; set it to None to leave manifest.json out.
    raw_manifest: when set, written verbatim as manifest.json instead of `manifest`.
    infos: per-name ZipInfo to write that member with (symlink bits, odd names, ...).
    """

    members: dict[str, bytes]
    manifest: dict[str, Any] | None
    raw_manifest: bytes | None = None
    infos: dict[str, zipfile.ZipInfo] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rewrite_bundle(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    mutate: Callable[[BundleParts], None] | None = None,
    *,
    rehash: bool = True,
    compresslevel: int | None = None,
) -> Path:
    """Copy `src` to `dst` member by member, letting `mutate` edit names, bytes or manifest.

    With `rehash` (the default) the manifest's sha256/size of every member it lists and
    that is still present are recomputed after `mutate`, so only the check under test can
    catch the change; members the manifest does not list stay unlisted. With
    `rehash=False` the manifest is written exactly as `mutate` left it (stale hashes).
    """
    with zipfile.ZipFile(src) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    manifest = json.loads(members.pop("manifest.json"))
    parts = BundleParts(members=members, manifest=manifest)
    if mutate is not None:
        mutate(parts)
    if rehash and parts.manifest is not None and parts.raw_manifest is None:
        for name, entry in parts.manifest.get("members", {}).items():
            if name in parts.members:
                blob = parts.members[name]
                entry.update(sha256=sha256(blob), size=len(blob))
    out = Path(dst)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED,
                         compresslevel=compresslevel) as archive:
        if parts.raw_manifest is not None:
            archive.writestr("manifest.json", parts.raw_manifest)
        elif parts.manifest is not None:
            archive.writestr("manifest.json", json.dumps(parts.manifest, indent=2))
        for name, blob in parts.members.items():
            archive.writestr(parts.infos.get(name, name), blob)
    return out
