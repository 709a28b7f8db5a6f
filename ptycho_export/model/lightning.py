"""LightningModule: the science (forward, physics loss, steps). The Trainer holds the rest."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from ptycho_export.model.config import ModelConfig
from ptycho_export.model.generator import PtychoNet
from ptycho_export.normalization import Normalization
from ptycho_export.overlap import OverlapMerge
from ptycho_export.physics import LOSSES, FarField, polar_to_re_im
from ptycho_export.schedule import cosine_decay


class PtychoModule(L.LightningModule):
    """Unsupervised training: predicted patch -> probe -> far field vs measured amplitudes."""

    def __init__(
        self,
        config: ModelConfig,
        probe: np.ndarray,
        normalization: Normalization,
        learning_rate: float = 1e-3,
        loss: str = "poisson",
        guide: np.ndarray | None = None,
        guide_weight: float = 10.0,
        warmup_fraction: float = 0.03,
    ) -> None:
        """``guide``: (G, C, N, N) complex patches of the solved object per training group
        (ptycho_export.object_solver), or None for the likelihood alone. The guide term is
        the |probe|^2-weighted squared distance of the predicted patches from it."""
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.config = config
        self.net = PtychoNet(config, normalization.amplitude_scale)
        scaled_probe = np.asarray(probe) * normalization.probe_scale
        self.net.set_probe(scaled_probe)
        self.physics = FarField(scaled_probe)
        self.learning_rate = learning_rate
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        # the same step the physics graph applies when a deployed model is checked
        self.overlap = OverlapMerge(config.patch_size) if config.channels > 1 else None
        self.guide_weight = float(guide_weight)
        self.warmup_fraction = float(warmup_fraction)
        # plain attributes, not buffers: training data, never part of a checkpoint or bundle
        self.guide_re = self.guide_im = None
        if guide is not None:
            self.guide_re = torch.from_numpy(np.ascontiguousarray(guide.real, np.float32))
            self.guide_im = torch.from_numpy(np.ascontiguousarray(guide.imag, np.float32))
        light = np.abs(scaled_probe) ** 2
        self.register_buffer("light", torch.from_numpy((light / light.max()).astype(np.float32)),
                             persistent=False)

    def forward(self, amplitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(amplitudes)

    def on_fit_start(self) -> None:
        """Train with channels-last convolution weights: about 20 % faster per step on the
        CPU (oneDNN's preferred layout), the same numbers."""
        self.net.to(memory_format=torch.channels_last)
        if self.guide_re is not None:  # once, not a host-to-device copy every step
            self.guide_re = self.guide_re.to(self.device)
            self.guide_im = self.guide_im.to(self.device)

    def on_fit_end(self) -> None:
        """Back to the default layout: the bundle and every export see plain tensors."""
        self.net.to(memory_format=torch.contiguous_format)

    def predicted_patches(self, amplitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amplitude, phase = self.net(amplitudes)
        return polar_to_re_im(amplitude, phase)

    def predicted_diffraction(
        self, amplitudes: torch.Tensor, offsets: torch.Tensor,
        patches: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        obj_re, obj_im = patches if patches is not None else self.predicted_patches(amplitudes)
        if self.overlap is not None:
            obj_re, obj_im = self.overlap(obj_re, obj_im, offsets)
        return self.physics(obj_re, obj_im)

    def guide_loss(self, patches: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor
                   ) -> torch.Tensor:
        """Mean |probe|^2-weighted squared distance from the solved object's patches."""
        index = index.to(self.guide_re.device)
        target_re = self.guide_re[index].to(patches[0].device)
        target_im = self.guide_im[index].to(patches[0].device)
        error = (patches[0] - target_re).square() + (patches[1] - target_im).square()
        return (self.light * error).mean()

    def losses(self, batch: tuple[torch.Tensor, ...] | list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, likelihood term) of one batch (amplitudes, offsets, group index)."""
        amplitudes, offsets, index = batch
        patches = self.predicted_patches(amplitudes)
        predicted = self.predicted_diffraction(amplitudes, offsets, patches)
        measured = amplitudes * self.net.amplitude_scale
        likelihood = self.loss_fn(predicted, measured)
        loss = likelihood
        if self.guide_re is not None:
            loss = loss + self.guide_weight * self.guide_loss(patches, index)
        return loss, likelihood

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        loss, likelihood = self.losses(batch)
        size = batch[0].shape[0]
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=size)
        self.log(f"{stage}_likelihood", likelihood, on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=size)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: ANN001 - Lightning's signature
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        return self._step(batch, "val")

    def configure_optimizers(self):  # noqa: ANN201
        """Adam with a short linear warm-up, then a cosine decay to 2 % over the planned
        steps (the Trainer's max_steps, or its epochs times the batches per epoch)."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(self.warmup_fraction * total), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return cosine_decay((step - warmup) / max(total - warmup, 1), 0.02)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
