"""Differentiable far-field physics in real float32 arithmetic.

The 2-D centred orthonormal DFT is written as two real block-matmuls with the fftshift
folded into the matrices. That one formulation trains, traces, scripts and exports to ONNX
with both exporters (complex tensors and `torch.fft` do not survive every path), and runs on
every onnxruntime provider as plain MatMul. Complex numbers exist only as (re, im) pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def shifted_dft_matrix(n: int) -> np.ndarray:
    """`fftshift(DFT) / sqrt(n)` as a complex128 matrix: A @ x == fftshift(fft(x, norm='ortho'))."""
    k = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)
    return np.fft.fftshift(dft, axes=0)


def complex_matmul(
    a_re: torch.Tensor, a_im: torch.Tensor, b_re: torch.Tensor, b_im: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_re + i a_im) @ (b_re + i b_im) with real tensors only."""
    return a_re @ b_re - a_im @ b_im, a_re @ b_im + a_im @ b_re


class CentredDft2(nn.Module):
    """(re, im) -> fftshift(fft2(., norm='ortho')) as A @ x @ A^T, two real block-matmuls.

    The DFT matrices are buffers, so `.to(device)` and TorchScript's `map_location` move
    them: nothing inside `forward` names a device or a dtype."""

    def __init__(self, n: int) -> None:
        super().__init__()
        dft = shifted_dft_matrix(n)
        self.register_buffer("dft_re", torch.from_numpy(dft.real.astype(np.float32)))
        self.register_buffer("dft_im", torch.from_numpy(dft.imag.astype(np.float32)))
        self.register_buffer("dft_t_re", torch.from_numpy(dft.T.real.astype(np.float32).copy()))
        self.register_buffer("dft_t_im", torch.from_numpy(dft.T.imag.astype(np.float32).copy()))

    def propagate(
        self, psi_re: torch.Tensor, psi_im: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows_re, rows_im = complex_matmul(self.dft_re, self.dft_im, psi_re, psi_im)
        return complex_matmul(rows_re, rows_im, self.dft_t_re, self.dft_t_im)


class FarField(CentredDft2):
    """Object patch (re, im) -> |fftshift(fft2(probe * object, norm='ortho'))|, with the
    probe a buffer (the training physics)."""

    def __init__(self, probe: np.ndarray) -> None:
        n = probe.shape[-1]
        if probe.shape != (n, n):
            raise ValueError(f"probe must be square, got shape {probe.shape}")
        super().__init__(n)
        probe = np.asarray(probe, dtype=np.complex128)
        self.register_buffer("probe_re", torch.from_numpy(probe.real.astype(np.float32)))
        self.register_buffer("probe_im", torch.from_numpy(probe.imag.astype(np.float32)))

    def exit_wave(
        self, obj_re: torch.Tensor, obj_im: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return complex_product(obj_re, obj_im, self.probe_re, self.probe_im)

    def far_field(
        self, obj_re: torch.Tensor, obj_im: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Complex far field (re, im) of the exit wave: A @ psi @ A^T."""
        return self.propagate(*self.exit_wave(obj_re, obj_im))

    def forward(self, obj_re: torch.Tensor, obj_im: torch.Tensor) -> torch.Tensor:
        return modulus(*self.far_field(obj_re, obj_im))


def complex_product(
    a_re: torch.Tensor, a_im: torch.Tensor, b_re: torch.Tensor, b_im: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (a_re + i a_im) * (b_re + i b_im) with real tensors only."""
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


def modulus(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    # sqrt(x + tiny) keeps the gradient finite where the far field is exactly zero.
    return torch.sqrt(re * re + im * im + 1e-12)


def polar_to_re_im(
    amplitude: torch.Tensor, phase: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """amp * exp(i phase) as (re, im): the exportable form of `amp * torch.exp(1j * phase)`."""
    return amplitude * torch.cos(phase), amplitude * torch.sin(phase)


def poisson_nll(
    predicted_amplitude: torch.Tensor, measured_amplitude: torch.Tensor
) -> torch.Tensor:
    """Mean Poisson negative log-likelihood of measured intensities, offset to 0 at a perfect fit.

    Works in the network's scaled units: scaling counts by s^2 only multiplies the
    likelihood by a constant, so the optimum is the same as in raw counts.
    """
    rate = predicted_amplitude.square()
    counts = measured_amplitude.square()
    eps = 1e-8
    nll = rate - counts * torch.log(rate + eps)
    best = counts - counts * torch.log(counts + eps)
    return (nll - best).mean()


def amplitude_mae(
    predicted_amplitude: torch.Tensor, measured_amplitude: torch.Tensor
) -> torch.Tensor:
    return (predicted_amplitude - measured_amplitude).abs().mean()


LOSSES = {"poisson": poisson_nll, "mae": amplitude_mae}
