"""The modules that get frozen: one float32 input, real float32 outputs with stable names."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ptycho_export.model.generator import PtychoNet
from ptycho_export.normalization import Normalization
from ptycho_export.overlap import OverlapMerge
from ptycho_export.physics import CentredDft2, complex_product, modulus, polar_to_re_im

INPUT_NAME = "diffraction"
OUTPUT_NAMES = ("amplitude", "phase")
PHYSICS_INPUT_NAMES = ("amplitude", "phase", "probe_re", "probe_im")  # + "offsets" at C > 1
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
    """A group's patches and the scan's probe -> the predicted measured amplitudes of the
    group's anchor pattern (channel 0, the one ptycho-run stitches), DFT as MatMul.

    Inputs: ``amplitude``, ``phase`` (B, C, N, N); ``probe_re``, ``probe_im`` (B, N, N),
    the probe of each pattern in any units (scaled here to the training probe's power,
    exactly as training scales its own probe); at gridsize > 1 ``offsets`` (B, C, 2), the
    group's positions from its anchor in px, through the training's overlap step. Output
    (B, 1, N, N) in the data's own units (divided by the input scale), so the runtime can
    compare it directly with the measured pattern. MatMul runs on every provider.
    """

    def __init__(self, patch_size: int, channels: int, amplitude_scale: float,
                 probe_power: float) -> None:
        super().__init__()
        self.dft = CentredDft2(patch_size)
        self.overlap = OverlapMerge(patch_size, anchor_only=True) if channels > 1 else None
        self.register_buffer("inverse_scale", torch.tensor(1.0 / amplitude_scale))
        self.register_buffer("probe_power", torch.tensor(float(probe_power)))

    def input_names(self) -> tuple[str, ...]:
        return PHYSICS_INPUT_NAMES + (("offsets",) if self.overlap is not None else ())

    def anchor_exit_wave(self, amplitude: torch.Tensor, phase: torch.Tensor,
                         probe_re: torch.Tensor, probe_im: torch.Tensor,
                         offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        obj_re, obj_im = polar_to_re_im(amplitude, phase)
        if self.overlap is not None and offsets is not None:
            obj_re, obj_im = self.overlap(obj_re, obj_im, offsets)
        else:
            obj_re, obj_im = obj_re[:, :1], obj_im[:, :1]
        power = (probe_re.square() + probe_im.square()).sum(dim=(-2, -1), keepdim=True)
        scale = torch.sqrt(self.probe_power / power.clamp_min(1e-30)).unsqueeze(1)
        return complex_product(obj_re, obj_im, probe_re.unsqueeze(1) * scale,
                               probe_im.unsqueeze(1) * scale)

    def forward(self, amplitude: torch.Tensor, phase: torch.Tensor, probe_re: torch.Tensor,
                probe_im: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        psi = self.anchor_exit_wave(amplitude, phase, probe_re, probe_im, offsets)
        return modulus(*self.dft.propagate(*psi)) * self.inverse_scale


class FftPhysicsWrapper(MatmulPhysicsWrapper):
    """Same physics through torch.fft (exported as the ONNX DFT op: exact op mapping, but
    onnxruntime's CUDA provider has no DFT kernel, so it falls back to CPU there)."""

    def forward(self, amplitude: torch.Tensor, phase: torch.Tensor, probe_re: torch.Tensor,
                probe_im: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        psi_re, psi_im = self.anchor_exit_wave(amplitude, phase, probe_re, probe_im, offsets)
        spectrum = torch.fft.fftshift(
            torch.fft.fft2(torch.complex(psi_re, psi_im), norm="ortho"), dim=(-2, -1))
        return spectrum.abs() * self.inverse_scale


def physics_wrapper(fft_impl: str, probe: np.ndarray, normalization: Normalization,
                    channels: int) -> MatmulPhysicsWrapper:
    """The physics graph's module for a model trained with ``probe`` and ``normalization``
    (``fft_impl`` 'matmul' or 'fft'): the probe fixes only the power the scan's probe is
    scaled to, exactly the training's (sum |probe_scale * probe|^2)."""
    cls = MatmulPhysicsWrapper if fft_impl == "matmul" else FftPhysicsWrapper
    power = float(np.sum(np.abs(np.asarray(probe, np.complex128) * normalization.probe_scale)
                         ** 2))
    return cls(probe.shape[-1], channels, normalization.amplitude_scale, power).eval()
