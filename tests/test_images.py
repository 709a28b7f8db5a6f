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


# --------------------------------------------------------------------------- colour bars


def test_figures_add_a_labelled_bar_beside_the_image() -> None:
    from runtime.images import amplitude_figure, phase_figure, upscale_nearest

    obj = _obj()
    mask = np.ones(obj.shape, dtype=bool)
    mask[:4] = False
    for figure, plain in ((amplitude_figure, amplitude_rgb), (phase_figure, phase_rgb)):
        out = figure(obj, mask, 512)
        image = upscale_nearest(plain(obj, mask), 512)
        assert out.dtype == np.uint8 and out.shape[0] == image.shape[0] >= 512
        assert out.shape[1] > image.shape[1] + 60  # room for bar and labels
        np.testing.assert_array_equal(out[:, : image.shape[1]], image)  # image untouched
        side = out[:, image.shape[1]:].reshape(-1, 3)
        assert (side == 0).all(axis=1).any()  # black label text
        assert (side == UNVISITED_RGB).all(axis=1).any()  # the "not lit" swatch
    # The phase bar shows the cyclic LUT itself; the amplitude bar runs black to white.
    phase_side = phase_figure(obj, mask)[:, 600:].reshape(-1, 3)
    lut_rows = {tuple(c) for c in PHASE_LUT[::16].tolist()}
    assert len(lut_rows & {tuple(c) for c in phase_side.tolist()}) >= len(lut_rows) - 1
    amp_side = amplitude_figure(obj, mask)[:, 600:]
    greys = amp_side[(amp_side[..., 0] == amp_side[..., 1]) & (amp_side[..., 1] ==
                                                                amp_side[..., 2])][:, 0]
    assert len(np.unique(greys)) > 200


def test_tick_labels_resolve_the_step() -> None:
    from runtime.images import tick_labels

    assert tick_labels(np.linspace(0.2325, 0.48, 5)) == ["0.233", "0.294", "0.356", "0.418",
                                                          "0.480"]
    assert tick_labels(np.linspace(0.95, 1.05, 3)) == ["0.950", "1.000", "1.050"]
    assert tick_labels(np.linspace(0.0, 2e-6, 3)) == ["0", "1.00e-6", "2.00e-6"]
    assert tick_labels(np.array([120.0, 3000.0])) == ["120", "3000"]


def test_pi_falls_back_to_ascii_without_the_glyph() -> None:
    from PIL import ImageFont

    from runtime.images import pi_symbol

    assert pi_symbol(ImageFont.load_default()) in ("pi", "\u03c0")
    bitmap = ImageFont.load_default(16)  # Pillow's built-in font has no Greek
    assert pi_symbol(bitmap) == "pi"


def test_figure_with_nothing_lit_and_a_flat_amplitude() -> None:
    from runtime.images import amplitude_figure, phase_figure

    obj = np.ones((20, 20), np.complex64)
    assert amplitude_figure(obj, np.zeros(obj.shape, bool)).shape[0] >= 512
    assert amplitude_figure(obj).shape[0] >= 512  # flat: one tick, no division by zero
    assert phase_figure(obj, upscale_to=0).shape[0] >= 20


def test_weak_phase_is_drawn_linearly_and_strong_phase_on_the_wheel():
    from runtime.images import DIVERGING_LUT, phase_display, phase_figure, phase_rgb

    yy = np.linspace(-0.6, 0.6, 64)[:, None] * np.ones((1, 64))
    weak = np.exp(1j * (yy + 2.0))  # +-0.6 rad about a mean of 2 rad
    centre, half = phase_display(weak)
    assert centre == pytest.approx(2.0, abs=1e-3) and half == pytest.approx(0.6, rel=0.05)
    rgb = phase_rgb(weak, linear=(centre, half))
    # bottom row (-0.6 about the mean) blue end, top row red end, middle near white
    assert tuple(rgb[0, 0]) == tuple(DIVERGING_LUT[0])
    assert tuple(rgb[-1, 0]) == tuple(DIVERGING_LUT[-1])
    assert rgb[32, 0].min() > 200
    strong = np.exp(1j * 3.0 * yy / 0.6)  # +-3 rad: wraps, the wheel is right
    assert phase_display(strong) is None
    assert phase_figure(weak, upscale_to=64).shape[0] >= 64


def test_shared_amplitude_range_keeps_lost_contrast_visible():
    from runtime.images import amplitude_rgb

    truth = np.linspace(0.5, 1.0, 100).reshape(10, 10)
    flat_recon = 0.75 + 0.1 * (truth - 0.75)  # a fifth of the contrast came back
    own = amplitude_rgb(flat_recon)
    shared = amplitude_rgb(flat_recon, value_range=(0.5, 1.0))
    assert int(own.max()) - int(own.min()) > 240  # own scale stretches it to full contrast
    assert int(shared.max()) - int(shared.min()) < 60  # the shared scale shows the loss
