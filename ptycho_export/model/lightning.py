"""LightningModule: the science (forward, physics loss, steps). The Trainer holds the rest."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from ptycho_export.model.config import ModelConfig
from ptycho_export.model.generator import PtychoNet
from ptycho_export.normalization import Normalization
from ptycho_export.overlap import merge_and_reextract
from ptycho_export.physics import LOSSES, FarField, polar_to_re_im


class PtychoModule(L.LightningModule):
    """Unsupervised training: predicted patch -> probe -> far field vs measured amplitudes."""

    def __init__(
        self,
        config: ModelConfig,
        probe: np.ndarray,
        normalization: Normalization,
        learning_rate: float = 1e-3,
        loss: str = "poisson",
        max_offset_px: float = 0.0,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.config = config
        self.net = PtychoNet(config, normalization.amplitude_scale)
        self.physics = FarField(np.asarray(probe) * normalization.probe_scale)
        self.learning_rate = learning_rate
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        self.overlap_pad = int(math.ceil(max_offset_px)) + 1

    def forward(self, amplitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(amplitudes)

    def predicted_diffraction(
        self, amplitudes: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        amplitude, phase = self.net(amplitudes)
        obj_re, obj_im = polar_to_re_im(amplitude, phase)
        if self.config.channels > 1:
            obj_re, obj_im = merge_and_reextract(obj_re, obj_im, offsets, self.overlap_pad)
        return self.physics(obj_re, obj_im)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        amplitudes, offsets = batch
        predicted = self.predicted_diffraction(amplitudes, offsets)
        measured = amplitudes * self.net.amplitude_scale
        loss = self.loss_fn(predicted, measured)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=amplitudes.shape[0])
        return loss

    def training_step(self, batch, batch_idx):  # noqa: ANN001 - Lightning's signature
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        return self._step(batch, "val")

    def configure_optimizers(self):  # noqa: ANN201
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss"}}
