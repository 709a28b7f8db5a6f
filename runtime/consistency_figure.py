"""consistency.png: where in the scan the reconstruction disagrees with its measurements.

Left panel: the stitched amplitude in grey, with one dot per pattern at its scan position,
coloured by that pattern's amplitude R-factor (runtime.consistency) on a sequential scale
with its colour bar; outliers (the report's robust rule) get a red ring. Right panel: the
histogram of the R-factor, with the outlier threshold (red) and, when the artifact carries
the training scan's figures, the training median and 95th percentile (blue): a scan whose
histogram sits to the right of the blue lines is not what the model was trained on.

Pure numpy + Pillow, like runtime.images: no matplotlib, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.images import (
    amplitude_rgb,
    label_font,
    save_comparison_png,
    tick_labels,
    upscale_nearest,
    with_colorbar,
)

# Anchor colours of a perceptually ordered dark-blue -> green -> yellow scale
# (values read off the viridis colour map); interpolated to 256 entries.
_SEQUENTIAL_ANCHORS = np.array([
    [68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
OUTLIER_RGB = (230, 30, 30)
REFERENCE_RGB = (40, 90, 220)


def sequential_lut(size: int = 256) -> np.ndarray:
    """(size, 3) uint8, low values dark blue, high values yellow."""
    x = np.linspace(0.0, 1.0, size)
    anchors = np.linspace(0.0, 1.0, len(_SEQUENTIAL_ANCHORS))
    rgb = np.stack([np.interp(x, anchors, _SEQUENTIAL_ANCHORS[:, c]) for c in range(3)], 1)
    return np.rint(rgb).astype(np.uint8)


SEQUENTIAL_LUT = sequential_lut()


def colour_range(r_factor: np.ndarray, threshold: float) -> tuple[float, float]:
    """(lo, hi) of the dot colours: the 1st percentile to the larger of the 99th percentile
    and the outlier threshold, so an outlier is always at the bright end."""
    finite = r_factor[np.isfinite(r_factor)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.0])
    if np.isfinite(threshold):
        hi = max(hi, threshold)
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def residual_map(amplitude: np.ndarray, well_lit: np.ndarray, origin_px: tuple[int, int],
                 positions_px: np.ndarray, r_factor: np.ndarray, outliers: np.ndarray,
                 threshold: float, upscale_to: int = 512) -> np.ndarray:
    """The left panel with its colour bar: (H, W, 3) uint8."""
    grey = upscale_nearest(amplitude_rgb(amplitude, well_lit), upscale_to)
    factor = grey.shape[0] / amplitude.shape[0]
    lo, hi = colour_range(r_factor, threshold)
    image = Image.fromarray(grey)
    draw = ImageDraw.Draw(image)
    radius = max(2.0, 0.012 * grey.shape[0])
    yx = (np.asarray(positions_px, float) - np.asarray(origin_px, float)) * factor
    level = np.clip((r_factor - lo) / (hi - lo), 0.0, 1.0)
    for (y, x), value in zip(yx, level, strict=True):
        colour = ((128, 128, 128) if not np.isfinite(value)
                  else tuple(int(c) for c in SEQUENTIAL_LUT[int(round(value * 255))]))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    ring = 2.2 * radius
    for i in np.asarray(outliers, dtype=np.int64):
        y, x = yx[i]
        draw.ellipse((x - ring, y - ring, x + ring, y + ring), outline=OUTLIER_RGB,
                     width=max(2, int(radius / 2)))
    fractions = np.linspace(0.0, 1.0, 5)
    ticks = list(zip(fractions.tolist(), tick_labels(lo + fractions * (hi - lo)), strict=True))
    return with_colorbar(np.asarray(image), SEQUENTIAL_LUT, ticks, "R-factor",
                         note="red rings:\noutliers")


def histogram_panel(r_factor: np.ndarray, threshold: float,
                    reference: dict[str, Any] | None, height: int = 512,
                    width: int = 560, bins: int = 40) -> np.ndarray:
    """The right panel: R-factor histogram with the threshold and training lines."""
    finite = r_factor[np.isfinite(r_factor)]
    marks = [v for v in (threshold, *(reference or {}).values()) if np.isfinite(v)]
    top = max([float(finite.max()) if finite.size else 1.0, *marks]) * 1.05
    counts, edges = np.histogram(finite, bins=bins, range=(0.0, top if top > 0 else 1.0))
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    size = int(np.clip(height // 30, 11, 22))
    font = label_font(size)
    scalable = isinstance(font, ImageFont.FreeTypeFont)
    left, right, upper, lower = 60, width - 45, 40 + 3 * (size + 4), height - 60
    ink = (0, 0, 0)

    def text(xy: tuple[float, float], words: str, fill: tuple[int, int, int] = ink,
             anchor: str = "la") -> None:
        # the bitmap fallback font takes no anchor: place it at the point instead
        draw.text(xy, words, fill=fill, font=font, anchor=anchor if scalable else None)

    def x_of(value: float) -> float:
        return left + (right - left) * value / edges[-1]

    peak = max(int(counts.max()) if counts.size else 1, 1)
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if count:
            y = lower - (lower - upper) * count / peak
            draw.rectangle((x_of(a), y, x_of(b) - 1, lower), fill=(120, 120, 120))
    draw.line((left, lower, right, lower), fill=ink)
    draw.line((left, upper, left, lower), fill=ink)
    for value, label in zip(np.linspace(0, edges[-1], 5),
                            tick_labels(np.linspace(0, edges[-1], 5)), strict=True):
        draw.line((x_of(value), lower, x_of(value), lower + 5), fill=ink)
        text((x_of(value), lower + 8), label, anchor="ma")
    text(((left + right) / 2, lower + 30), "amplitude R-factor per pattern", anchor="ma")
    text((left - 8, upper), str(peak), anchor="ra")
    text((left - 8, lower), "0", anchor="rs")
    legend = [(OUTLIER_RGB, f"outlier threshold {threshold:.3f}")]
    if np.isfinite(threshold):
        draw.line((x_of(threshold), upper, x_of(threshold), lower), fill=OUTLIER_RGB, width=2)
    for name, value in (reference or {}).items():
        if np.isfinite(value):
            x = x_of(value)
            for y in range(upper, lower, 10):  # dashed
                draw.line((x, y, x, min(y + 5, lower)), fill=REFERENCE_RGB, width=2)
            legend.append((REFERENCE_RGB, f"training {name} {value:.3f}"))
    for i, (colour, words) in enumerate(legend):
        text((right, 8 + i * (size + 4)), words, fill=colour, anchor="ra")
    return np.asarray(image)


def save_consistency_png(path: str | os.PathLike[str], amplitude: np.ndarray,
                         well_lit: np.ndarray, origin_px: tuple[int, int],
                         positions_px: np.ndarray, r_factor: np.ndarray,
                         report: dict[str, Any]) -> Path:
    """Write consistency.png from the run's consistency section and per-pattern values."""
    outliers = np.array([o["pattern"] for o in report.get("outlier_patterns", [])], np.int64)
    threshold = float(report.get("outlier_threshold", float("nan")))
    ref = ((report.get("reference") or {}).get("r_factor") or {})
    reference = {k: float(ref[k]) for k in ("median", "p95") if k in ref}
    left = residual_map(amplitude, well_lit, origin_px, positions_px, r_factor, outliers,
                        threshold)
    right = histogram_panel(r_factor, threshold, reference or None, height=left.shape[0])
    median = report.get("r_factor", {}).get("median", float("nan"))
    return save_comparison_png(path, [
        (f"R-factor at each scan position (median {median:.3f}, "
         f"{report.get('outliers', 0)} outliers)", left),
        ("R-factor histogram", right),
    ])
