"""PNG images of complex objects that a scientist can read (numpy + Pillow, no torch).

Amplitude is grey with a robust (1st-99th percentile) range so a few hot pixels do not
wash the image out. Phase uses a cyclic colour map, because phase wraps: -pi and +pi are
the same value and must get the same colour, or every wrap would draw a false edge.
Unvisited pixels get one fixed dark blue-grey, distinct from any grey level and from the
phase map's colours, so "not scanned" never reads as "zero".

:func:`amplitude_figure` and :func:`phase_figure` add a labelled colour bar beside the
image (what ptycho-run writes): amplitude over its 1-99 % display range with its values,
phase as the cyclic bar from -pi to pi in radians, and a swatch of the unlit colour. A
weak phase (spread below 2 rad, which the wheel would show as one hue) is drawn linearly
about its mean with diverging colours instead.
Pillow's own font is used (its built-in scalable font, or DejaVu Sans where installed);
where the font has no "π" glyph the labels say "pi".
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.atomic import write_atomic

__all__ = [
    "DIVERGING_LUT",
    "PHASE_LUT",
    "UNVISITED_RGB",
    "amplitude_figure",
    "amplitude_range",
    "amplitude_rgb",
    "label_font",
    "phase_display",
    "phase_figure",
    "phase_rgb",
    "tick_labels",
    "with_colorbar",
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


def _amplitude(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"amplitude must be 2-D, got shape {a.shape}")
    return np.abs(a) if np.iscomplexobj(a) else a.astype(np.float64)


def amplitude_range(a: np.ndarray, mask: np.ndarray | None = None
                    ) -> tuple[float, float] | None:
    """(lo, hi): the 1st and 99th percentile of the amplitude in ``mask`` (the grey scale's
    black and white), or None when no pixel is valid."""
    a = _amplitude(a)
    valid = _valid_mask(a, mask)
    if not valid.any():
        return None
    lo, hi = np.percentile(a[valid], [1.0, 99.0])
    return float(lo), float(hi)


def amplitude_rgb(a: np.ndarray, mask: np.ndarray | None = None,
                  value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Grey (H, W, 3) uint8 of an amplitude, scaled over its 1st-99th percentile in mask,
    or over ``value_range`` (lo, hi): one shared scale for images to be compared.

    A complex input is reduced to its modulus. Pixels outside ``mask`` (or not finite)
    get UNVISITED_RGB.
    """
    a = _amplitude(a)
    valid = _valid_mask(a, mask)
    rgb = np.empty((*a.shape, 3), dtype=np.uint8)
    rgb[...] = UNVISITED_RGB
    if valid.any():
        lo, hi = value_range if value_range is not None else np.percentile(
            a[valid], [1.0, 99.0])
        span = hi - lo if hi > lo else 1.0
        grey = np.rint(np.clip((a[valid] - lo) / span, 0.0, 1.0) * 255.0).astype(np.uint8)
        rgb[valid] = grey[:, None]
    return rgb


def _diverging_lut(size: int = 256) -> np.ndarray:
    """Blue (negative) - near white (0) - red (positive): for a phase shown linearly."""
    t = np.linspace(-1.0, 1.0, size)
    blue, red = np.array([0.15, 0.3, 0.75]), np.array([0.75, 0.15, 0.15])
    white = np.array([0.96, 0.96, 0.96])
    rgb = np.where(t[:, None] < 0, white + (blue - white) * -t[:, None],
                   white + (red - white) * t[:, None])
    return np.rint(rgb * 255.0).astype(np.uint8)


DIVERGING_LUT: np.ndarray = _diverging_lut()
# A phase whose 1-99 % spread about its circular mean is below this is shown linearly
# (centre +- half-range, diverging colours): on the +-pi wheel +-0.6 rad is one hue.
LINEAR_PHASE_BELOW_RAD = 2.0


def phase_display(phi: np.ndarray, mask: np.ndarray | None = None
                  ) -> tuple[float, float] | None:
    """(centre, half) for a linear display of a weak phase, or None for the cyclic wheel.

    centre: the circular mean over ``mask``; half: the larger |1st|/|99th| percentile of
    the phase about it (at least 0.05 rad)."""
    phi = np.asarray(phi)
    phi = np.angle(phi) if np.iscomplexobj(phi) else phi.astype(np.float64)
    valid = _valid_mask(phi, mask)
    if not valid.any():
        return None
    centre = float(np.angle(np.mean(np.exp(1j * phi[valid]))))
    about = np.angle(np.exp(1j * (phi[valid] - centre)))
    lo, hi = np.percentile(about, [1.0, 99.0])
    if hi - lo >= LINEAR_PHASE_BELOW_RAD:
        return None
    return centre, max(float(max(abs(lo), abs(hi))), 0.05)


