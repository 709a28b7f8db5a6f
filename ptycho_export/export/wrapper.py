"""The modules that get frozen: one float32 input, real float32 outputs with stable names."""

from __future__ import annotations

import torch
from torch import nn

from ptycho_export.model.generator import PtychoNet
from ptycho_export.physics import FarField, polar_to_re_im

INPUT_NAME = "diffraction"
OUTPUT_NAMES = ("amplitude", "phase")
PHYSICS_INPUT_NAMES = ("amplitude", "phase")
PHYSICS_OUTPUT_NAME = "predicted_diffraction"


class InferenceWrapper(nn.Module):
    """Raw measured amplitudes (B, C, N, N) -> object amplitude and phase (B, C, N, N).

    The complex object never leaves the graph as a complex tensor: amplitude and phase
    are two real outputs (layout written to the manifest).
    """

    def __init__(self, net: PtychoNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, diffraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(diffraction)


class ReducedPrecisionWrapper(nn.Module):
    """Same contract as InferenceWrapper (float32 in, float32 out) with a fp16/bf16 generator.

    The input is scaled in float32 first, so raw detector amplitudes never meet the
    narrower range; only the network's arithmetic is reduced.
    """

    def __init__(self, net: PtychoNet, dtype: torch.dtype) -> None:
        super().__init__()
        self.generator = net.generator.to(dtype)
        self.register_buffer("amplitude_scale", net.amplitude_scale.detach().clone().float())
        self.dtype = dtype

    def forward(self, diffraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = (diffraction * self.amplitude_scale).to(self.dtype)
        amplitude, phase = self.generator(scaled)
        return amplitude.float(), phase.float()


class MatmulPhysicsWrapper(nn.Module):
    """Object (amplitude, phase) -> predicted measured amplitudes, DFT as MatMul.

    Output is in the data's own units (divided by the input scale), so the runtime can
    compare it directly with the measured pattern. MatMul runs on every provider.
    """

    def __init__(self, probe, amplitude_scale: float, probe_scale: float) -> None:  # noqa: ANN001
        super().__init__()
        self.far_field = FarField(probe * probe_scale)
        self.register_buffer("inverse_scale", torch.tensor(1.0 / amplitude_scale))

    def forward(self, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        obj_re, obj_im = polar_to_re_im(amplitude, phase)
        return self.far_field(obj_re, obj_im) * self.inverse_scale


class FftPhysicsWrapper(MatmulPhysicsWrapper):
    """Same physics through torch.fft (exported as the ONNX DFT op: exact op mapping, but
    onnxruntime's CUDA provider has no DFT kernel, so it falls back to CPU there)."""

    def forward(self, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        obj_re, obj_im = polar_to_re_im(amplitude, phase)
        psi_re, psi_im = self.far_field.exit_wave(obj_re, obj_im)
        spectrum = torch.fft.fftshift(
            torch.fft.fft2(torch.complex(psi_re, psi_im), norm="ortho"), dim=(-2, -1))
        return spectrum.abs() * self.inverse_scale
