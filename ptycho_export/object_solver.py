"""The scan's object solved directly, by gradient descent through the physics (training only).

Why: a network that sees one diffraction pattern cannot know that patch's absolute phase
(|F(P O e^{ic})| = |F(P O)|) and learns the inverse map slowly from the likelihood alone.
The scan itself holds the missing information: neighbouring spots overlap. PtychoPINN's
gridsize-2 overlap constraint ties four neighbours together; this ties all of them at once
by solving for one object canvas that explains every measured pattern (automatic-
differentiation ptychography with the Poisson likelihood, probe and positions known). The
network is then trained on the same likelihood plus agreement with this object
(``PtychoModule``'s guide term), and it alone is exported.

The solve fits measured amplitudes (least squares on sqrt(counts), Gaussian noise on the
amplitude), not the Poisson likelihood the network trains on, and decays Adam's learning
rate to 1 % on a cosine. Measured on the quality benchmark's scans at 1e6 photons
(bench/solver_ceiling.py, 2-core AMD EPYC), amplitude SSIM of the solved object on the
natural scan: 0.88, against 0.84 with the Poisson likelihood and the same decay, and 0.44
for the Poisson likelihood at a constant rate (the earlier solve). At a constant rate Adam
keeps wandering round the minimum; the amplitude misfit is the better conditioned of the
two (its gradient does not grow with the intensity).

Adam moves every canvas pixel by about its learning rate whatever the size of that pixel's
gradient, so pixels lit only by the probes' dim tails (the canvas edge, the gaps left by the
validation patterns, which the solve never sees) random-walk on the noise of their tiny
gradients, further the longer it runs. The solve therefore steps in u, with the object
1 + s(r) u(r) and s = c / (c + ILLUMINATION_FLOOR max c) (c: the summed |probe|^2 of the
patterns solved, s scaled to 1 at its peak): well-lit pixels move as before, dark ones stay
near 1. On the demo's scan solved from 90 % of its patterns, amplitude corr 0.98 with
it against 0.88 without (0.70 at 3000 steps); on the quality benchmark's scans, where
every region is lit, it changes nothing (to 0.01 of SSIM).

Fractional positions are exact: the exit wave P(r) O(r + t) with t = floor(t) + f has the
same far-field intensity as P(r - f) O(r + floor(t)), so each pattern gets its own probe,
Fourier-shifted by -f once (the probe is compact, so the circular shift is harmless), and
the object is cut at whole pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ptycho_export.schedule import cosine_decay
from runtime.refine import pattern_corners, shifted_probes

__all__ = ["ILLUMINATION_FLOOR", "MISFITS", "SolvedObject", "default_solver_steps",
           "illumination_step_scale", "patches_at", "shifted_probes", "solve_object"]


@dataclass(frozen=True)
class SolvedObject:
    obj: np.ndarray  # (H, W) complex64 canvas
    corner_px: np.ndarray  # (2,) object pixel (y, x) of canvas pixel (0, 0)
    final_loss: float  # mean Poisson NLL of the last steps, network units (0 = perfect)
    steps: int


# Illumination (summed |probe|^2, relative to its peak) below which the solve's step size
# fades: half the full step at this level.
ILLUMINATION_FLOOR = 0.05


def illumination_step_scale(probes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                            shape: tuple[int, int]) -> torch.Tensor:
    """s = c / (c + ILLUMINATION_FLOOR max c), scaled to peak 1: how far the solve may move
    each canvas pixel, from c, the summed |probe|^2 of the patterns that light it."""
    cover = torch.zeros(shape).index_put_((rows, cols), probes.abs().square(),
                                          accumulate=True)
    scale = cover / (cover + ILLUMINATION_FLOOR * cover.max())
    return scale / scale.max()


def default_solver_steps(n_patterns: int, batch: int = 64) -> int:
    """About 200 passes over a small scan, at least 30 over a large one, 800-4000 steps."""
    return int(np.clip(200 * n_patterns / batch, 800, 4000))


MISFITS = ("amplitude", "poisson")


def solve_object(amplitudes: np.ndarray, probe: np.ndarray, positions_px: np.ndarray,
                 steps: int | None = None, batch: int = 64, learning_rate: float = 0.1,
                 seed: int = 0, misfit: str = "amplitude", decay: bool = True
                 ) -> SolvedObject:
    """Object canvas that best explains ``amplitudes`` (M, n, n; network units, i.e. already
    scaled as the network's physics sees them) under ``probe`` (n, n, scaled likewise).

    Adam on the complex canvas, stepped through the illumination scale (module docstring;
    learning rate in units of the object's amplitude, about 1 after the project's
    normalisation, decayed to 1 % on a cosine), random batches of patterns, least squares
    on the measured amplitudes. ``final_loss`` is still the mean Poisson NLL, the figure the
    network's training reports. ``misfit="poisson"`` and ``decay=False`` give the earlier
    solve, for comparison (bench/solver_ceiling.py).
    """
    if misfit not in MISFITS:
        raise ValueError(f"unknown misfit {misfit!r}; choose one of {MISFITS}")
    m, n, _ = amplitudes.shape
    steps = default_solver_steps(m, batch) if steps is None else steps
    base, frac = pattern_corners(positions_px, n)
    corner = base.min(axis=0)
    base = base - corner
    height, width = (base.max(axis=0) + n).tolist()
    probes = torch.from_numpy(shifted_probes(probe, frac))
    # measured amplitudes with DC moved to (0, 0), to compare with an unshifted fft2
    measured = torch.fft.ifftshift(torch.as_tensor(np.asarray(amplitudes, np.float32)),
                                   dim=(-2, -1))
    counts = measured.square()
    axis = torch.arange(n)
    rows = torch.from_numpy(base[:, 0])[:, None, None] + axis[None, :, None]
    cols = torch.from_numpy(base[:, 1])[:, None, None] + axis[None, None, :]
    step_scale = illumination_step_scale(probes, rows, cols, (height, width)).to(torch.complex64)
    # the object is 1 + step_scale * u: Adam steps u, and dark pixels barely move
    u = torch.zeros((height, width), dtype=torch.complex64, requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch, m)
    recent: list[float] = []
    for step in range(steps):
        if decay:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * cosine_decay(step / max(steps - 1, 1), 0.01)
        idx = torch.randperm(m, generator=generator)[:batch]
        obj = 1 + step_scale * u
        far = torch.fft.fft2(probes[idx] * obj[rows[idx], cols[idx]], norm="ortho")
        rate = far.real.square() + far.imag.square()
        if misfit == "amplitude":
            loss = (torch.sqrt(rate + 1e-8) - measured[idx]).square().mean()
        else:
            loss = (rate - counts[idx] * torch.log(rate + 1e-8)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - 20:
            with torch.no_grad():
                c = counts[idx]
                nll = rate - c * torch.log(rate + 1e-8) - (c - c * torch.log(c + 1e-8))
                recent.append(nll.mean().item())
    obj = (1 + step_scale * u).detach()
    return SolvedObject(obj=obj.numpy().astype(np.complex64), corner_px=corner,
                        final_loss=float(np.mean(recent)) if recent else float("nan"),
                        steps=steps)


def patches_at(solved: SolvedObject, positions_px: np.ndarray, n: int) -> np.ndarray:
    """(M, n, n) complex64: each pattern's patch of the solved object in that pattern's own
    frame (pixel (i, j) = obj(y - n/2 + i, x - n/2 + j)), fractional positions by Fourier
    shift of a window with a margin; the canvas is edge-padded so every window exists."""
    margin = 8
    base, frac = pattern_corners(positions_px, n)
    base = base - solved.corner_px
    # pad so that every window exists, also for positions the solve did not use
    h, w = solved.obj.shape
    before = np.maximum(margin - base.min(axis=0), margin)
    after = np.maximum(base.max(axis=0) + n + margin - np.array([h, w]), margin)
    padded = np.pad(solved.obj.astype(np.complex128),
                    ((before[0], after[0]), (before[1], after[1])), mode="edge")
    base = base + before
    size = n + 2 * margin
    k = np.fft.fftfreq(size)
    out = np.empty((len(base), n, n), dtype=np.complex64)
    for i, ((y, x), (fy, fx)) in enumerate(zip(base, frac, strict=True)):
        window = padded[y - margin : y + n + margin, x - margin : x + n + margin]
        if fy or fx:
            ramp = np.exp(2j * np.pi * (k[:, None] * fy + k[None, :] * fx))
            window = np.fft.ifft2(np.fft.fft2(window) * ramp)
        out[i] = window[margin : margin + n, margin : margin + n]
    return out