def phase_rgb(phi: np.ndarray, mask: np.ndarray | None = None,
              linear: tuple[float, float] | None = None) -> np.ndarray:
    """Cyclic-colour (H, W, 3) uint8 of a phase in radians (any range; wrapped mod 2pi),
    or with ``linear=(centre, half)`` diverging colours over centre +- half (clipped).

    A complex input is reduced to its angle. Pixels outside ``mask`` (or not finite) get
    UNVISITED_RGB.
    """
    phi = np.asarray(phi)
    if phi.ndim != 2:
        raise ValueError(f"phase must be 2-D, got shape {phi.shape}")
    phi = np.angle(phi) if np.iscomplexobj(phi) else phi.astype(np.float64)
    valid = _valid_mask(phi, mask)
    if linear is not None:
        centre, half = linear
        about = np.angle(np.exp(1j * (phi[valid] - centre)))
        size = len(DIVERGING_LUT)
        idx = np.clip(np.rint((about / half + 1.0) / 2.0 * (size - 1)), 0, size - 1)
        rgb = np.empty((*phi.shape, 3), dtype=np.uint8)
        rgb[...] = UNVISITED_RGB
        rgb[valid] = DIVERGING_LUT[idx.astype(np.int64)]
        return rgb
    size = len(PHASE_LUT)
    idx = np.floor((phi[valid] + np.pi) * (size / (2.0 * np.pi))).astype(np.int64) % size
    rgb = np.empty((*phi.shape, 3), dtype=np.uint8)
    rgb[...] = UNVISITED_RGB
    rgb[valid] = PHASE_LUT[idx]
    return rgb


# --------------------------------------------------------------------------- colour bars


def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where the system has it (it has every glyph used here), else Pillow's
    built-in font at ``size`` (scalable with FreeType, a fixed bitmap font without)."""
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _has_glyph(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, char: str) -> bool:
    """False when ``char`` renders as the font's missing-glyph box (or as nothing)."""
    try:
        got = font.getmask(char)
        missing = font.getmask("\ue000")  # private use: no font draws it
    except (UnicodeEncodeError, ValueError, OSError):
        return False
    return got.size != (0, 0) and (got.size != missing.size
                                   or bytes(got) != bytes(missing))


