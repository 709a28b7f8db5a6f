"""Scan data: the npz contract (re-exported from the torch-free ``runtime.scan``) and a
seeded simulator. numpy only."""

from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.scan import ScanData, load_scan, save_scan, validate_scan

__all__ = [
    "ScanData",
    "SimulationConfig",
    "load_scan",
    "save_scan",
    "simulate_scan",
    "validate_scan",
]
