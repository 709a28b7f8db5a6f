"""PNG output: sizes, cyclic phase colours, unvisited colour, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.images import (
    PHASE_LUT,
    UNVISITED_RGB,
    amplitude_rgb,
    phase_rgb,
    save_comparison_png,
    save_object_pngs,
    save_png,
    upscale_nearest,
)


def _obj(h: int = 40, w: int = 60) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((1 + yy / h) * np.exp(1j * (xx / w * 2 * np.pi - np.pi))).astype(np.complex64)


def test_save_object_pngs_upscaled(tmp_path) -> None:
    obj = _obj()
    mask = np.ones(obj.shape, dtype=bool)
    paths = save_object_pngs(tmp_path / "out", obj, mask, prefix="recon", upscale_to=100)
    assert [p.name for p in paths] == ["recon_amplitude.png", "recon_phase.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (60 * 3, 40 * 3)  # factor ceil(100 / 40) = 3, (W, H)
    # Never downscale, and an already large image is left alone.
    assert upscale_nearest(np.zeros((600, 700, 3), np.uint8), 512).shape == (600, 700, 3)


def test_phase_lut_is_cyclic() -> None:
    phi = np.array([[-np.pi, np.pi, 0.0, np.pi - 1e-9]])
    rgb = phase_rgb(phi).astype(int)
    assert np.abs(rgb[0, 0] - rgb[0, 1]).max() <= 1
    assert np.abs(rgb[0, 0] - rgb[0, 3]).max() <= 3  # one LUT step across the wrap
    assert np.abs(rgb[0, 0] - rgb[0, 2]).max() > 50
    lut = PHASE_LUT.astype(int)
    steps = np.abs(np.diff(np.vstack([lut, lut[:1]]), axis=0)).max()
    assert steps <= 3  # smooth all the way round, including last -> first


def test_unvisited_colour() -> None:
    obj = _obj()
    mask = np.ones(obj.shape, dtype=bool)
    mask[5:10, 7:20] = False
    for rgb in (amplitude_rgb(np.abs(obj), mask), phase_rgb(np.angle(obj), mask)):
        assert rgb.dtype == np.uint8 and rgb.shape == (*obj.shape, 3)
        assert (rgb[~mask] == UNVISITED_RGB).all()
        assert not (rgb[mask] == UNVISITED_RGB).all(axis=-1).any()


def test_amplitude_robust_range() -> None:
    a = np.tile(np.linspace(0.0, 1.0, 100), (10, 1))
    a[0, 0] = 1e6  # one hot pixel must not wash the image out
    rgb = amplitude_rgb(a)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert rgb[5, 50, 0] in range(110, 146)
    assert rgb[5, 0, 0] == 0 and rgb[5, 99, 0] == 255


def test_save_png_atomic(tmp_path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    path = save_png(tmp_path / "a.png", rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    with pytest.raises(ValueError):
        save_png(tmp_path / "b.png", rgb.astype(np.float32))
    # A failure during encoding leaves neither the target nor a temporary file behind.
    with pytest.raises((OSError, ValueError, TypeError)):
        save_png(tmp_path / "c.png", np.zeros((0, 5, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    with Image.open(path) as im:
        assert im.size == (5, 4)


def test_comparison_png(tmp_path) -> None:
    obj = _obj()
    recon = phase_rgb(np.angle(obj))
    truth = phase_rgb(np.angle(obj))[:30]
    path = save_comparison_png(tmp_path / "cmp.png", [("recon", recon), ("truth", truth)])
    with Image.open(path) as im:
        w, h = im.size
    assert w >= 2 * 60 and h > 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png"]
