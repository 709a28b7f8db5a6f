"""PNG images of complex objects that a scientist can read (numpy + Pillow, no torch).

Amplitude is grey with a robust (1st-99th percentile) range so a few hot pixels do not
wash the image out. Phase uses a cyclic colour map, because phase wraps: -pi and +pi are
the same value and must get the same colour, or every wrap would draw a false edge.
Unvisited pixels get one fixed dark blue-grey, distinct from any grey level and from the
phase map's colours, so "not scanned" never reads as "zero".
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PHASE_LUT",
    "UNVISITED_RGB",
    "amplitude_rgb",
    "phase_rgb",
    "save_comparison_png",
    "save_object_pngs",
    "save_png",
    "upscale_nearest",
]

UNVISITED_RGB: tuple[int, int, int] = (32, 32, 48)
_MAX_UPSCALED_SIDE = 8192  # keeps a very elongated image from becoming enormous


def _phase_lut(size: int = 256) -> np.ndarray:
    """Cyclic LUT from smooth sinusoids: a hue wheel, lighter at phase 0, darker at +-pi.

    Entry k is the colour at the centre of bin k, phase -pi + 2*pi*(k + 0.5)/size; every
    term is periodic in the phase, so the colour is continuous across the wrap.
    """
    theta = -np.pi + 2.0 * np.pi * (np.arange(size) + 0.5) / size
    lightness = 0.5 + 0.2 * np.cos(theta)
    shifts = np.array([0.0, 2.0 * np.pi / 3.0, 4.0 * np.pi / 3.0])
    rgb = lightness[:, None] + 0.28 * np.cos(theta[:, None] - shifts[None, :])
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


PHASE_LUT: np.ndarray = _phase_lut()


def _valid_mask(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Pixels to colour: inside ``mask`` (if given) and finite."""
    valid = np.isfinite(values)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {mask.shape} does not match image {values.shape}")
        valid &= mask
    return valid


def amplitude_rgb(a: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Grey (H, W, 3) uint8 of an amplitude, scaled over its 1st-99th percentile in mask.

    A complex input is reduced to its modulus. Pixels outside ``mask`` (or not finite)
    get UNVISITED_RGB.
    """
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"amplitude must be 2-D, got shape {a.shape}")
    a = np.abs(a) if np.iscomplexobj(a) else a.astype(np.float64)
    valid = _valid_mask(a, mask)
    rgb = np.empty((*a.shape, 3), dtype=np.uint8)
    rgb[...] = UNVISITED_RGB
    if valid.any():
        lo, hi = np.percentile(a[valid], [1.0, 99.0])
        span = hi - lo if hi > lo else 1.0
        grey = np.rint(np.clip((a[valid] - lo) / span, 0.0, 1.0) * 255.0).astype(np.uint8)
        rgb[valid] = grey[:, None]
    return rgb


def phase_rgb(phi: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Cyclic-colour (H, W, 3) uint8 of a phase in radians (any range; wrapped mod 2pi).

    A complex input is reduced to its angle. Pixels outside ``mask`` (or not finite) get
    UNVISITED_RGB.
    """
    phi = np.asarray(phi)
    if phi.ndim != 2:
        raise ValueError(f"phase must be 2-D, got shape {phi.shape}")
    phi = np.angle(phi) if np.iscomplexobj(phi) else phi.astype(np.float64)
    valid = _valid_mask(phi, mask)
    size = len(PHASE_LUT)
    idx = np.floor((phi[valid] + np.pi) * (size / (2.0 * np.pi))).astype(np.int64) % size
    rgb = np.empty((*phi.shape, 3), dtype=np.uint8)
    rgb[...] = UNVISITED_RGB
    rgb[valid] = PHASE_LUT[idx]
    return rgb


def upscale_nearest(rgb: np.ndarray, upscale_to: int) -> np.ndarray:
    """Nearest-neighbour enlarge by an integer factor so the short side is >= upscale_to.

    Integer factors keep every object pixel a crisp square of equal size; images that are
    already large enough are returned as they are (never downscaled).
    """
    h, w = rgb.shape[:2]
    short, long_ = min(h, w), max(h, w)
    if upscale_to <= 0 or short == 0 or short >= upscale_to:
        return rgb
    factor = math.ceil(upscale_to / short)
    factor = max(1, min(factor, _MAX_UPSCALED_SIDE // long_))
    if factor == 1:
        return rgb
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 image as PNG atomically.

    The image goes to a temporary file in the same directory and is then moved into
    place with os.replace, so a reader never sees a half-written PNG; the temporary file
    is removed if anything fails.
    """
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"expected uint8 (H, W, 3) or (H, W), got {rgb.dtype} {rgb.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.ascontiguousarray(rgb)).save(fh, format="PNG")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def save_object_pngs(
    outdir: str | os.PathLike[str],
    obj_complex: np.ndarray,
    mask: np.ndarray | None = None,
    prefix: str = "object",
    upscale_to: int = 512,
) -> list[Path]:
    """Write ``{prefix}_amplitude.png`` and ``{prefix}_phase.png``; return their paths.

    Small objects are enlarged (integer nearest-neighbour factor) so the short side is at
    least ``upscale_to`` pixels and stays legible in an image viewer.
    """
    outdir = Path(outdir)
    obj = np.asarray(obj_complex)
    amp = upscale_nearest(amplitude_rgb(np.abs(obj), mask), upscale_to)
    pha = upscale_nearest(phase_rgb(np.angle(obj), mask), upscale_to)
    return [
        save_png(outdir / f"{prefix}_amplitude.png", amp),
        save_png(outdir / f"{prefix}_phase.png", pha),
    ]


def save_comparison_png(
    path: str | os.PathLike[str],
    panels: list[tuple[str, np.ndarray]],
    *,
    gap: int = 8,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Path:
    """Place (title, (H, W, 3) uint8) panels side by side, each titled, in one PNG.

    Meant for reconstruction vs ground truth; panels of unequal height are top-aligned.
    """
    if not panels:
        raise ValueError("no panels to compare")
    images = []
    for title, rgb in panels:
        arr = np.asarray(rgb)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"panel {title!r}: expected uint8 (H, W, 3), got {arr.shape}")
        images.append((str(title), Image.fromarray(np.ascontiguousarray(arr))))

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t, _ in images)
    title_h = int(text_h) + 2 * gap

    width = sum(im.width for _, im in images) + gap * (len(images) + 1)
    height = title_h + max(im.height for _, im in images) + gap
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for title, im in images:
        text_w = draw.textbbox((0, 0), title, font=font)[2]
        draw.text((x + max(0, (im.width - text_w) // 2), gap), title, fill=(0, 0, 0), font=font)
        canvas.paste(im, (x, title_h))
        x += im.width + gap
    return save_png(path, np.asarray(canvas))
