"""The torch-free runtime on its own: stitcher throughput, cold start, install size.

Usage (from a source checkout, dev install):

    python -m bench.runtime_bench                       # all three parts, ~5 min on 2 cores
    python -m bench.runtime_bench --skip-install        # no throwaway venvs (~1 min)
    python -m bench.runtime_bench --baseline-stitch /tmp/old_stitch.py   # before/after
    python -m bench.runtime_bench --quick --out /tmp/r  # seconds: small sizes, 1 round

Writes ``runtime-<machine>.json`` (every number) and ``runtime-<machine>.md`` into --out
(default bench/results/). Timings are reported, never asserted (a shared 2-core machine
would only measure its neighbours).

- **Stitcher**: ``runtime.stitch.StitchAccumulator`` on 10k random complex64 64x64 patches
  (in memory; best and median of several rounds, per configuration: default = float32
  canvas + prefetch thread, float32 without prefetch, float64 canvas) and on 100k patches
  fed in batches from a generator (a pool of 1000 random patches reused at new positions),
  so memory stays bounded: peak RSS (VmHWM, reset before) is reported next to the canvas
  size. ``--baseline-stitch FILE`` times another stitch.py (e.g. ``git show
  HEAD~1:runtime/stitch.py``) on the same 10k patches, for before/after numbers.
- **Cold start**: a fresh ``python -c`` subprocess per round that imports runtime.run,
  verifies the artifact (sha256), builds the onnxruntime CPU session and runs the first
  batch; the parent times the whole process (interpreter start included), the child each
  step. On a tiny (N = 32) and the default (N = 64, 2.3 M parameters) artifact with
  seeded random weights, exported here (needs the train extra).
- **Install size**: two throwaway venvs under /tmp: ``.[cpu]`` (runtime only) and
  ``.[train,cpu]`` (with ``torch==2.13.0`` installed first: the CPU wheel), measured with
  ``du -sk`` of site-packages, then deleted (--keep-venvs keeps them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_export.bench.speed import cpu_facts, default_machine_name, library_versions, loadavg
from runtime.bench import (
    COLD_START_TARGET_S,
    bench_cold_start,
    bench_stitch_10k,
    bench_stitch_stream,
)
from runtime.report_io import write_json, write_text

SCHEMA = "ptycho-runtime-bench/1"
REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"


# --------------------------------------------------------------------------- artifacts

def export_artifact(folder: Path, preset: str, n: int, seed: int) -> Path:
    """Seeded random-weight bundle of `preset` at N, exported to ONNX (the normal gate)."""
    from ptycho_export.bench.speed import make_inputs, make_random_bundle
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    folder.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(16, n, 1, seed)
    bundle = make_random_bundle(folder / f"{preset}.zip", preset, n, inputs, seed)
    out = folder / f"{preset}-n{n}"
    export_bundle(bundle, out, ExportOptions(formats=["onnx"], command="runtime_bench"))
    return out


# --------------------------------------------------------------------------- install size


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    if not found:
        raise RuntimeError(f"{venv}: no site-packages")
    return found[0]


def _du_kib(path: Path) -> int:
    done = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def _pip(venv: Path, *args: str, log: Callable[[str], None]) -> float:
    t0 = time.perf_counter()
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args]
    log("  $ " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=REPO, timeout=1800)
    return time.perf_counter() - t0


def _largest(site: Path, top: int = 8) -> list[dict[str, Any]]:
    sizes = []
    for entry in site.iterdir():
        if entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            continue
        sizes.append((_du_kib(entry), entry.name))
    return [{"name": name, "mb": round(kib / 1024, 1)}
            for kib, name in sorted(sizes, reverse=True)[:top]]


def bench_install(root: Path, keep: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Two fresh venvs; `du -sk` of their site-packages after installing the project."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    plans = {"runtime": [[".[cpu]"]],
             "full": [[TORCH_PIN], [".[train,cpu]"]]}
    out: dict[str, Any] = {}
    try:
        for name, steps in plans.items():
            venv = root / name
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            empty = _du_kib(_site_packages(venv))
            seconds = sum(_pip(venv, *step, log=log) for step in steps)
            site = _site_packages(venv)
            kib = _du_kib(site)
            listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list",
                                     "--format=json"], capture_output=True, text=True,
                                    check=True)
            packages = {p["name"]: p["version"] for p in json.loads(listed.stdout)}
            out[name] = {"install": [" ".join(s) for s in steps],
                         "site_packages_mb": round(kib / 1024, 1),
                         "added_mb": round((kib - empty) / 1024, 1),
                         "empty_venv_mb": round(empty / 1024, 1),
                         "packages": len(packages),
                         "torch": packages.get("torch"),
                         "onnxruntime": packages.get("onnxruntime"),
                         "largest": _largest(site), "install_s": round(seconds, 1)}
            log(f"  {name}: site-packages {kib / 1024:,.0f} MB, {len(packages)} packages "
                f"({seconds:.0f} s)")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    if "runtime" in out and "full" in out:
        out["full_over_runtime"] = round(out["full"]["site_packages_mb"]
                                         / out["runtime"]["site_packages_mb"], 1)
    out["measured"] = "du -sk <venv>/lib/pythonX.Y/site-packages (pip, setuptools included)"
    return out


# --------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Runtime bench: {result['machine']}", "",
             f"{result['created_utc']}, `{result['command']}`; CPU {result['env']['cpu']['model']}"
             f" ({result['env']['cpu']['usable_cores']} usable cores); load average at start "
             f"{result['env']['loadavg_start']}, at end {result['env']['loadavg_end']}. "
             "Timings are reported, never asserted.", ""]
    s = result.get("stitch_10k")
    if s:
        lines += [f"## Stitcher: {s['patches']:,} patches of {s['patch_size']}x{s['patch_size']}"
                  " complex64, in memory", "",
                  f"{s['placement']} unless the row says otherwise, {s['positions']}, "
                  f"weights {s['weights']}, canvas "
                  f"{s['canvas'][0]}x{s['canvas'][1]}; rounds interleaved over the rows. "
                  f"Target: <= {s['target_s']} s.", "",
                  "| configuration | best s | median s | patches/s (best) |", "|---|---|---|---|"]
        for name, row in s["configs"].items():
            lines.append(f"| {name} | {row['s_min']:.3f} | {row['s_median']:.3f} | "
                         f"{row['patches_per_s_best']:,.0f} |")
        if any(name.startswith("baseline") for name in s["configs"]):
            label = s.get("baseline_label") or "no description given (--baseline-label)"
            lines += ["", "*baseline*: another runtime/stitch.py given with --baseline-stitch, "
                      f"on the same patches: {label}."]
        lines += ["", f"float32 canvas vs float64 canvas on these random patches: max |diff| "
                  f"= {s['float32_vs_float64_max_abs_over_max']:.1e} of max |object|.", ""]
    t = result.get("stitch_stream")
    if t:
        lines += [f"## Stitcher: {t['patches']:,} patches streamed in batches of {t['batch']}",
                  "", f"{t['s']:.2f} s ({t['patches_per_s']:,.0f} patches/s); canvas "
                  f"{t['canvas'][0]}x{t['canvas'][1]} ({t['canvas_mb']:.0f} MB complex64 canvas; "
                  "the weight sum is a float32 map made once at the end). "
                  f"Peak RSS {t['peak_rss_mb']:.0f} MB "
                  f"({t['peak_rss_source']}), {t['peak_above_before_mb']:.0f} MB above the "
                  f"{t['rss_before_mb']:.0f} MB before; holding all patches would take "
                  f"{t['input_if_held_mb']:,.0f} MB.", ""]
    c = result.get("cold_start")
    if c:
        lines += ["## Cold start (fresh `python -c` per round)", "",
                  "import runtime.run -> artifact verified (sha256) -> onnxruntime CPU session "
                  "-> first batch done. *process* is the parent's wall time for the whole "
                  "subprocess (interpreter start included). Medians (min) over "
                  f"{next(iter(c.values()))['rounds']} rounds; target <= "
                  f"{COLD_START_TARGET_S} s.", "",
                  "| artifact | batch | process s | import s | verify s | session s | "
                  "first batch s | torch imported |", "|---|---|---|---|---|---|---|---|"]
        for row in c.values():
            m = row["summary"]

            def cell(key: str, m: dict[str, Any] = m) -> str:
                return f"{m[key]['median']:.3f} ({m[key]['min']:.3f})"

            lines.append(f"| {row['artifact']} ({row['model_bytes'] / 1e6:.1f} MB) | "
                         f"{row['batch']} | {cell('process_wall_s')} | {cell('import_s')} | "
                         f"{cell('verify_s')} | {cell('session_s')} | {cell('first_batch_s')}"
                         f" | {'yes' if row['torch_imported'] else 'no'} |")
        lines.append("")
    i = result.get("install")
    if i and "runtime" in i:
        lines += ["## Install size", "", f"{i['measured']}.", "",
                  "| venv | installed with | site-packages MB | packages | largest |",
                  "|---|---|---|---|---|"]
        for name in ("runtime", "full"):
            row = i.get(name)
            if not row:
                continue
            big = ", ".join(f"{e['name']} {e['mb']:.0f}" for e in row["largest"][:4])
            lines.append(f"| {name} | `{' && '.join(row['install'])}` | "
                         f"{row['site_packages_mb']:,.0f} | {row['packages']} | {big} |")
        if "full_over_runtime" in i:
            lines += ["", f"The full install is {i['full_over_runtime']}x the runtime-only one."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cold-rounds", type=int, default=5)
    parser.add_argument("--stream-patches", type=int, default=100_000)
    parser.add_argument("--baseline-stitch", type=Path, default=None,
                        help="another runtime/stitch.py to time on the same 10k patches")
    parser.add_argument("--baseline-label", default=None,
                        help="what the --baseline-stitch file is, for the report")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--keep-venvs", action="store_true")
    parser.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir())
                        / "ptycho-runtime-bench-venvs")
    args = parser.parse_args(argv)
    log = print
    started = time.perf_counter()
    cpu = cpu_facts()
    machine = args.machine or default_machine_name(cpu)
    count, rounds, stream = (1000, 1, 5000) if args.quick else (10_000, args.rounds,
                                                                  args.stream_patches)
    result: dict[str, Any] = {
        "schema": SCHEMA, "machine": f"runtime-{machine}",
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.runtime_bench", *(argv or sys.argv[1:])]),
        "env": {"cpu": cpu, "python": sys.version.split()[0], "versions": library_versions(),
                "loadavg_start": loadavg()}}
    log(f"stitcher: {count:,} patches of 64x64, {rounds} rounds ...")
    result["stitch_10k"] = bench_stitch_10k(count, 64, rounds, 0, args.baseline_stitch, log)
    if args.baseline_stitch is not None:
        result["stitch_10k"]["baseline_label"] = args.baseline_label
    log(f"stitcher: {stream:,} patches streamed ...")
    result["stitch_stream"] = bench_stitch_stream(stream, 64, 1000, 1, log)
    if not args.skip_cold_start:
        log("cold start: exporting the tiny and default artifacts ...")
        cold: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
            from ptycho_export.bench.speed import make_inputs

            work = Path(tmp)
            for preset, n, batches in (("tiny", 32, (64,)), ("pinn", 64, (1, 64))):
                art = export_artifact(work / preset, preset, n, 0)
                for batch in batches:
                    batch_file = work / f"{preset}-batch{batch}.npy"
                    np.save(batch_file, make_inputs(batch, n, 1, 0))
                    cold[f"{preset} batch {batch}"] = bench_cold_start(
                        art, batch_file, 1 if args.quick else args.cold_rounds, log)
        result["cold_start"] = cold
    if not args.skip_install:
        log(f"install size: two venvs under {args.venv_root} (a few minutes) ...")
        result["install"] = bench_install(args.venv_root, args.keep_venvs, log)
    result["env"]["loadavg_end"] = loadavg()
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{result['machine']}.json"
    md_path = args.out / f"{result['machine']}.md"
    write_json(json_path, result, sort_keys=False)
    write_text(md_path, markdown(result))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
