"""Real-space overlap constraint for gridsize > 1 (training only).

The C predicted patches of a group are placed at their relative offsets on a shared
canvas, averaged where they overlap, and re-extracted before diffraction, so the network
is rewarded for patches that agree with their neighbours. Bilinear `grid_sample` handles
sub-pixel offsets and is exact for integer ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sample(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear sample image (B, K, H, W) at pixel coords rows/cols (B, h, w), zeros outside."""
    h, w = image.shape[-2:]
    grid = torch.stack((2.0 * cols / (w - 1) - 1.0, 2.0 * rows / (h - 1) - 1.0), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def merge_and_reextract(
    obj_re: torch.Tensor, obj_im: torch.Tensor, offsets: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, N, N) patches + (B, C, 2) offsets -> the same patches after overlap averaging."""
    b, c, n, _ = obj_re.shape
    size = n + 2 * pad
    axis = torch.arange(size, dtype=obj_re.dtype, device=obj_re.device)
    canvas_rows, canvas_cols = torch.meshgrid(axis, axis, indexing="ij")
    # canvas pixel u shows patch k pixel u - pad - offset_k
    dy = offsets[..., 0].reshape(b * c, 1, 1)
    dx = offsets[..., 1].reshape(b * c, 1, 1)
    stacked = torch.stack((obj_re, obj_im, torch.ones_like(obj_re)), dim=2).reshape(b * c, 3, n, n)
    placed = _sample(stacked, canvas_rows - pad - dy, canvas_cols - pad - dx)
    placed = placed.reshape(b, c, 3, size, size).sum(dim=1)
    weight = placed[:, 2:3].clamp_min(1e-6)
    merged = (placed[:, :2] / weight).unsqueeze(1).expand(b, c, 2, size, size)
    merged = merged.reshape(b * c, 2, size, size)
    patch_axis = torch.arange(n, dtype=obj_re.dtype, device=obj_re.device)
    rows, cols = torch.meshgrid(patch_axis, patch_axis, indexing="ij")
    back = _sample(merged, rows + pad + dy, cols + pad + dx).reshape(b, c, 2, n, n)
    return back[:, :, 0], back[:, :, 1]
