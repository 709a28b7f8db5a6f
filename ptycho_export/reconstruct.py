"""Eager reconstruction of a whole scan: predict every pattern, stitch, score against truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.grouping import group_neighbours
from runtime.metrics import reconstruction_errors
from runtime.scan import ScanData
from runtime.stitch import StitchedObject, crop_to, stitch_patches, to_complex

# Pixels lit by less than this fraction of the best-lit pixel's summed probe intensity are
# poorly determined by any method; quality is scored on the rest.
WELL_LIT_FRACTION = 0.1


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
    well_lit = stitched.weight > WELL_LIT_FRACTION * float(stitched.weight.max())
    return Reconstruction(stitched=stitched, patches=patches, well_lit=well_lit)


def reconstruct_eager(predictor, scan: ScanData, batch_size: int = 256) -> Reconstruction:  # noqa: ANN001
    """Run the eager model (a bundle.Predictor) over the scan and stitch the patches."""
    groups = group_neighbours(scan.positions_px, predictor.config.gridsize)
    amplitude, phase = predictor.predict(scan.amplitudes[groups], batch_size=batch_size)
    return stitch_with_probe(patch_per_position(amplitude, phase), scan)


def quality_report(recon: Reconstruction, scan: ScanData) -> dict:
    """Errors against ground truth after removing the global complex factor, with a baseline.

    The baseline is the trivial reconstruction: a flat object (mean amplitude, zero phase).
    A trained model is only useful if it beats it clearly.
    """
    if scan.object_truth is None:
        return {"ground_truth": False}
    truth = crop_to(scan.object_truth, recon.stitched)
    mask = recon.well_lit
    model = reconstruction_errors(recon.stitched.obj, truth, mask)
    flat = np.full_like(recon.stitched.obj, np.abs(recon.stitched.obj[mask]).mean())
    baseline = reconstruction_errors(flat, truth, mask)
    return {
        "ground_truth": True,
        "scored_pixels": int(mask.sum()),
        "model": model,
        "flat_baseline": baseline,
    }
