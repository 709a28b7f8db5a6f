"""consistency.png: dots coloured by R-factor at the scan positions, outliers ringed, and
the histogram with the threshold and the training lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from runtime.consistency_figure import (
    OUTLIER_RGB,
    REFERENCE_RGB,
    SEQUENTIAL_LUT,
    colour_range,
    histogram_panel,
    residual_map,
    save_consistency_png,
)


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    amplitude = np.full((64, 64), 0.8)
    well_lit = np.ones((64, 64), bool)
    positions = np.array([[10.0, 10.0], [10.0, 50.0], [50.0, 10.0], [50.0, 50.0]]) + 100
    r_factor = np.array([0.10, 0.12, 0.11, 0.60])
    return amplitude, well_lit, positions, r_factor


def test_dots_take_the_colour_of_their_r_factor_and_outliers_are_ringed() -> None:
    amplitude, well_lit, positions, r = _case()
    rgb = residual_map(amplitude, well_lit, (100, 100), positions, r, np.array([3]),
                       threshold=0.3, upscale_to=512)
    factor = 512 // 64
    lo, hi = colour_range(r, 0.3)
    for (y, x), value in zip(positions - 100, r, strict=True):
        pixel = rgb[int(y * factor), int(x * factor)]
        expected = SEQUENTIAL_LUT[int(round(np.clip((value - lo) / (hi - lo), 0, 1) * 255))]
        assert np.array_equal(pixel, expected), (value, pixel, expected)
    # the outlier's ring: red pixels around (50, 50), none around the first dot
    def red_near(y: float, x: float) -> int:
        box = rgb[int(y * factor) - 20 : int(y * factor) + 20,
                  int(x * factor) - 20 : int(x * factor) + 20]
        return int(np.all(box == OUTLIER_RGB, axis=-1).sum())
    assert red_near(50, 50) > 20 and red_near(10, 10) == 0
    assert rgb.shape[1] > 512  # the colour bar beside the image


def test_colour_range_keeps_the_threshold_at_the_bright_end() -> None:
    lo, hi = colour_range(np.array([0.1, 0.2, 0.15]), threshold=0.5)
    assert lo < 0.11 and hi == 0.5
    assert colour_range(np.array([np.nan]), 0.2) == (0.0, 1.0)


def test_histogram_draws_threshold_and_training_lines() -> None:
    r = np.random.default_rng(0).normal(0.2, 0.02, 500)
    image = histogram_panel(r, 0.3, {"median": 0.1, "p95": 0.15}, height=400, width=500)
    red_columns = np.flatnonzero(np.all(image == OUTLIER_RGB, axis=-1).sum(axis=0) > 100)
    blue_columns = np.flatnonzero(np.all(image == REFERENCE_RGB, axis=-1).sum(axis=0) > 50)
    assert red_columns.size and blue_columns.size
    # the threshold (0.3) is drawn right of both training lines (0.1, 0.15)
    assert red_columns.min() > blue_columns.max()


def test_saved_png_has_both_panels(tmp_path: Path) -> None:
    amplitude, well_lit, positions, r = _case()
    report = {"outlier_patterns": [{"pattern": 3}], "outlier_threshold": 0.3, "outliers": 1,
              "r_factor": {"median": 0.115},
              "reference": {"r_factor": {"median": 0.1, "p95": 0.14}}}
    path = save_consistency_png(tmp_path / "consistency.png", amplitude, well_lit, (100, 100),
                                positions, r, report)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] > 1000 and image.shape[0] >= 512
    assert np.all(image == REFERENCE_RGB, axis=-1).sum() > 50
