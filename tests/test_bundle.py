"""The model bundle: exact round trip, atomic writes, every refusal, and a safe loader."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from helpers import BundleParts, rewrite_bundle, sha256  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402

import ptycho_export.bundle as bundle_module  # noqa: E402
from ptycho_export.bundle import (  # noqa: E402
    FORMAT_VERSION,
    MAX_COMPRESSION_RATIO,
    MEMBERS,
    Bundle,
    Predictor,
    load_predictor,
    read_bundle,
    read_members,
    resolve_device,
    write_bundle,
)
from ptycho_export.model.config import ModelConfig  # noqa: E402
from ptycho_export.model.generator import PtychoNet  # noqa: E402
from runtime.errors import EXIT_BAD_INPUT, BundleError, EnvironmentProblem  # noqa: E402

N = 32
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")


# ---------------------------------------------------------------- helpers
def refused(path: Path, *fragments: str, **kwargs) -> str:
    """read_bundle must raise one BundleError line naming the file and every fragment."""
    with pytest.raises(BundleError) as info:
        read_bundle(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message
    assert info.value.exit_code == EXIT_BAD_INPUT
    return message


def write_tiny(path: Path, parts, **overrides) -> Path:
    values = dict(config=parts.config, normalization=parts.normalization,
                  state_dict=parts.state_dict, probe=parts.probe, golden=parts.golden,
                  training=parts.training, data=parts.data)
    values.update(overrides)
    return write_bundle(path, **values)


def set_member(name: str, blob: bytes):
    def mutate(parts: BundleParts) -> None:
        parts.members[name] = blob
    return mutate


def edit_config(edit):
    def mutate(parts: BundleParts) -> None:
        config = json.loads(parts.members["config.json"])
        parts.members["config.json"] = json.dumps(edit(config)).encode()
    return mutate


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def central_directory(raw: bytes | bytearray, member: str) -> int:
    """Offset of `member`'s central-directory record in a zip's bytes."""
    offset = raw.find(b"PK\x01\x02")
    while offset >= 0:
        name_length = struct.unpack_from("<H", raw, offset + 28)[0]
        if raw[offset + 46 : offset + 46 + name_length] == member.encode():
            return offset
        offset = raw.find(b"PK\x01\x02", offset + 4)
    raise AssertionError(f"{member} not in the central directory")


def patch_central_directory(src: Path, dst: Path, member: str, field: int, fmt: str,
                            value: int) -> Path:
    raw = bytearray(src.read_bytes())
    struct.pack_into(fmt, raw, central_directory(raw, member) + field, value)
    dst.write_bytes(bytes(raw))
    return dst


class Touch:
    """Unpickling this creates `path`: the marker that proves a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- round trip
def test_round_trip_is_bit_identical(tiny_bundle: Path, tiny_parts) -> None:
    bundle = read_bundle(tiny_bundle)
    assert isinstance(bundle, Bundle)
    assert bundle.path == tiny_bundle
    assert set(bundle.state_dict) == set(tiny_parts.state_dict)
    for name, tensor in tiny_parts.state_dict.items():
        got = bundle.state_dict[name]
        assert got.dtype == torch.float32 and got.device.type == "cpu", name
        assert torch.equal(got, tensor), name
    assert bundle.probe.dtype == np.complex64 and bundle.probe.shape == (N, N)
    assert bundle.probe.tobytes() == tiny_parts.probe.tobytes()
    assert set(bundle.golden) == {"amplitudes", "amplitude", "phase"}
    for key, array in tiny_parts.golden.items():
        assert bundle.golden[key].dtype == array.dtype == np.float32, key
        assert bundle.golden[key].shape == (4, 1, N, N), key
        np.testing.assert_array_equal(bundle.golden[key], array)
    assert bundle.config == tiny_parts.config
    assert bundle.config.widths == (4, 8, 16)
    assert bundle.normalization == tiny_parts.normalization
    assert bundle.training == {"epochs": 1}
    assert bundle.data == {"source": "test"}


