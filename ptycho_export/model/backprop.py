"""Back-propagation front end + U-Net: the network starts in real space, not in k-space.

A plain CNN must learn the whole inverse map from a diffraction pattern to an object patch,
a global (Fourier) relation, through local convolutions: on a CPU budget of a few thousand
steps it does not get there. Here the first layer is fixed physics: the measured
amplitude is given the phase of the probe's own far field and propagated back,

    O0 = conj(P) / (|P|^2 + eps) * F^-1[ A * exp(i arg F(P)) ],

the linearised (holographic) estimate of the object patch, exact for an empty object and
close for a weakly scattering one. It is already aligned with the patch in real space and
has a phase reference that is the same for every pattern (the probe's), so a U-Net with
skip connections only has to correct it locally. Everything is real float32 MatMul and
elementwise arithmetic (DFT matrices as in ptycho_export.physics), so it traces, scripts
and exports to ONNX like the rest.

The probe-dependent matrices are buffers: zero when the module is built, filled from the
training probe by :meth:`BackPropagation.set_probe`, and carried in the bundle's weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptycho_export.physics import shifted_dft_matrix

# Regularisation of the probe inverse, relative to max |P|^2: where the probe is dark the
# estimate fades to zero instead of blowing up.
INVERSE_EPS = 1e-2


def _real(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


class BackPropagation(nn.Module):
    """(B, C, N, N) scaled amplitudes -> (re, im) of the back-propagated estimate, and the
    probe's normalised intensity (N, N), the network's map of where the data says anything."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name in ("idft", "idft_t", "phase", "inverse"):
            self.register_buffer(f"{name}_re", torch.zeros(n, n))
            self.register_buffer(f"{name}_im", torch.zeros(n, n))
        self.register_buffer("light", torch.zeros(n, n))

    def set_probe(self, probe: np.ndarray) -> None:
        """Fill the buffers from the probe the physics uses (already scaled)."""
        probe = np.asarray(probe, dtype=np.complex128)
        a = shifted_dft_matrix(probe.shape[-1])
        inverse_dft = np.conj(a).T  # A^H: undoes fftshift(fft(., norm='ortho'))
        far = a @ probe @ a.T
        intensity = np.abs(probe) ** 2
        values = {
            "idft": inverse_dft,
            "idft_t": inverse_dft.T,
            "phase": np.exp(1j * np.angle(far)),
            "inverse": np.conj(probe) / (intensity + INVERSE_EPS * intensity.max()),
        }
        with torch.no_grad():
            for name, z in values.items():
                getattr(self, f"{name}_re").copy_(_real(z.real))
                getattr(self, f"{name}_im").copy_(_real(z.imag))
            self.light.copy_(_real(intensity / intensity.max()))

    def forward(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_re, y_im = scaled * self.phase_re, scaled * self.phase_im
        r_re = self.idft_re @ y_re - self.idft_im @ y_im
        r_im = self.idft_re @ y_im + self.idft_im @ y_re
        psi_re = r_re @ self.idft_t_re - r_im @ self.idft_t_im
        psi_im = r_re @ self.idft_t_im + r_im @ self.idft_t_re
        return (psi_re * self.inverse_re - psi_im * self.inverse_im,
                psi_re * self.inverse_im + psi_im * self.inverse_re)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
    )


class BackPropUNet(nn.Module):
    """Scaled amplitudes (B, C, N, N) -> amplitude in [0, amp_max], phase in (-pi, pi).

    Input of the U-Net: the estimate's real and imaginary parts per channel and the probe
    intensity map (2C + 1 maps); len(widths) levels, max-pool down, nearest up, skips."""

    def __init__(self, n: int, channels: int, widths: tuple[int, ...], amp_max: float) -> None:
        super().__init__()
        self.amp_max = float(amp_max)
        self.frontend = BackPropagation(n)
        self.down = nn.ModuleList()
        c_in = 2 * channels + 1
        for width in widths:
            self.down.append(_block(c_in, width))
            c_in = width
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(_block(c_in + width, width))
            c_in = width
        self.amplitude_head = nn.Conv2d(c_in, channels, 1)
        self.phase_head = nn.Conv2d(c_in, channels, 1)

    def forward(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o_re, o_im = self.frontend(scaled)
        light = self.frontend.light.expand_as(o_re[:, :1])
        h = torch.cat((o_re, o_im, light), dim=1)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h)
            if i < len(self.down) - 1:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for block in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat((h, skips.pop()), dim=1))
        amplitude = self.amp_max * torch.sigmoid(self.amplitude_head(h))
        phase = math.pi * torch.tanh(self.phase_head(h))
        return amplitude, phase
