"""Warm start: train on from the learned weights of an earlier bundle (``ptycho-train --init``).

Why: on 2 CPU cores a network trained from random weights for a few minutes still learns
mostly its own scan (bench/results/quality-*.md: amplitude detail comes slowly, and a model
run on a scan it was not trained on keeps little of it). What it learned about the inverse
map carries over: started from a model of another scan of the same kind, the same
minutes give a much better object (bench/warm_start.py). At a beamline the model of the
previous scan is the natural start for the next one.

Only the learned parameters move over. The buffers that describe the scan stay the new
scan's: the input scale (normalisation), the back-propagation front end built from its
probe. So a warm start never imports another scan's probe or flux.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ptycho_export.bundle import read_bundle
from ptycho_export.export.formats import UsageError
from ptycho_export.model.config import ModelConfig


@dataclass(frozen=True)
class WarmStart:
    """An earlier bundle's weights, its model checked equal to the one this run builds (so
    read_bundle's shape check against that model holds for this one too)."""

    source: Path
    sha256: str
    weights: dict[str, torch.Tensor]

    def record(self) -> dict[str, str]:
        """What the new bundle's training record says it started from."""
        return {"bundle": self.source.name, "sha256": self.sha256}


def _describe(config: ModelConfig) -> str:
    return (f"{config.architecture} widths {list(config.widths)}, {config.patch_size}x"
            f"{config.patch_size} patterns, gridsize {config.gridsize}, amp_max "
            f"{config.amp_max:g}")


def load_warm_start(path: str | os.PathLike, config: ModelConfig) -> WarmStart:
    """Read ``path`` (the safe bundle reader: hashes, shapes, no pickles); a bundle whose
    model is not the one ``config`` builds is refused with one line saying how they differ
    (UsageError), before anything is written."""
    bundle = read_bundle(path)
    if bundle.config != config:
        raise UsageError(
            f"{path}: --init bundle's model is {_describe(bundle.config)}; this run builds "
            f"{_describe(config)}: pass the --preset and --gridsize it was trained with, on "
            "patterns of its size")
    return WarmStart(source=Path(path), sha256=bundle.sha256, weights=bundle.state_dict)


def apply_warm_start(net: nn.Module, warm: WarmStart) -> None:
    """Copy the learned parameters into ``net``; its buffers (the scan's input scale and
    probe-derived front end) are left as they are."""
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            parameter.copy_(warm.weights[name])
