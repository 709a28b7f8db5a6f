"""How long `ptycho-export` takes for the demo-sized model (ONNX + TorchScript + parity gate).

Usage: python bench/export_time.py [--bundle B] [--repeats 3] [--out bench/results]
Without --bundle, a bundle of the demo configuration (small preset, N = 64) is written with
seeded random weights: export time does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ptycho_export.bundle import write_bundle
from ptycho_export.export.pipeline import ExportOptions, export_bundle
from ptycho_export.model import ModelConfig, PtychoNet
from ptycho_export.normalization import Normalization


def demo_sized_bundle(path: Path, patch_size: int = 64, preset: str = "small") -> Path:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, patch_size)
    net = PtychoNet(config, 0.05).eval()
    rng = np.random.default_rng(0)
    golden_in = np.sqrt(rng.poisson(50.0, (8, 1, patch_size, patch_size))).astype(np.float32)
    with torch.inference_mode():
        amplitude, phase = net(torch.from_numpy(golden_in))
    yy, xx = np.mgrid[:patch_size, :patch_size] - patch_size / 2
    probe = np.exp(-(yy**2 + xx**2) / (patch_size / 5) ** 2).astype(np.complex64)
    return write_bundle(path, config=config, normalization=Normalization(0.05, 1.0),
                        state_dict=net.state_dict(), probe=probe,
                        golden={"amplitudes": golden_in, "amplitude": amplitude.numpy(),
                                "phase": phase.numpy()},
                        training={"note": "random weights for timing"}, data={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or demo_sized_bundle(Path(tmp) / "demo.zip")
        runs = []
        for index in range(args.repeats):
            started = time.perf_counter()
            result = export_bundle(bundle, Path(tmp) / f"out{index}",
                                   ExportOptions(formats=["onnx", "torchscript"]))
            total = time.perf_counter() - started
            runs.append({"total_s": round(total, 3), **{
                f"{name}_freeze_audit_s": facts["seconds"]
                for name, facts in result.manifest["artifacts"].items()}})
            print(f"run {index + 1}: {total:.1f} s")
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    machine = f"cpu-{os.cpu_count()}core"
    payload = {"what": "ptycho-export --format onnx,torchscript (lint + freeze + audit + "
                       "parity gate), demo-sized model (small preset, N=64)",
               "machine": machine, "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "runs": runs, "median": medians}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"export_time-{machine}.json"
    tmp_target = target.with_name(f".{target.name}.tmp")
    tmp_target.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp_target, target)
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
