"""Eager reconstruction of a whole scan: predict every pattern, stitch, score against truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.grouping import group_neighbours
from runtime.image_quality import well_lit_mask
from runtime.run import quality_report as runtime_quality_report
from runtime.scan import ScanData
from runtime.stitch import StitchedObject, stitch_patches, to_complex


@dataclass(frozen=True)
class Reconstruction:
    stitched: StitchedObject
    patches: np.ndarray  # (M, N, N) complex64, one per scan position
    well_lit: np.ndarray  # (H, W) bool


def patch_per_position(amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Each pattern anchors its own group as channel 0, so channel 0 is its patch."""
    return to_complex(amplitude[:, 0], phase[:, 0])


def stitch_with_probe(patches: np.ndarray, scan: ScanData) -> Reconstruction:
    weights = np.abs(scan.probe).astype(np.float32) ** 2
    stitched = stitch_patches(patches, scan.positions_px, weights=weights)
    well_lit = well_lit_mask(stitched.weight)
    return Reconstruction(stitched=stitched, patches=patches, well_lit=well_lit)


def reconstruct_eager(predictor, scan: ScanData, batch_size: int = 256) -> Reconstruction:  # noqa: ANN001
    """Run the eager model (a bundle.Predictor) over the scan and stitch the patches."""
    groups = group_neighbours(scan.positions_px, predictor.config.gridsize)
    amplitude, phase = predictor.predict(scan.amplitudes[groups], batch_size=batch_size)
    return stitch_with_probe(patch_per_position(amplitude, phase), scan)


def quality_report(recon: Reconstruction, scan: ScanData) -> dict:
    """Figures against ground truth, the same section ``ptycho-run`` writes
    (runtime.image_quality.ground_truth_report: SSIM, PSNR, correlation, RMSE, FRC, and a
    flat-object baseline that a useful model beats clearly)."""
    return runtime_quality_report(recon.stitched, recon.well_lit, scan.object_truth)