def test_manifest_lists_hash_and_size_of_every_member(tiny_bundle: Path) -> None:
    with zipfile.ZipFile(tiny_bundle) as archive:
        names = [info.filename for info in archive.infolist()]
        blobs = {name: archive.read(name) for name in names}
    assert sorted(names) == sorted(("manifest.json", *MEMBERS))
    manifest = json.loads(blobs.pop("manifest.json"))
    assert manifest["format"] == "ptycho-export-bundle"
    assert manifest["format_version"] == FORMAT_VERSION
    assert {"torch", "numpy", "safetensors"} <= set(manifest["versions"])
    assert manifest["created_utc"]
    assert set(manifest["members"]) == set(MEMBERS)
    for name, blob in blobs.items():
        assert manifest["members"][name] == {"sha256": sha256(blob), "size": len(blob)}, name
    read_manifest, read_blobs = read_members(tiny_bundle)
    assert read_manifest == manifest
    assert read_blobs == blobs


def test_bundle_sha256_is_the_file_hash(tiny_bundle: Path) -> None:
    assert read_bundle(tiny_bundle).sha256 == sha256(tiny_bundle.read_bytes())


def test_written_bundle_is_readable_like_any_new_file(tmp_path: Path, tiny_parts) -> None:
    """Not mkstemp's 0600: a beamline account in the group must be able to read it."""
    old = os.umask(0o022)
    try:
        path = write_tiny(tmp_path / "model.zip", tiny_parts)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_creates_folders_and_replaces_an_old_bundle(tmp_path: Path, tiny_parts) -> None:
    target = tmp_path / "a" / "b" / "model.zip"
    write_tiny(target, tiny_parts, training={"epochs": 1})
    write_tiny(target, tiny_parts, training={"epochs": 2})
    assert read_bundle(target).training == {"epochs": 2}
    assert os.listdir(target.parent) == ["model.zip"]


