"""PtychoPINN-style generator and the inference module that export freezes.

Written for export from the start: float32 only, no tensors created inside `forward`,
no device names, no data-dependent Python branching. The input scale is a buffer, so the
frozen graph applies exactly the normalisation the model was trained with.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ptycho_export.model.backprop import BackPropUNet
from ptycho_export.model.config import ModelConfig


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class Decoder(nn.Module):
    """Nearest-neighbour 2x upsampling + conv blocks back to N x N, one output map."""

    def __init__(self, c_in: int, widths: tuple[int, ...], c_out: int) -> None:
        super().__init__()
        stages = []
        for width in widths:
            stages.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                        conv_block(c_in, width)))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(c_in, c_out, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(features))


class Generator(nn.Module):
    """Conv encoder with pooling; two decoders: amplitude in [0, amp_max], phase in (-pi, pi)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.amp_max = float(config.amp_max)
        c = config.channels
        blocks = []
        c_in = c
        for width in config.widths:
            blocks.append(nn.Sequential(conv_block(c_in, width), nn.MaxPool2d(2)))
            c_in = width
        self.encoder = nn.Sequential(*blocks)
        decoder_widths = tuple(reversed(config.widths[:-1])) + (max(config.widths[0] // 2, 1),)
        self.amplitude_decoder = Decoder(c_in, decoder_widths, c)
        self.phase_decoder = Decoder(c_in, decoder_widths, c)

    def forward(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(scaled)
        amplitude = self.amp_max * torch.sigmoid(self.amplitude_decoder(features))
        phase = math.pi * torch.tanh(self.phase_decoder(features))
        return amplitude, phase


class PtychoNet(nn.Module):
    """Raw measured amplitudes (B, C, N, N) float32 -> object patch (amplitude, phase).

    This is the whole inference path: scale by the stored constant, run the generator.
    Probe and positions are not needed at inference (they matter for training and
    stitching), so the frozen graph has exactly one input.
    """

    def __init__(self, config: ModelConfig, amplitude_scale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        if config.architecture == "backprop-unet":
            self.generator: nn.Module = BackPropUNet(config.patch_size, config.channels,
                                                     config.widths, config.amp_max)
        else:
            self.generator = Generator(config)
        self.register_buffer("amplitude_scale", torch.tensor(float(amplitude_scale)))

    def forward(self, amplitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator(amplitudes * self.amplitude_scale)

    def set_probe(self, probe: np.ndarray) -> None:
        """Give a probe-aware front end the probe the physics uses (scaled); a no-op for
        the plain CNN, which never sees the probe."""
        frontend = getattr(self.generator, "frontend", None)
        if frontend is not None:
            frontend.set_probe(probe)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
