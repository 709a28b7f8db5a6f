"""Scan geometry: metres <-> object pixels, patch-origin conventions, object centre.

Numpy only (no torch). Three questions every foreign scan file raises, answered once here:

**Object pixel size.** A far-field pattern of N x N detector pixels of size ``d`` at
distance ``z`` and wavelength ``lambda`` reconstructs a patch whose pixel is
``lambda * z / (N * d)`` (:func:`object_pixel_size_m`; ptychodus ``model/product/
geometry.py`` uses the same formula, on the *processed* pattern extent). N is the size
the model sees, **after** any crop: cropping 128 -> 64 doubles the object pixel.
``lambda = h c / E`` with the exact SI constants (as ptychodus computes it).

**Patch-origin convention** (``origin``), for a patch of N x N pixels (N even):

- ``"centre"`` (ours, and ptychodus's): the position is the patch **centre** at index
  N/2: patch pixel (i, j) covers object pixel (y - N/2 + i, x - N/2 + j). This is the
  contract of ``runtime.scan`` / ``runtime.stitch``; ptychodus's stitcher puts the lower
  corner at ``x - N/2`` and maps metres to pixels with ``map_coordinates_probe_to_object``.
- ``"corner"``: the position is the patch's **top-left pixel** (Tike's ``scan`` is the
  minimum corner): centre = corner + N/2.
- ``"centre-half"``: the position is the geometric centre at (N - 1)/2 (some tools, e.g.
  ptychoml's ``y - (N - 1)/2`` lower corner): patch pixel i covers ``pos - (N-1)/2 + i``,
  so centre = pos + 1/2.

Everything downstream uses ``"centre"``; :func:`to_centre_px` / :func:`from_centre_px`
convert (a uniform shift: it moves the object, never distorts it).

**Frames.** A :class:`PixelFrame` ties object pixels to metres for the patch *centres*:
``x_m = origin_x_m + x_px * pixel_width_m`` (same for y; no axis flips: row index grows
with y_m, column with x_m, as in ptychodus). :func:`scan_frame` picks the frame for a scan
in metres so that the lowest-left patch's corner is object pixel (0, 0): every patch lies
inside the object array, and ``x_px = (x_m - min x_m) / pixel + N/2`` whatever the
convention (the convention only moves the frame's metre origin).
:class:`ObjectGeometry` then gives a stitched object (``origin_px``, shape) its centre in
metres the way ptychodus reads it (``api/object.py``): the array column ``c`` holds the
point ``center_x_m + pixel_width_m * (c - W/2)``, i.e. ``x_px_local = (x_m - center_x_m) /
pixel_width_m + W/2``. (ptychodus's ``get_transverse_coordinates`` uses ``(W-1)/2``
instead, half a pixel away; we follow the mapping its reconstructors place patches with.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import DataError

__all__ = [
    "HC_EV_M",
    "ORIGINS",
    "ObjectGeometry",
    "PixelFrame",
    "energy_ev_to_wavelength_m",
    "from_centre_px",
    "object_pixel_size_m",
    "origin_offset_px",
    "pixel_frame_px",
    "positions_m_to_px",
    "positions_px_to_m",
    "scan_frame",
    "to_centre_px",
]

# h c / e in eV m, from the exact SI 2019 constants (h, c, e are defined values).
_H_J_S = 6.62607015e-34
_C_M_S = 299792458.0
_E_C = 1.602176634e-19
HC_EV_M = _H_J_S * _C_M_S / _E_C  # 1.2398419843320026e-06

ORIGINS: tuple[str, ...] = ("centre", "corner", "centre-half")
# Positions within this many pixels of a whole pixel are snapped to it: metres -> pixels
# of a nominal grid leaves ~1e-12 px of float noise, which would otherwise switch the
# stitcher to (slower, slightly ringing) sub-pixel placement for nothing.
SNAP_PX = 1e-6


def _positive(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(v) or v <= 0:
        raise DataError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _pixel_pair(pixel_m: Any, name: str = "pixel_m") -> tuple[float, float]:
    """(height_m, width_m) from a scalar (square pixels) or a (height, width) pair."""
    if isinstance(pixel_m, tuple | list | np.ndarray) and np.ndim(pixel_m) == 1:
        if len(pixel_m) != 2:
            raise DataError(f"{name} must be one size or (height, width), got {pixel_m!r}")
        return _positive(pixel_m[0], f"{name} height"), _positive(pixel_m[1], f"{name} width")
    v = _positive(pixel_m, name)
    return v, v


def _patch_size(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"patch size n must be a positive integer, got {n!r}")
    return int(n)


def energy_ev_to_wavelength_m(energy_eV: float) -> float:  # noqa: N803 (ptychodus's name)
    """Photon wavelength ``h c / E`` in metres for an energy in eV (10 keV -> 1.2398 A)."""
    return HC_EV_M / _positive(energy_eV, "energy_eV")


def object_pixel_size_m(*, distance_m: float, n: int, detector_pixel_m: Any,
                        wavelength_m: float | None = None,
                        energy_eV: float | None = None) -> Any:  # noqa: N803
    """Object (= probe = patch) pixel size ``lambda z / (N d)`` in metres.

    Give exactly one of ``wavelength_m`` and ``energy_eV``. ``n`` is the pattern side the
    model sees (after cropping); ``detector_pixel_m`` one size (square pixels: returns a
    float) or (height, width) (returns (pixel_height_m, pixel_width_m)).
    """
    if (wavelength_m is None) == (energy_eV is None):
        raise DataError("give exactly one of wavelength_m and energy_eV")
    lam = (energy_ev_to_wavelength_m(energy_eV) if wavelength_m is None
           else _positive(wavelength_m, "wavelength_m"))
    z = _positive(distance_m, "distance_m")
    n = _patch_size(n)
    dh, dw = _pixel_pair(detector_pixel_m, "detector_pixel_m")
    ph, pw = lam * z / (n * dh), lam * z / (n * dw)
    if np.ndim(detector_pixel_m) == 1:
        return ph, pw
    return ph


# --------------------------------------------------------------------------- conventions


def origin_offset_px(origin: str, n: int) -> float:
    """What to add to a position of convention ``origin`` to get our patch centre (px)."""
    n = _patch_size(n)
    if origin == "centre":
        return 0.0
    if origin == "corner":
        return n / 2
    if origin == "centre-half":
        return 0.5
    raise DataError(f"origin convention must be one of {', '.join(ORIGINS)}, got {origin!r}")


def _positions(positions_px: Any) -> np.ndarray:
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise DataError(f"positions must have shape (M, 2) (y, x), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise DataError("positions contain NaN or infinite values")
    return pos


def to_centre_px(positions_px: Any, origin: str, n: int) -> np.ndarray:
    """(M, 2) (y, x) positions of convention ``origin`` -> our N/2 patch centres."""
    return _positions(positions_px) + origin_offset_px(origin, n)


def from_centre_px(positions_px: Any, origin: str, n: int) -> np.ndarray:
    """Inverse of :func:`to_centre_px`: our patch centres -> positions of ``origin``."""
    return _positions(positions_px) - origin_offset_px(origin, n)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class PixelFrame:
    """Object pixels <-> metres for patch centres: ``x_m = origin_x_m + x_px * pixel_width_m``.

    ``origin_*_m`` is where object-pixel coordinate 0 lies in metres (ptychodus's
    "centre" sense of a position); ``pixel_*_m`` the object pixel size.
    """

    pixel_height_m: float
    pixel_width_m: float
    origin_y_m: float = 0.0
    origin_x_m: float = 0.0

    def __post_init__(self) -> None:
        _positive(self.pixel_height_m, "pixel_height_m")
        _positive(self.pixel_width_m, "pixel_width_m")
        for name in ("origin_y_m", "origin_x_m"):
            if not math.isfinite(float(getattr(self, name))):
                raise DataError(f"{name} must be finite, got {getattr(self, name)!r}")


def _coords(x_m: Any, y_m: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x_m, dtype=np.float64)
    y = np.asarray(y_m, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise DataError(f"x and y positions must be 1-D of equal length, got shapes "
                        f"{x.shape} and {y.shape}")
    if x.size == 0:
        raise DataError("no scan positions (M = 0)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise DataError("scan positions contain NaN or infinite values")
    return x, y


def scan_frame(x_m: Any, y_m: Any, pixel_m: Any, *, n: int,
               origin: str = "centre") -> PixelFrame:
    """The frame for a scan in metres: the lowest patch corner becomes object pixel 0.

    ``x_m``, ``y_m`` (M,) positions of convention ``origin``; ``pixel_m`` the object pixel
    size (one value, or (height, width)). Patch centres then sit at
    ``(x_m - min x_m) / pixel + N/2`` in object pixels, so all patches lie inside.
    """
    x, y = _coords(x_m, y_m)
    ph, pw = _pixel_pair(pixel_m)
    shift = origin_offset_px(origin, n) - _patch_size(n) / 2
    return PixelFrame(pixel_height_m=ph, pixel_width_m=pw,
                      origin_y_m=float(y.min()) + shift * ph,
                      origin_x_m=float(x.min()) + shift * pw)


def pixel_frame_px(pixel_m: Any) -> PixelFrame:
    """The frame of positions already in object pixels: pixel 0 is 0 m."""
    ph, pw = _pixel_pair(pixel_m)
    return PixelFrame(pixel_height_m=ph, pixel_width_m=pw)


def _snap(v: np.ndarray, snap_px: float) -> np.ndarray:
    r = np.rint(v)
    return np.where(np.abs(v - r) <= snap_px, r, v)


def positions_m_to_px(x_m: Any, y_m: Any, pixel_m: Any, *, n: int, origin: str = "centre",
                      frame: PixelFrame | None = None, snap_px: float = SNAP_PX) -> np.ndarray:
    """Scan positions in metres -> (M, 2) float64 (y, x) patch centres in object pixels.

    ``origin`` is the convention of the given positions (module docstring); the result is
    always our N/2 centre. ``frame`` defaults to :func:`scan_frame` (lowest patch corner
    at pixel 0); pass the same frame to convert other points consistently. Values within
    ``snap_px`` of a whole pixel are snapped to it (float noise of the unit conversion).
    """
    x, y = _coords(x_m, y_m)
    if frame is None:
        frame = scan_frame(x, y, pixel_m, n=n, origin=origin)
    else:
        ph, pw = _pixel_pair(pixel_m)
        if not (math.isclose(ph, frame.pixel_height_m, rel_tol=1e-12)
                and math.isclose(pw, frame.pixel_width_m, rel_tol=1e-12)):
            raise DataError(f"pixel_m {pixel_m!r} disagrees with the frame's pixel size "
                            f"({frame.pixel_height_m}, {frame.pixel_width_m})")
    off = origin_offset_px(origin, n)
    # (x - origin) / pixel, arranged so a scan in metres lands exactly on N/2 + k.
    cy = (y - frame.origin_y_m) / frame.pixel_height_m + off
    cx = (x - frame.origin_x_m) / frame.pixel_width_m + off
    return np.ascontiguousarray(np.stack([_snap(cy, snap_px), _snap(cx, snap_px)], axis=1))


def positions_px_to_m(positions_px: Any, frame: PixelFrame, *, n: int,
                      origin: str = "centre") -> tuple[np.ndarray, np.ndarray]:
    """(M, 2) (y, x) patch centres in object pixels -> (x_m, y_m) of convention ``origin``.

    The inverse of :func:`positions_m_to_px` for the same frame; with ``origin="centre"``
    it gives the metres ptychodus stores as ``probe_position_x_m`` / ``_y_m``.
    """
    pos = from_centre_px(positions_px, origin, n)
    x = frame.origin_x_m + pos[:, 1] * frame.pixel_width_m
    y = frame.origin_y_m + pos[:, 0] * frame.pixel_height_m
    return x, y


@dataclass(frozen=True)
class ObjectGeometry:
    """Pixel size and centre (metres) of an object array, as a ptychodus product stores them.

    ptychodus maps a position to the array as ``x_px = (x_m - center_x_m) / pixel_width_m
    + W/2`` (``ObjectGeometry.map_coordinates_probe_to_object``).
    """

    pixel_width_m: float
    pixel_height_m: float
    center_x_m: float
    center_y_m: float

    def __post_init__(self) -> None:
        _positive(self.pixel_width_m, "pixel_width_m")
        _positive(self.pixel_height_m, "pixel_height_m")
        for name in ("center_x_m", "center_y_m"):
            if not math.isfinite(float(getattr(self, name))):
                raise DataError(f"{name} must be finite, got {getattr(self, name)!r}")

    @classmethod
    def from_stitched(cls, origin_px: Any, shape: Any, frame: PixelFrame) -> ObjectGeometry:
        """Geometry of a stitched object whose ``obj[0, 0]`` is frame pixel ``origin_px``.

        ``origin_px`` (y, x) and ``shape`` (H, W) as in ``runtime.stitch.StitchedObject``
        (``stitched.origin_px``, ``stitched.obj.shape``). Frame pixel p is local pixel
        ``p - origin``, so the centre is ``origin_m + pixel * (origin_px + W/2)``.
        """
        oy, ox = (float(v) for v in origin_px)
        h, w = (int(v) for v in tuple(shape)[-2:])
        if h < 1 or w < 1:
            raise DataError(f"object shape must be at least 1x1, got {tuple(shape)}")
        return cls(pixel_width_m=frame.pixel_width_m, pixel_height_m=frame.pixel_height_m,
                   center_x_m=frame.origin_x_m + frame.pixel_width_m * (ox + w / 2),
                   center_y_m=frame.origin_y_m + frame.pixel_height_m * (oy + h / 2))

    def positions_to_local_px(self, x_m: Any, y_m: Any, shape: Any) -> np.ndarray:
        """ptychodus's mapping, metres -> (M, 2) (y, x) pixels of an (H, W) array."""
        x, y = _coords(x_m, y_m)
        h, w = (int(v) for v in tuple(shape)[-2:])
        return np.stack([(y - self.center_y_m) / self.pixel_height_m + h / 2,
                         (x - self.center_x_m) / self.pixel_width_m + w / 2], axis=1)
