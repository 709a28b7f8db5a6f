"""The model bundle: one zip we would hand to a beamline without fear.

Members: manifest.json (format, versions, sha256 + size of every other member),
config.json (everything to rebuild the model), weights.safetensors, probe.npy (complex64),
golden.npz (real input patterns with their eager outputs, for parity checks later).

Reading never unpickles: JSON, safetensors and `np.load(allow_pickle=False)` only. Every
member name, size and hash is checked before anything is parsed, and the model comes back
in eval mode, float32, on the device the caller asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptycho_export.model.config import ModelConfig
from ptycho_export.model.generator import PtychoNet
from ptycho_export.normalization import Normalization
from runtime.atomic import written_atomic
from runtime.errors import BundleError, EnvironmentProblem, naming

FORMAT_NAME = "ptycho-export-bundle"
FORMAT_VERSION = 1
MEMBERS = ("config.json", "weights.safetensors", "probe.npy", "golden.npz")
MAX_MEMBER_BYTES = 2 * 1024**3
MAX_COMPRESSION_RATIO = 1000.0
CONFIG_SECTIONS = ("model", "normalization", "training", "data")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("ptycho-export", "torch", "lightning", "numpy", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass
class Bundle:
    """A verified bundle's contents, not yet turned into a model."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    normalization: Normalization
    training: dict[str, Any]
    data: dict[str, Any]
    probe: np.ndarray
    state_dict: dict[str, torch.Tensor]
    golden: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)


# ---------------------------------------------------------------- writing
def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_bundle(
    path: str | os.PathLike,
    *,
    config: ModelConfig,
    normalization: Normalization,
    state_dict: dict[str, torch.Tensor],
    probe: np.ndarray,
    golden: dict[str, np.ndarray],
    training: dict[str, Any],
    data: dict[str, Any],
) -> Path:
    """Write atomically: a temp file in the target folder, renamed when complete."""
    from safetensors.torch import save as save_safetensors

    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    members = {
        "config.json": json.dumps(
            {"model": config.to_dict(), "normalization": normalization.to_dict(),
             "training": training, "data": data},
            indent=2, sort_keys=True).encode(),
        "weights.safetensors": save_safetensors(weights),
        "probe.npy": _npy_bytes(np.asarray(probe, dtype=np.complex64)),
        "golden.npz": _npz_bytes({k: np.asarray(v) for k, v in golden.items()}),
    }
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "members": {name: {"sha256": sha256_bytes(blob), "size": len(blob)}
                    for name, blob in members.items()},
    }
    target = Path(path)
    try:
        with written_atomic(target) as tmp, \
                zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
            for name, blob in members.items():
                archive.writestr(name, blob)
    except OSError as err:  # the error names the bundle the user asked for
        raise naming(err, target) from err
    return target


# ---------------------------------------------------------------- reading
def _check_member_info(source: str, info: zipfile.ZipInfo, max_bytes: int) -> None:
    name = info.filename
    if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name or "\\" in name:
        raise BundleError(f"{source}: member {name!r} has an unsafe path; refusing the bundle")
    mode = (info.external_attr >> 16) & 0o170000
    if mode == stat.S_IFLNK:
        raise BundleError(f"{source}: member {name!r} is a symlink; refusing the bundle")
    if info.file_size > max_bytes:
        raise BundleError(
            f"{source}: member {name!r} is {info.file_size} bytes, over the {max_bytes}-byte cap")
    if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        raise BundleError(
            f"{source}: member {name!r} expands {info.file_size / info.compress_size:.0f}x "
            "(zip bomb?); refusing the bundle")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    """Read at most the declared size, so a lying header cannot make us inflate forever."""
    with archive.open(info) as handle:
        blob = handle.read(info.file_size + 1)
    if len(blob) != info.file_size:
        raise BundleError(f"{source}: member {info.filename!r} is not the size its header says")
    return blob