# ---------------------------------------------------------------- atomic write
def fail_after_first_member(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list:
    original = zipfile.ZipFile.writestr
    written: list[str] = []

    def writestr(self, zinfo_or_arcname, data, *args, **kwargs):  # noqa: ANN001, ANN202
        if written:
            raise error
        written.append(str(zinfo_or_arcname))
        return original(self, zinfo_or_arcname, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    return written


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_no_target_and_no_temp(tmp_path: Path, tiny_parts,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   error: BaseException) -> None:
    written = fail_after_first_member(monkeypatch, error)
    target = tmp_path / "out" / "model.zip"
    with pytest.raises(type(error)):
        write_tiny(target, tiny_parts)
    assert written == ["manifest.json"]  # it really failed midway
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_failed_write_keeps_the_old_bundle(tmp_path: Path, tiny_bundle: Path, tiny_parts,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.zip"
    old_bytes = tiny_bundle.read_bytes()
    target.write_bytes(old_bytes)
    fail_after_first_member(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        write_tiny(target, tiny_parts, training={"epochs": 99})
    monkeypatch.undo()
    assert target.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["model.zip"]
    assert read_bundle(target).training == {"epochs": 1}


# ---------------------------------------------------------------- refusals: the zip itself
def test_missing_file_refused(tmp_path: Path) -> None:
    refused(tmp_path / "nope.zip", "no such bundle file")
    refused(tmp_path, "no such bundle file")  # a folder is not a bundle either


def test_text_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "bundle.zip"
    path.write_text("this is not a zip\n")
    refused(path, "not a readable zip bundle")


def test_truncated_zip_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    raw = tiny_bundle.read_bytes()
    path = tmp_path / "truncated.zip"
    path.write_bytes(raw[: len(raw) // 2])
    refused(path, "not a readable zip bundle")


def test_damaged_member_data_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    """Central directory intact, deflated bytes of one member scrambled: CRC/zlib error."""
    with zipfile.ZipFile(tiny_bundle) as archive:
        info = archive.getinfo("weights.safetensors")
    raw = bytearray(tiny_bundle.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    raw[start : start + 64] = bytes(64)
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(raw))
    refused(path, "damaged or truncated")


def test_empty_zip_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.zip"
    with zipfile.ZipFile(path, "w"):
        pass
    refused(path, "the zip is empty", "manifest.json")


@pytest.mark.parametrize("name", ["../evil", "/etc/x", "a/../../evil", "c:evil", "dir\\evil"])
def test_unsafe_member_path_refused(tmp_path: Path, tiny_bundle: Path, name: str) -> None:
    path = rewrite_bundle(tiny_bundle, tmp_path / "evil.zip", set_member(name, b"owned"))
    with zipfile.ZipFile(path) as archive:
        assert name in archive.namelist()  # the zip really carries that name
    refused(path, f"member {name!r} has an unsafe path")


def test_symlink_member_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    def mutate(parts: BundleParts) -> None:
        link = zipfile.ZipInfo("probe.npy")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        parts.infos["probe.npy"] = link
        parts.members["probe.npy"] = b"/etc/passwd"

    path = rewrite_bundle(tiny_bundle, tmp_path / "link.zip", mutate)
    refused(path, "member 'probe.npy' is a symlink")


def test_member_over_size_cap_refused(tiny_bundle: Path) -> None:
    with zipfile.ZipFile(tiny_bundle) as archive:
        sizes = sorted((info.file_size, info.filename) for info in archive.infolist())
    (second, _), (largest, name) = sizes[-2:]
    assert second < largest
    cap = (second + largest) // 2
    refused(tiny_bundle, f"member {name!r} is {largest} bytes, over the {cap}-byte cap",
            max_member_bytes=cap)
    assert read_bundle(tiny_bundle, max_member_bytes=largest).config.widths == (4, 8, 16)


def test_huge_declared_size_refused_before_inflating(tmp_path: Path, tiny_bundle: Path) -> None:
    """A header claiming ~4 GB is refused from the central directory alone."""
    huge = 0xFFFF_FFF0  # just below the ZIP64 marker
    path = patch_central_directory(tiny_bundle, tmp_path / "huge.zip", "golden.npz", 24, "<I",
                                   huge)
    refused(path, f"member 'golden.npz' is {huge} bytes, over the")


def test_header_smaller_than_data_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    with zipfile.ZipFile(tiny_bundle) as archive:
        size = archive.getinfo("probe.npy").file_size
    path = patch_central_directory(tiny_bundle, tmp_path / "liar.zip", "probe.npy", 24, "<I",
                                   size - 100)
    refused(path, "probe.npy")


def test_zip_bomb_refused_by_ratio(tmp_path: Path, tiny_bundle: Path) -> None:
    zeros = bytes(50_000_000)
    path = rewrite_bundle(tiny_bundle, tmp_path / "bomb.zip", set_member("golden.npz", zeros),
                          compresslevel=9)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("golden.npz")
    assert info.file_size / info.compress_size > MAX_COMPRESSION_RATIO
    assert info.file_size < bundle_module.MAX_MEMBER_BYTES  # only the ratio can catch it
    refused(path, "member 'golden.npz' expands", "zip bomb")


def test_encrypted_member_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    path = patch_central_directory(tiny_bundle, tmp_path / "enc.zip", "config.json", 8, "<H",
                                   0x1)
    refused(path, "config.json", "encrypted")


def test_unknown_compression_method_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    path = patch_central_directory(tiny_bundle, tmp_path / "method.zip", "probe.npy", 10, "<H",
                                   99)
    refused(path, "damaged or truncated", "compression method is not supported")


def test_duplicate_member_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    path = tmp_path / "dup.zip"
    path.write_bytes(tiny_bundle.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("probe.npy", npy_bytes(np.zeros((N, N), np.complex64)))
    refused(path, "member 'probe.npy' appears twice")


# ---------------------------------------------------------------- refusals: the manifest
def test_manifest_missing_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    def mutate(parts: BundleParts) -> None:
        parts.manifest = None

    path = rewrite_bundle(tiny_bundle, tmp_path / "nomanifest.zip", mutate)
    refused(path, "manifest.json is missing")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b"[" * 100_000])
def test_manifest_not_json_refused(tmp_path: Path, tiny_bundle: Path, raw: bytes) -> None:
    def mutate(parts: BundleParts) -> None:
        parts.raw_manifest = raw

    path = rewrite_bundle(tiny_bundle, tmp_path / "badmanifest.zip", mutate)
    refused(path, "manifest.json is not valid JSON")


def test_manifest_of_another_format_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    def mutate(parts: BundleParts) -> None:
        parts.manifest["format"] = "someone-elses-zip"

    path = rewrite_bundle(tiny_bundle, tmp_path / "other.zip", mutate)
    refused(path, "manifest.json is not a ptycho-export-bundle manifest")


def test_unknown_format_version_says_upgrade(tmp_path: Path, tiny_bundle: Path) -> None:
    def mutate(parts: BundleParts) -> None:
        parts.manifest["format_version"] = 99

    path = rewrite_bundle(tiny_bundle, tmp_path / "future.zip", mutate)
    refused(path, "format version 99 is not supported", f"reads version {FORMAT_VERSION}",
            "upgrade")


def test_sha256_mismatch_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    def mutate(parts: BundleParts) -> None:
        blob = bytearray(parts.members["weights.safetensors"])
        blob[-1] ^= 0x01  # one bit of the last weight; same length
        parts.members["weights.safetensors"] = bytes(blob)

    path = rewrite_bundle(tiny_bundle, tmp_path / "edited.zip", mutate, rehash=False)
    refused(path, "member 'weights.safetensors' does not match its sha256")


def test_member_not_in_manifest_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    path = rewrite_bundle(tiny_bundle, tmp_path / "extra.zip", set_member("notes.txt", b"hi"))
    refused(path, "['notes.txt'] are not listed in manifest.json")


def test_listed_member_missing_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    def mutate(parts: BundleParts) -> None:
        del parts.members["probe.npy"]

    path = rewrite_bundle(tiny_bundle, tmp_path / "noprobe.zip", mutate)
    refused(path, "['probe.npy'] missing from the bundle")


# ---------------------------------------------------------------- refusals: the contents
def test_config_missing_model_section_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    def drop_model(config: dict) -> dict:
        del config["model"]
        return config

    path = rewrite_bundle(tiny_bundle, tmp_path / "nomodel.zip", edit_config(drop_model))
    refused(path, "config.json is missing section(s) ['model']")


@pytest.mark.parametrize(
    ("config", "fragment"),
    [(5, "config.json is not a JSON object"),
     (["model"], "config.json is not a JSON object"),
     ({"model": {}, "normalization": {}, "training": [], "data": {}},
      "config.json section(s) ['training'] are not JSON objects"),
     ({"model": {"patch_size": 32}, "normalization": {}, "training": {}, "data": {}},
      "config.json is invalid")],
)
def test_malformed_config_refused(tmp_path: Path, tiny_bundle: Path, config, fragment) -> None:
    path = rewrite_bundle(tiny_bundle, tmp_path / "config.zip", edit_config(lambda _: config))
    refused(path, fragment)


def test_config_scale_disagreeing_with_the_weights_refused(tmp_path: Path,
                                                           tiny_bundle: Path) -> None:
    """config.json's amplitude_scale feeds export and physics, the weights' buffer feeds
    the network: a bundle where they differ would export one model and describe another."""
    def edit(config: dict) -> dict:
        config["normalization"]["amplitude_scale"] = 0.75
        return config

    path = rewrite_bundle(tiny_bundle, tmp_path / "scale.zip", edit_config(edit))
    refused(path, "amplitude_scale 0.75 disagrees with the weights' 0.5", "ptycho-train")
    untouched = read_bundle(rewrite_bundle(tiny_bundle, tmp_path / "same.zip",
                                           edit_config(lambda config: config)))
    assert untouched.normalization.amplitude_scale == 0.5


@pytest.mark.parametrize("widths", [[], [-1, 4]])
def test_unbuildable_model_config_refused(tmp_path: Path, tiny_bundle: Path, widths) -> None:
    def edit(config: dict) -> dict:
        config["model"]["widths"] = widths
        return config

    path = rewrite_bundle(tiny_bundle, tmp_path / "widths.zip", edit_config(edit))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        refused(path, "config.json describes no buildable model")


def test_huge_config_is_checked_without_allocating(tmp_path: Path, tiny_bundle: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 kB config asking for ~10 GB of weights must not make the reader allocate them."""

    built: list[tuple[int, ...]] = []

    class MetaOnly(PtychoNet):
        def __init__(self, config: ModelConfig, *args, **kwargs) -> None:
            assert torch.empty(0).device.type == "meta", "real allocation while verifying"
            built.append(config.widths)
            super().__init__(config, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "PtychoNet", MetaOnly)

    def edit(config: dict) -> dict:
        config["model"]["widths"] = [4096, 4096, 4096]
        return config

    path = rewrite_bundle(tiny_bundle, tmp_path / "huge.zip", edit_config(edit))
    refused(path, "has shape", "the config needs")
    assert built == [(4096, 4096, 4096)]


def test_weights_with_wrong_shapes_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    other = PtychoNet(ModelConfig(patch_size=N, widths=(2, 4, 8)), 0.5)
    blob = save_safetensors({k: v.contiguous() for k, v in other.state_dict().items()})
    path = rewrite_bundle(tiny_bundle, tmp_path / "shapes.zip",
                          set_member("weights.safetensors", blob))
    refused(path, "has shape", "the config needs")


def test_weights_with_missing_tensor_refused(tmp_path: Path, tiny_bundle: Path,
                                             tiny_parts) -> None:
    weights = dict(tiny_parts.state_dict)
    dropped = sorted(weights)[0]
    del weights[dropped]
    path = rewrite_bundle(tiny_bundle, tmp_path / "missing.zip",
                          set_member("weights.safetensors", save_safetensors(weights)))
    refused(path, "weights do not fit the configured model", dropped)


def test_float64_weights_refused(tmp_path: Path, tiny_bundle: Path, tiny_parts) -> None:
    weights = {k: v.double() for k, v in tiny_parts.state_dict.items()}
    path = rewrite_bundle(tiny_bundle, tmp_path / "f64.zip",
                          set_member("weights.safetensors", save_safetensors(weights)))
    refused(path, "is torch.float64, expected float32")


def test_probe_of_wrong_dtype_refused(tmp_path: Path, tiny_bundle: Path, tiny_parts) -> None:
    blob = npy_bytes(tiny_parts.probe.astype(np.complex128))
    path = rewrite_bundle(tiny_bundle, tmp_path / "probe.zip", set_member("probe.npy", blob))
    refused(path, "probe.npy is complex128(32, 32), expected complex64(32, 32)")


# ---------------------------------------------------------------- pickles are never run
def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(Touch(marker))


def torch_save_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"generator.encoder.0.0.0.weight": Touch(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("make", [pickle_payload, torch_save_payload],
                         ids=["pickle", "torch.save"])
def test_pickled_weights_refused_without_unpickling(tmp_path: Path, tiny_bundle: Path,
                                                    make) -> None:
    # The payload is live: the usual unsafe load would run it.
    armed = tmp_path / "armed"
    if make is pickle_payload:
        pickle.loads(make(armed)).close()
    else:
        torch.load(io.BytesIO(make(armed)), weights_only=False)["generator.encoder.0.0.0.weight"]\
            .close()
    assert armed.exists()

    marker = tmp_path / "pwned"
    path = rewrite_bundle(tiny_bundle, tmp_path / "pickle.zip",
                          set_member("weights.safetensors", make(marker)))
    refused(path, "weights.safetensors is not a valid safetensors file",
            "refused without being unpickled")
    assert not marker.exists()


@pytest.mark.parametrize("member", ["probe.npy", "golden.npz"])
def test_pickled_arrays_refused_without_unpickling(tmp_path: Path, tiny_bundle: Path,
                                                   member: str) -> None:
    marker = tmp_path / "pwned"
    payload = np.array([Touch(marker)], dtype=object)
    if member == "probe.npy":
        blob = npy_bytes(payload, allow_pickle=True)
    else:
        buffer = io.BytesIO()
        np.savez(buffer, amplitudes=payload)
        blob = buffer.getvalue()
    path = rewrite_bundle(tiny_bundle, tmp_path / "pickle.zip", set_member(member, blob))
    refused(path, "probe.npy or golden.npz is unreadable")
    assert not marker.exists()


# ---------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return load_predictor(tiny_bundle, "cpu")


def golden_input(tiny_parts) -> np.ndarray:
    return tiny_parts.golden["amplitudes"]


def test_loaded_model_is_frozen_float32_eval_on_cpu(predictor: Predictor) -> None:
    net = predictor.net
    assert predictor.device == torch.device("cpu")
    assert not net.training
    assert all(not module.training for module in net.modules())
    tensors = list(net.parameters()) + list(net.buffers())
    assert len(tensors) > 2
    for tensor in tensors:
        assert tensor.dtype == torch.float32
        assert tensor.device.type == "cpu"
    assert all(not p.requires_grad for p in net.parameters())
    assert float(net.amplitude_scale) == 0.5


def test_load_predictor_accepts_a_read_bundle(tiny_bundle: Path, tiny_parts) -> None:
    predictor = load_predictor(read_bundle(tiny_bundle), "cpu")
    amplitude, _ = predictor(golden_input(tiny_parts))
    np.testing.assert_array_equal(amplitude.numpy(), tiny_parts.golden["amplitude"])


def test_golden_parity(predictor: Predictor, tiny_parts) -> None:
    amplitude, phase = predictor(golden_input(tiny_parts))
    assert amplitude.dtype == phase.dtype == torch.float32
    assert not amplitude.requires_grad
    np.testing.assert_allclose(amplitude.numpy(), tiny_parts.golden["amplitude"], rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(phase.numpy(), tiny_parts.golden["phase"], rtol=0, atol=1e-6)


def test_float64_numpy_batch_equals_float32(predictor: Predictor, tiny_parts) -> None:
    batch32 = golden_input(tiny_parts)
    amp32, phase32 = predictor(batch32)
    amp64, phase64 = predictor(batch32.astype(np.float64))
    assert amp64.dtype == torch.float32
    assert torch.equal(amp32, amp64) and torch.equal(phase32, phase64)


def test_float64_torch_batch_works(predictor: Predictor, tiny_parts) -> None:
    batch = torch.from_numpy(golden_input(tiny_parts)).double()
    amplitude, phase = predictor(batch)
    assert amplitude.dtype == torch.float32 and amplitude.shape == (4, 1, N, N)
    assert torch.equal(amplitude, predictor(golden_input(tiny_parts))[0])


def test_three_dimensional_batch_for_one_channel(predictor: Predictor, tiny_parts) -> None:
    batch = golden_input(tiny_parts)
    amplitude, phase = predictor(batch[:, 0])
    assert amplitude.shape == phase.shape == (4, 1, N, N)
    assert torch.equal(amplitude, predictor(batch)[0])


@pytest.mark.parametrize("make", [lambda b: b[:, :, ::-1, :], lambda b: b.astype(">f8"),
                                  lambda b: np.asfortranarray(b)],
                         ids=["flipped", "big-endian", "fortran"])
def test_awkward_numpy_layouts_work(predictor: Predictor, tiny_parts, make) -> None:
    batch = golden_input(tiny_parts)
    expected = predictor(np.ascontiguousarray(make(batch), dtype=np.float32))[0]
    assert torch.equal(predictor(make(batch))[0], expected)


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (4, 2, N, N), (N, N), (4, 1, N, N, 1)])
def test_wrong_shape_names_the_expected_shape(predictor: Predictor, shape) -> None:
    with pytest.raises(ValueError, match=re.escape(f"(B, 1, {N}, {N})")):
        predictor(np.zeros(shape, np.float32))


def test_complex_input_refused(predictor: Predictor, tiny_parts) -> None:
    batch = golden_input(tiny_parts)
    with pytest.raises(ValueError, match="must be real"):
        predictor(batch.astype(np.complex64))
    with pytest.raises(ValueError, match="must be real"):
        predictor(torch.from_numpy(batch).to(torch.complex64))


def test_predict_batches_to_numpy(predictor: Predictor, tiny_parts) -> None:
    batch = golden_input(tiny_parts).astype(np.float64)
    amplitude, phase = predictor.predict(batch, batch_size=3)
    assert isinstance(amplitude, np.ndarray) and amplitude.dtype == np.float32
    assert amplitude.shape == phase.shape == (4, 1, N, N)
    np.testing.assert_allclose(amplitude, tiny_parts.golden["amplitude"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(phase, tiny_parts.golden["phase"], rtol=0, atol=1e-6)
    empty_amp, empty_phase = predictor.predict(batch[:0])
    assert empty_amp.shape == empty_phase.shape == (0, 1, N, N)


@needs_no_cuda
def test_cuda_request_without_cuda_is_an_environment_problem(tiny_bundle: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="--device cpu") as info:
        load_predictor(tiny_bundle, "cuda")
    assert "cuda" in str(info.value) and info.value.exit_code == 4
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_predictor_takes_cpu_float64_numpy(tiny_bundle: Path, tiny_parts) -> None:
    predictor = load_predictor(tiny_bundle, "cuda")
    assert all(p.device.type == "cuda" for p in predictor.net.parameters())
    assert all(b.device.type == "cuda" for b in predictor.net.buffers())
    amplitude, phase = predictor(golden_input(tiny_parts).astype(np.float64))
    assert amplitude.device.type == phase.device.type == "cuda"
    assert amplitude.dtype == torch.float32
    np.testing.assert_allclose(amplitude.cpu().numpy(), tiny_parts.golden["amplitude"],
                               rtol=0, atol=1e-4)
    assert resolve_device("auto").type == "cuda"
