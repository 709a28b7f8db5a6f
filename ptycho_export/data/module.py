"""DataModule: groups, split and float32 tensors. I/O happened before, at the data reader."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from runtime.grouping import group_neighbours, group_offsets
from runtime.scan import ScanData


def grouped_inputs(scan: ScanData, gridsize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G, C, N, N) float32 amplitudes, (G, C, 2) float32 offsets, (G, C) indices."""
    groups = group_neighbours(scan.positions_px, gridsize)
    offsets = group_offsets(scan.positions_px, groups)
    return scan.amplitudes[groups], offsets, groups


class ScanDataModule(L.LightningDataModule):
    """Seeded train/validation split of one scan's groups.

    Lightning's DistributedSampler shards the training set across ranks, so each group is
    seen once per epoch over all devices.
    """

    def __init__(
        self, scan: ScanData, gridsize: int, batch_size: int = 32,
        val_fraction: float = 0.1, seed: int = 0,
    ) -> None:
        super().__init__()
        amplitudes, offsets, groups = grouped_inputs(scan, gridsize)
        self.groups = groups  # (G, C) pattern indices of each group
        count = amplitudes.shape[0]
        order = np.random.default_rng(seed).permutation(count)
        n_val = int(round(count * val_fraction)) if count > 1 else 0
        n_val = min(max(n_val, 1 if val_fraction > 0 and count > 1 else 0), count - 1)
        self.val_index = np.sort(order[:n_val])
        self.train_index = np.sort(order[n_val:])
        self.amplitudes = torch.from_numpy(np.ascontiguousarray(amplitudes, dtype=np.float32))
        self.offsets = torch.from_numpy(offsets)
        self.batch_size = batch_size
        self.seed = seed

    def _dataset(self, index: np.ndarray) -> TensorDataset:
        idx = torch.from_numpy(index)
        # the group index travels with each sample: the guide term looks its target up
        return TensorDataset(self.amplitudes[idx], self.offsets[idx], idx)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._dataset(self.train_index), batch_size=self.batch_size,
                          shuffle=True, generator=generator, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.val_index), batch_size=self.batch_size)