def read_members(path: str | os.PathLike, max_member_bytes: int = MAX_MEMBER_BYTES
                 ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Open the zip, check every member against the manifest, return manifest + raw bytes."""
    source = str(path)
    if not Path(path).is_file():
        raise BundleError(f"{source}: no such bundle file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleError(f"{source}: not a readable zip bundle ({err})") from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise BundleError(f"{source}: the zip is empty; expected manifest.json and "
                              f"{', '.join(MEMBERS)}")
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_member_info(source, info, max_member_bytes)
            if info.filename in by_name:
                raise BundleError(f"{source}: member {info.filename!r} appears twice")
            by_name[info.filename] = info
        if "manifest.json" not in by_name:
            raise BundleError(f"{source}: manifest.json is missing; not a ptycho-export bundle")
        try:
            blobs = {name: _read_member(archive, info, source) for name, info in by_name.items()}
        except (zipfile.BadZipFile, EOFError, OSError, zlib_error(),
                RuntimeError, NotImplementedError) as err:  # encrypted / unknown method
            raise BundleError(f"{source}: the zip is damaged or truncated ({err})") from None
    manifest = _parse_manifest(source, blobs.pop("manifest.json"))
    listed = manifest["members"]
    extra = sorted(set(blobs) - set(listed))
    missing = sorted(set(MEMBERS) - set(blobs))
    if missing:
        raise BundleError(f"{source}: member(s) {missing} missing from the bundle")
    if extra:
        raise BundleError(f"{source}: member(s) {extra} are not listed in manifest.json")
    for name, blob in blobs.items():
        entry = listed[name]
        if len(blob) != entry.get("size") or sha256_bytes(blob) != entry.get("sha256"):
            raise BundleError(f"{source}: member {name!r} does not match its sha256 in "
                              "manifest.json (corrupted or edited); re-export or re-download it")
    return manifest, blobs


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _parse_manifest(source: str, blob: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BundleError(f"{source}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{source}: manifest.json is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{source}: bundle format version {version!r} is not supported "
                          f"(this ptycho-export reads version {FORMAT_VERSION}); upgrade it")
    members = manifest.get("members")
    if not isinstance(members, dict) or not all(isinstance(v, dict) for v in members.values()):
        raise BundleError(f"{source}: manifest.json has no valid 'members' table")
    return manifest


def _parse_weights(source: str, blob: bytes, expected: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        weights = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        hint = " (a pickle? it is refused without being unpickled)" if blob[:1] == b"\x80" or \
            blob[:2] == b"PK" else ""
        raise BundleError(f"{source}: weights.safetensors is not a valid safetensors file"
                          f"{hint}: {err}") from None
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{source}: weights do not fit the configured model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in weights.items():
        if tensor.dtype != torch.float32:
            raise BundleError(f"{source}: weight {name!r} is {tensor.dtype}, expected float32")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise BundleError(f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, "
                              f"the config needs {tuple(expected[name].shape)}")
    return weights


def _check_amplitude_scale(source: str, configured: float,
                           state_dict: dict[str, torch.Tensor]) -> None:
    """The input scale lives twice: in config.json (read by export, the manifest and the
    physics layer) and as a buffer in the weights (read by the network). Loading would
    silently take the weights' value, so the two must agree (to float32 rounding)."""
    stored = state_dict.get("amplitude_scale")
    if stored is None:
        return
    in_weights = float(stored)
    if not math.isclose(in_weights, float(np.float32(configured)), rel_tol=1e-6):
        raise BundleError(f"{source}: config.json's normalization amplitude_scale "
                          f"{configured:.6g} disagrees with the weights' {in_weights:.6g}; "
                          "the bundle was edited or assembled from two runs: re-create it "
                          "with ptycho-train")


def read_bundle(path: str | os.PathLike, max_member_bytes: int = MAX_MEMBER_BYTES) -> Bundle:
    source = str(path)
    manifest, blobs = read_members(path, max_member_bytes)
    try:
        config_all = json.loads(blobs["config.json"])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BundleError(f"{source}: config.json is not valid JSON ({err})") from None
    if not isinstance(config_all, dict):
        raise BundleError(f"{source}: config.json is not a JSON object")
    missing = [key for key in CONFIG_SECTIONS if key not in config_all]
    if missing:
        raise BundleError(f"{source}: config.json is missing section(s) {missing}")
    not_objects = [key for key in CONFIG_SECTIONS if not isinstance(config_all[key], dict)]
    if not_objects:
        raise BundleError(f"{source}: config.json section(s) {not_objects} are not JSON objects")
    try:
        config = ModelConfig.from_dict(config_all["model"])
        normalization = Normalization.from_dict(config_all["normalization"])
    except (KeyError, TypeError, ValueError) as err:
        detail = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, KeyError) and isinstance(detail, str) and " " not in detail:
            detail = f"missing key {detail!r}"
        raise BundleError(f"{source}: config.json is invalid: {detail}; the bundle was edited "
                          "or written by another tool: re-create it with ptycho-train") from None
    try:
        probe = np.load(io.BytesIO(blobs["probe.npy"]), allow_pickle=False)
        with np.load(io.BytesIO(blobs["golden.npz"]), allow_pickle=False) as golden_file:
            golden = {key: golden_file[key] for key in golden_file.files}
    except (ValueError, OSError, EOFError, MemoryError, zipfile.BadZipFile, zlib_error(),
            RuntimeError, NotImplementedError) as err:  # MemoryError: a forged array header
        raise BundleError(f"{source}: probe.npy or golden.npz is unreadable "
                          f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    n = config.patch_size
    if probe.shape != (n, n) or probe.dtype != np.complex64:
        raise BundleError(f"{source}: probe.npy is {probe.dtype}{probe.shape}, "
                          f"expected complex64({n}, {n})")
    try:
        # Shapes only, on the meta device: a config asking for a huge model costs nothing
        # here, and the real allocation happens only once the weights file matched it.
        with torch.device("meta"):
            expected = PtychoNet(config).state_dict()
    except (IndexError, RuntimeError, ValueError) as err:
        raise BundleError(f"{source}: config.json describes no buildable model: {err}") from None
    state_dict = _parse_weights(source, blobs["weights.safetensors"], expected)
    _check_amplitude_scale(source, normalization.amplitude_scale, state_dict)
    return Bundle(path=Path(path), manifest=manifest, config=config,
                  normalization=normalization, training=config_all["training"],
                  data=config_all["data"], probe=probe, state_dict=state_dict, golden=golden)


# ---------------------------------------------------------------- the model
def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem(f"device {device!r} requested but torch sees no CUDA device "
                                 f"(torch {torch.__version__}); use --device cpu or a CUDA build")
    return resolved


class Predictor:
    """An eval-mode float32 model pinned to one device; inputs are converted here, once.

    The two classic deployment bugs (weights on CPU while inputs go to CUDA; float64
    batches into float32 convs) cannot happen through this class: every input is moved to
    the model's device and cast to float32 before the first layer sees it.
    """

    def __init__(self, net: PtychoNet, device: torch.device) -> None:
        self.net = net.to(device=device, dtype=torch.float32).eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.device = device
        self.config = net.config

    def _as_input(self, amplitudes: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(amplitudes, np.ndarray) and not np.iscomplexobj(amplitudes):
            # torch cannot wrap flipped (negative-stride) or big-endian (HDF5) arrays
            amplitudes = np.ascontiguousarray(amplitudes, dtype=np.float32)
        tensor = torch.as_tensor(amplitudes)
        if tensor.is_complex():
            raise ValueError("diffraction amplitudes must be real, got a complex array")
        n, c = self.config.patch_size, self.config.channels
        if tensor.ndim == 3 and c == 1:
            tensor = tensor.unsqueeze(1)
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != (c, n, n):
            raise ValueError(f"expected amplitudes of shape (B, {c}, {n}, {n}), "
                             f"got {tuple(tensor.shape)}")
        return tensor.to(device=self.device, dtype=torch.float32)

    @torch.inference_mode()
    def __call__(self, amplitudes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(self._as_input(amplitudes))

    def predict(self, amplitudes: np.ndarray, batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
        """Batched numpy in, numpy out (float32 amplitude and phase, same leading shape)."""
        amp_parts, phase_parts = [], []
        for start in range(0, len(amplitudes), batch_size):
            amplitude, phase = self(amplitudes[start : start + batch_size])
            amp_parts.append(amplitude.float().cpu().numpy())
            phase_parts.append(phase.float().cpu().numpy())
        n, c = self.config.patch_size, self.config.channels
        if not amp_parts:
            empty = np.zeros((0, c, n, n), np.float32)
            return empty, empty.copy()
        return np.concatenate(amp_parts), np.concatenate(phase_parts)


def build_net(bundle: Bundle) -> PtychoNet:
    net = PtychoNet(bundle.config, bundle.normalization.amplitude_scale)
    net.load_state_dict(bundle.state_dict, strict=True)
    return net.eval()


def load_predictor(source: str | os.PathLike | Bundle, device: str | torch.device = "cpu"
                   ) -> Predictor:
    bundle = source if isinstance(source, Bundle) else read_bundle(source)
    return Predictor(build_net(bundle), resolve_device(device))
