"""runtime.refine: the stitched object refined through the measured patterns, and
ptycho-run --refine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import runtime.refine as refine_module
from runtime.refine import RefineOptions, refine_object, shifted_probes
from runtime.stitch import stitch_patches

N = 32


def _probe(n: int = N) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - n / 2
    r2 = (yy**2 + xx**2) / 5.0**2
    return (np.exp(-r2) * np.exp(0.4j * r2)).astype(np.complex64)


def _object(size: int, seed: int) -> np.ndarray:
    """A band-limited random complex object: amplitude 0.6-1.0, phase +-0.8 rad."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(size)
    low = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 0.08**2))
    fields = [np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * low))
              for _ in range(2)]
    a, p = ((f - f.min()) / (f.max() - f.min()) for f in fields)
    return ((0.6 + 0.4 * a) * np.exp(0.8j * (2 * p - 1))).astype(np.complex128)


def _scan(obj: np.ndarray, probe: np.ndarray, step: float = 4.0, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """(centred amplitudes (M, N, N) float32, positions (M, 2)): an exit wave made by
    shifting the object by its fractional position (Fourier shift of the object, written
    independently of the refinement's probe shift), noise-free."""
    rng = np.random.default_rng(seed)
    n = probe.shape[-1]
    size = obj.shape[0]
    centres = np.arange(n / 2 + 2, size - n / 2 - 2, step)
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    positions = np.stack([yy.ravel(), xx.ravel()], 1) + rng.uniform(-0.5, 0.5, (yy.size, 2))
    k = np.fft.fftfreq(size)
    spectrum = np.fft.fft2(obj)
    amplitudes = []
    for y, x in positions:
        ty, tx = y - n / 2, x - n / 2
        iy, ix = int(np.floor(ty)), int(np.floor(tx))
        fy, fx = ty - iy, tx - ix
        shifted = np.fft.ifft2(spectrum * np.exp(2j * np.pi * (k[:, None] * fy + k[None, :] * fx)))
        exit_wave = probe * shifted[iy : iy + n, ix : ix + n]
        amplitudes.append(np.fft.fftshift(np.abs(np.fft.fft2(exit_wave, norm="ortho"))))
    return np.asarray(amplitudes, np.float32), positions


@pytest.fixture(scope="module")
def case() -> dict:
    probe = _probe()
    obj = _object(96, 1)
    amplitudes, positions = _scan(obj, probe)
    flat = stitch_patches(np.ones((len(positions), N, N), np.complex64), positions,
                          weights=np.abs(probe) ** 2)
    return {"probe": probe, "truth": obj, "amplitudes": amplitudes, "positions": positions,
            "flat": flat}


def _truth_on(stitched, truth: np.ndarray) -> np.ndarray:
    y, x = stitched.origin_px
    h, w = stitched.obj.shape
    return truth[y : y + h, x : x + w]


def _aligned_error(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Relative complex error after the best global complex factor."""
    e, t = estimate[mask], truth[mask]
    factor = np.vdot(e, t) / np.vdot(e, e)
    return float(np.linalg.norm(factor * e - t) / np.linalg.norm(t))


def _refine(case: dict, start: np.ndarray, iterations: int, **kw) -> refine_module.Refined:
    flat = case["flat"]
    return refine_object(start, flat.weight, flat.origin_px, case["amplitudes"],
                         kw.pop("probe", case["probe"]), case["positions"],
                         RefineOptions(iterations, **kw))


@pytest.mark.parametrize("shift", ["object", "probe"])
def test_refinement_recovers_the_object_from_a_flat_start_at_fractional_positions(case, shift):
    flat = case["flat"]
    truth = _truth_on(flat, case["truth"])
    mask = flat.weight > 0.3 * flat.weight.max()
    before = _aligned_error(flat.obj, truth, mask)
    refined = _refine(case, flat.obj, 150, shift=shift)
    after = _aligned_error(refined.obj, truth, mask)
    assert before > 0.15
    assert after < 0.1 * before, (before, after)
    assert refined.r_factor[-1] < 0.05 * refined.r_factor[0]
    # the per-pattern figures are the whole-scan ones, pattern by pattern
    assert np.median(refined.pattern_r_end) < 0.05 * np.median(refined.pattern_r_start)
    assert refined.obj.shape == flat.obj.shape
    assert np.all(refined.obj[flat.weight <= 0] == 0)


@pytest.mark.parametrize("shift, r_at_truth", [("object", 6e-3), ("probe", 2e-3)])
def test_the_true_object_is_a_fixed_point(case, shift, r_at_truth):
    """Where the probe shift needs only the visited pixels, the object shift also reads
    MARGIN px beyond them (there the start is the fill value, not the truth: the edge
    patterns' misfit); inside, the truth stays put either way."""
    flat = case["flat"]
    truth = _truth_on(flat, case["truth"]).astype(np.complex64)
    refined = _refine(case, truth, 10, shift=shift)
    mask = flat.weight > 0.3 * flat.weight.max()
    assert refined.r_factor[0] < r_at_truth
    assert refined.r_factor[-1] < r_at_truth
    assert _aligned_error(refined.obj, truth, mask) < 2e-3
    assert refined.scale == pytest.approx(1.0, rel=1e-3)


def test_a_probe_in_other_units_is_scaled_to_the_measurements(case):
    flat = case["flat"]
    truth = _truth_on(flat, case["truth"]).astype(np.complex64)
    refined = _refine(case, truth, 0, probe=case["probe"] * 7.0)
    assert refined.scale == pytest.approx(1 / 7.0, rel=1e-3)
    assert refined.r_factor == pytest.approx([refined.r_factor[0]])
    assert refined.r_factor[0] < 6e-3


def test_a_better_start_gets_further_in_the_same_iterations(case):
    """What a network's estimate is worth: a blurred copy of the truth (what a network
    gives) reaches a lower misfit in 10 iterations than a flat start does."""
    flat = case["flat"]
    truth = _truth_on(flat, case["truth"])
    k = np.fft.fftfreq(truth.shape[0])[:, None] ** 2 + np.fft.fftfreq(truth.shape[1])[None] ** 2
    blurred = np.fft.ifft2(np.fft.fft2(truth) * np.exp(-k / (2 * 0.06**2))).astype(np.complex64)
    from_blurred = _refine(case, blurred, 10, tolerance=0.0)
    from_flat = _refine(case, flat.obj, 10, tolerance=0.0)
    assert from_blurred.r_factor[0] < from_flat.r_factor[0]
    assert from_blurred.r_factor[-1] < 0.5 * from_flat.r_factor[-1]


@pytest.mark.parametrize("shift", ["object", "probe"])
def test_chunking_memory_map_and_probe_cache_do_not_change_the_result(case, tmp_path,
                                                                        monkeypatch, shift):
    flat = case["flat"]
    reference = _refine(case, flat.obj, 5, shift=shift)
    np.save(tmp_path / "a.npy", case["amplitudes"])
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    monkeypatch.setattr(refine_module, "CHUNK", 7)
    monkeypatch.setattr(refine_module, "PROBE_CACHE_BYTES", 0)
    streamed = refine_object(flat.obj, flat.weight, flat.origin_px, mapped, case["probe"],
                             case["positions"], RefineOptions(5, shift=shift))
    assert np.allclose(streamed.obj, reference.obj, atol=1e-5)
    assert streamed.r_factor == pytest.approx(reference.r_factor, rel=1e-5)


def test_momentum_speeds_the_descent(case):
    flat = case["flat"]
    plain = _refine(case, flat.obj, 30, momentum=0.0, tolerance=0.0)
    fast = _refine(case, flat.obj, 30, tolerance=0.0)
    assert fast.r_factor[-1] < 0.5 * plain.r_factor[-1]


def test_shifted_probe_moves_the_probe_by_its_fraction():
    probe = _probe()
    moved = shifted_probes(probe, np.array([[0.0, 1.0], [0.5, 0.0]]))
    assert np.allclose(moved[0], np.roll(probe, 1, axis=1), atol=1e-5)
    # a half-pixel shift puts the centre of mass half a pixel further down
    rows = np.arange(N)[:, None]
    com = [float((np.abs(p) ** 2 * rows).sum() / (np.abs(p) ** 2).sum()) for p in (probe,
                                                                                    moved[1])]
    assert com[1] - com[0] == pytest.approx(0.5, abs=1e-3)


def _tiny_geometry(shift: str, whole_pixel: bool = False):
    """8 px patterns on a 24 px object at fractional (or rounded) positions."""
    n = 8
    probe = _probe(n)
    rng = np.random.default_rng(3)
    positions = rng.uniform(n / 2 + 1, 24 - n / 2 - 1, (9, 2))
    if whole_pixel:
        positions = np.round(positions)
    return refine_module.GEOMETRIES[shift](probe, positions, (0, 0), n + 2), (24 + 2 * (n + 2),) * 2


@pytest.mark.parametrize("shift", ["object", "probe"])
def test_each_convention_scatters_with_the_exact_adjoint(shift):
    """<A x, y> = <x, A^H y>: the update is the gradient of the misfit it reports."""
    geometry, shape = _tiny_geometry(shift)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    y = (rng.standard_normal((geometry.m, 8, 8))
         + 1j * rng.standard_normal((geometry.m, 8, 8))).astype(np.complex64)
    forward = np.vdot(geometry.exit_waves(x, 0, geometry.m), y)
    back = np.zeros(shape, np.complex64)
    geometry.scatter(back, y, 0)
    assert abs(forward - np.vdot(x, back)) < 1e-5 * abs(forward)


def test_the_object_shift_moves_the_object_by_each_fraction():
    """On a wave whose period divides the window, the cut window, shifted, is the object
    sampled at the fractional position; at whole pixels it is the plain cut."""
    geometry, shape = _tiny_geometry("object")
    window = 8 + 2 * refine_module.MARGIN
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    fy, fx = 3 / window, -5 / window
    canvas = np.exp(2j * np.pi * (fy * yy + fx * xx)).astype(np.complex64)
    patches = geometry.patches(canvas, 0, geometry.m)
    ii = np.arange(8)
    for patch, (y, x), (dy, dx) in zip(patches, geometry.corner, geometry.frac, strict=True):
        expected = np.exp(2j * np.pi * (fy * (y + dy + ii[:, None]) + fx * (x + dx + ii[None])))
        assert np.abs(patch - expected).max() < 1e-4, (dy, dx)
    whole, _ = _tiny_geometry("object", whole_pixel=True)
    assert whole.diagonal
    cut = whole.patches(canvas, 0, 1)[0]
    y, x = whole.corner[0]
    assert np.array_equal(cut, canvas[y : y + 8, x : x + 8])


@pytest.mark.parametrize("shift, whole_pixel", [("object", False), ("object", True),
                                                ("probe", False)])
def test_the_step_comes_from_the_largest_eigenvalue(shift, whole_pixel):
    """The power iteration's estimate matches the dense preconditioned curvature's largest
    eigenvalue (from below, within 10 %), so the step 1 / lambda keeps the update stable."""
    geometry, shape = _tiny_geometry(shift, whole_pixel)
    lit = geometry.illumination(shape)
    inverse = (1.0 / (lit + refine_module.ALPHA * lit.max())).astype(np.float32)
    size = shape[0] * shape[1]
    columns = []
    for i in range(size):
        e = np.zeros(size, np.complex64)
        e[i] = 1
        columns.append((inverse * geometry.normal(e.reshape(shape))).ravel())
    dense = np.max(np.abs(np.linalg.eigvals(np.stack(columns, axis=1))))
    estimate = refine_module.largest_step_eigenvalue(geometry, inverse, lit, iterations=60)
    assert 0.9 * dense <= estimate <= dense * (1 + 1e-4)
    if shift == "object" and not whole_pixel:
        # the fractional shift spreads near-Nyquist content from dim pixels into bright
        # ones: more curvature than the illumination alone says (the reason for the power
        # iteration)
        assert dense > 1.0 / (1 + refine_module.ALPHA) + 0.05
    else:
        assert dense == pytest.approx(1.0 / (1 + refine_module.ALPHA), rel=1e-4)


def test_it_stops_once_converged_and_says_so(case):
    """On noisy counts (1e5 photons per pattern) the misfit levels off at the noise; on
    noise-free data it would fall for ever."""
    flat = case["flat"]
    amplitudes = case["amplitudes"].astype(np.float64)
    per_photon = 1e5 / (amplitudes**2).sum(axis=(1, 2)).mean()
    counts = np.random.default_rng(5).poisson(amplitudes**2 * per_photon)
    case = {**case, "amplitudes": np.sqrt(counts / per_photon).astype(np.float32)}
    stopped = _refine(case, flat.obj, 400)
    assert 10 < stopped.iterations < 400
    assert stopped.stopped.startswith("converged")
    r = stopped.r_factor
    assert min(r[-5:]) > min(r[:-5]) * (1 - 1e-3)  # the rule, as documented
    assert min(r[-6:-1]) <= min(r[:-6]) * (1 - 1e-3)  # and not one iteration earlier
    full = _refine(case, flat.obj, stopped.iterations + 20, tolerance=0.0)
    assert full.iterations == stopped.iterations + 20
    assert full.stopped == "ran the iterations asked"
    # what the early stop leaves on the table: under 1 % of the misfit
    assert full.r_factor[-1] > stopped.r_factor[-1] * (1 - 0.01)


@pytest.mark.parametrize("options, match", [
    (RefineOptions(-1), "iterations"), (RefineOptions(True), "iterations"),
    (RefineOptions(5, momentum=1.0), "momentum"), (RefineOptions(5, alpha=0.0), "alpha"),
    (RefineOptions(5, tolerance=-0.1), "tolerance"), (RefineOptions(5, window=0), "window"),
    (RefineOptions(5, shift="pixel"), "shift")])
def test_bad_options_are_refused(case, options, match):
    flat = case["flat"]
    with pytest.raises(ValueError, match=match):
        refine_object(flat.obj, flat.weight, flat.origin_px, case["amplitudes"],
                      case["probe"], case["positions"], options)


def test_dark_measurements_are_refused_not_divided_by(case):
    flat = case["flat"]
    with pytest.raises(ValueError, match="no light"):
        refine_object(flat.obj, flat.weight, flat.origin_px,
                      np.zeros_like(case["amplitudes"]), case["probe"], case["positions"],
                      RefineOptions(3))


# --------------------------------------------------------------------- ptycho-run --refine


@pytest.fixture(scope="module")
def exported(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("refine") / "art"
    export_bundle(trained_bundle, out, ExportOptions(formats=["onnx"], command="test"))
    return out


def test_run_refine_scores_both_objects_and_keeps_the_networks(exported, trained_bundle,
                                                                tmp_path):
    from runtime.run import run_scan

    scan = trained_bundle.parent / "scan.npz"
    plain = run_scan(exported, scan, tmp_path / "plain", provider="cpu", progress=False)
    report = run_scan(exported, scan, tmp_path / "refined", provider="cpu", progress=False,
                      refine=40)
    assert plain["refine"] == {"iterations": 0} and plain["quality_network"] is None
    assert report["refine"]["max_iterations"] == 40
    r = report["refine"]["r_factor"]
    assert len(r["curve"]) == report["refine"]["iterations"] + 1
    assert r["end"] < 0.7 * r["start"]
    network, refined = report["quality_network"]["model"], report["quality"]["model"]
    # the network's figures are the plain run's, the refined ones better
    assert network["phase_corr"] == pytest.approx(plain["quality"]["model"]["phase_corr"])
    assert refined["phase_corr"] > network["phase_corr"] + 0.05
    assert refined["complex_nrmse"] < 0.7 * network["complex_nrmse"]
    saved = np.load(tmp_path / "refined" / "object.npz")
    assert np.array_equal(saved["network_object"],
                          np.load(tmp_path / "plain" / "object.npz")["object"])
    assert not np.allclose(saved["object"], saved["network_object"])
    assert "refine" in json.loads((tmp_path / "refined" / "report.json").read_text())["seconds"]


def test_run_refuses_negative_refine(exported, trained_bundle, tmp_path):
    from runtime.run import RunUsageError, run_scan

    with pytest.raises(RunUsageError, match="--refine"):
        run_scan(exported, trained_bundle.parent / "scan.npz", tmp_path / "o",
                 provider="cpu", progress=False, refine=-2)
    assert not (tmp_path / "o").exists()


def test_cli_refine_prints_both_figures_and_refuses_a_negative_count(exported, trained_bundle,
                                                                     tmp_path):
    from typer.testing import CliRunner

    from cli.run import app

    scan = str(trained_bundle.parent / "scan.npz")
    result = CliRunner().invoke(app, [str(exported), scan, "-o", str(tmp_path / "r"),
                                      "--refine", "12", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "refined 12 iterations in" in result.output
    assert "network alone, vs objectGuess: amplitude SSIM" in result.output
    bad = CliRunner().invoke(app, [str(exported), scan, "-o", str(tmp_path / "b"),
                                   "--refine", "-1"])
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()