def pi_symbol(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    return "\u03c0" if _has_glyph(font, "\u03c0") else "pi"


def tick_labels(values: np.ndarray) -> list[str]:
    """Labels for evenly spaced tick values: fixed-point with as many decimals as resolve
    the step to two digits (0.480, 0.418, ...), scientific for very large or small values."""
    values = np.asarray(values, dtype=np.float64)
    step = float(np.min(np.abs(np.diff(values)))) if len(values) > 1 else 0.0
    big = float(np.max(np.abs(values))) if len(values) else 0.0
    if step <= 0:
        step = big or 1.0
    if 1e-3 <= big < 1e5 or big == 0:
        decimals = int(np.clip(1 - np.floor(np.log10(step)), 0, 8))
        labels = [f"{v:.{decimals}f}" for v in values]
    else:
        digits = int(np.clip(np.ceil(np.log10(big / step)) + 1, 1, 8))
        labels = [f"{v:.{digits}e}".replace("e-0", "e-").replace("e+0", "e")
                  for v in values]
    return [("0" if float(lab) == 0 else lab) for lab in labels]


def with_colorbar(rgb: np.ndarray, bar: np.ndarray, ticks: list[tuple[float, str]],
                  title: str, *, note: str | None = None,
                  background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The image with a vertical colour bar and its labels to its right, on ``background``.

    ``bar`` is the (K, 3) uint8 colour scale from its low end (drawn at the bottom) to its
    high end (top); ``ticks`` are (fraction 0..1 along the bar, label); ``title`` goes
    above the bar. A swatch of UNVISITED_RGB labelled "not lit" sits under it, and
    ``note`` (e.g. the range's definition) under that. Text is sized to the image height.
    """
    rgb = np.asarray(rgb)
    bar = np.asarray(bar)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if bar.dtype != np.uint8 or bar.ndim != 2 or bar.shape[1] != 3 or len(bar) < 2:
        raise ValueError(f"colour bar must be uint8 (K, 3), got {bar.dtype} {bar.shape}")
    h, w = rgb.shape[:2]
    size = int(np.clip(h // 30, 11, 28))
    font = label_font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return int(right - left), int(bottom - top)

    pad = max(size // 2, 6)
    line = text_size("Ag")[1] + pad // 2
    swatch = max(size, 10)
    note_lines = [] if note is None else note.split("\n")
    top = pad + 2 * line  # title, then half a label's height for the top tick label
    bottom_space = line + swatch + len(note_lines) * line + 2 * pad
    bar_h = max(h - top - bottom_space, 2 * line)
    bar_w = max(size + 4, 14)
    tick_len = max(size // 3, 4)
    label_w = max([text_size(label)[0] for _, label in ticks] + [0])
    side_w = max(bar_w + tick_len + pad // 2 + label_w, text_size(title)[0],
                 swatch + pad // 2 + text_size("not lit")[0],
                 *[text_size(t)[0] for t in note_lines]) + 3 * pad
    height = max(h, top + bar_h + bottom_space)
    canvas = Image.new("RGB", (w + side_w, height), background)
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0)

    x0 = w + 2 * pad  # a white gutter between image and bar
    draw.text((x0, pad), title, fill=ink, font=font)
    # Bar: row r (top = 0) shows the scale at fraction 1 - r / (bar_h - 1).
    frac = 1.0 - np.arange(bar_h) / max(bar_h - 1, 1)
    idx = np.clip(np.rint(frac * (len(bar) - 1)).astype(np.int64), 0, len(bar) - 1)
    column = np.repeat(bar[idx][:, None, :], bar_w, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(column)), (x0, top))
    draw.rectangle((x0 - 1, top - 1, x0 + bar_w, top + bar_h), outline=ink)
    for fraction, label in ticks:
        y = top + int(round((1.0 - float(np.clip(fraction, 0, 1))) * (bar_h - 1)))
        draw.line((x0 + bar_w, y, x0 + bar_w + tick_len, y), fill=ink, width=1)
        tw, th = text_size(label)
        bbox_top = probe.textbbox((0, 0), label, font=font)[1]
        ty = int(np.clip(y - th // 2 - bbox_top, 0, height - th - bbox_top))
        draw.text((x0 + bar_w + tick_len + pad // 2, ty), label, fill=ink, font=font)
    y = top + bar_h + line
    draw.rectangle((x0, y, x0 + swatch, y + swatch), fill=UNVISITED_RGB, outline=ink)
    draw.text((x0 + swatch + pad // 2, y + swatch // 2), "not lit", fill=ink, font=font,
              anchor="lm" if isinstance(font, ImageFont.FreeTypeFont) else None)
    y += swatch + pad // 2
    for text in note_lines:
        draw.text((x0, y), text, fill=ink, font=font)
        y += line
    return np.asarray(canvas)


def amplitude_figure(obj: np.ndarray, mask: np.ndarray | None = None,
                     upscale_to: int = 512,
                     value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Grey amplitude image (enlarged to ``upscale_to``) with a bar of its 1-99 % range
    (or of ``value_range``, shared by images to compare): black is the 1st percentile,
    white the 99th, five labelled values between."""
    rgb = upscale_nearest(amplitude_rgb(obj, mask, value_range), upscale_to)
    found = value_range if value_range is not None else amplitude_range(obj, mask)
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    if found is None:
        return with_colorbar(rgb, grey, [], "amplitude", note="nothing lit")
    lo, hi = found
    span = hi - lo
    fractions = np.linspace(0.0, 1.0, 5) if span > 0 else np.array([0.5])
    labels = tick_labels(lo + fractions * span) if span > 0 else tick_labels(np.array([lo]))
    ticks = list(zip(fractions.tolist(), labels, strict=True))
    return with_colorbar(rgb, grey, ticks, "amplitude",
                         note="1-99 % range;\nclipped beyond" if value_range is None
                         else "shared scale;\nclipped beyond")


_AUTO = "auto"


def phase_figure(obj: np.ndarray, mask: np.ndarray | None = None,
                 upscale_to: int = 512,
                 linear: tuple[float, float] | None | str = _AUTO) -> np.ndarray:
    """Phase image (enlarged to ``upscale_to``) with its colour bar, in radians.

    ``linear``: "auto" (default) shows a weak phase (:func:`phase_display`) linearly with
    diverging colours over centre +- half, anything else on the cyclic bar from -pi
    (bottom) to pi (top), whose two ends are the same colour; a (centre, half) pair forces
    the linear display (one scale for images to compare), None the cyclic one."""
    if isinstance(linear, str):
        linear = phase_display(obj, mask)
    rgb = upscale_nearest(phase_rgb(obj, mask, linear), upscale_to)
    if linear is not None:
        centre, half = linear
        values = centre + np.linspace(-half, half, 5)
        ticks = list(zip(np.linspace(0.0, 1.0, 5).tolist(), tick_labels(values), strict=True))
        return with_colorbar(rgb, DIVERGING_LUT, ticks, "phase (rad)",
                             note="linear about\nthe mean phase")
    font = label_font(int(np.clip(rgb.shape[0] // 30, 11, 28)))
    pi = pi_symbol(font)
    ticks = [(0.0, f"-{pi}"), (0.25, f"-{pi}/2"), (0.5, "0"), (0.75, f"{pi}/2"),
             (1.0, pi)]
    return with_colorbar(rgb, PHASE_LUT, ticks, "phase (rad)", note="cyclic:\nends meet")


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
    with write_atomic(path) as fh:
        Image.fromarray(np.ascontiguousarray(rgb)).save(fh, format="PNG")
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

    # titles as legible as the panels' own labels: about 1/30 of the tallest panel
    font = label_font(max(12, min(28, max(im.height for _, im in images) // 30)))
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
