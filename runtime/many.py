"""Many scans at once (a tomography series, a night of beamtime) on an existing engine.

Without a scheduler the scans run one after another in this process. With
`--scheduler local:N` (a Dask LocalCluster of N single-threaded worker processes) or
`--scheduler dask://HOST:PORT` (an existing Dask distributed scheduler) each scan is one
task: every worker builds one onnxruntime session per artifact and reuses it for every
scan it receives; each scan's outputs are written atomically by the worker that ran it; a
failed scan is retried, then reported with its reason, never lost. A scan above
`--max-residual` is not a failure to retry: its outputs are written, and it is reported
as "residual" with its figures.
"""

from __future__ import annotations

import glob
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import PtychoError, ResidualTooHigh

# One session cache per process: on a Dask worker, the tasks it runs share it.
_WORKER_SESSIONS: dict[tuple, tuple[Any, Any, dict]] = {}


class SchedulerError(PtychoError):
    exit_code = 2


@dataclass
class ScanOutcome:
    data: str
    outdir: str
    status: str  # "ok" | "residual" (written, above --max-residual) | "failed"
    patterns: int = 0
    patterns_per_s: float | None = None
    seconds: float | None = None
    error: str = ""
    attempts: int = 1
    report: dict[str, Any] = field(default_factory=dict, repr=False)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files and globs, in the order given, duplicates dropped; a glob matching nothing is
    an error rather than a silently shorter night."""
    found: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise SchedulerError(f"{item}: the pattern matches no file")
        found.extend(Path(m) for m in matches)
    return list(dict.fromkeys(found))


def output_folder(outroot: Path, data: Path) -> Path:
    return outroot / f"{data.stem}_recon"


def run_one(artifact: str, data: str, outdir: str, options: dict[str, Any]) -> dict[str, Any]:
    """One scan; runs in this process or on a Dask worker. Raises on failure so the
    scheduler can retry it."""
    from runtime.run import run_scan

    try:
        return run_scan(artifact, data, outdir, progress=False, session_cache=_WORKER_SESSIONS,
                        **options)
    except ResidualTooHigh as err:  # written, and the same again on a retry
        return {**err.report, "residual_too_high": str(err)}


def _outcome(data: Path, outdir: Path, report: dict[str, Any] | None, error: str = "",
             attempts: int = 1) -> ScanOutcome:
    if report is None:
        return ScanOutcome(str(data), str(outdir), "failed", error=error, attempts=attempts)
    above = report.get("residual_too_high", "")
    return ScanOutcome(str(data), str(outdir), "residual" if above else "ok", error=above,
                       patterns=int(report.get("patterns", 0)),
                       patterns_per_s=report.get("patterns_per_s"),
                       seconds=report.get("seconds", {}).get("total"), attempts=attempts,
                       report=report)


def _error_line(err: BaseException) -> str:
    if isinstance(err, PtychoError):
        return str(err)
    last = traceback.format_exception_only(type(err), err)[-1].strip()
    return last.splitlines()[0][:300]


def _client(scheduler: str) -> tuple[Any, Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - depends on the install
        from runtime.errors import EnvironmentProblem

        raise EnvironmentProblem("--scheduler needs Dask: pip install 'ptycho-export[dask]'"
                                 ) from None
    if scheduler.startswith("local:"):
        try:
            workers = int(scheduler.split(":", 1)[1])
        except ValueError:
            workers = 0
        if workers < 1:
            raise SchedulerError(f"--scheduler {scheduler!r}: use local:N with N >= 1")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    if scheduler.startswith("dask://"):
        return Client("tcp://" + scheduler.removeprefix("dask://"), timeout=30), None
    raise SchedulerError(f"--scheduler {scheduler!r}: use local:N or dask://HOST:PORT")


def run_many(artifact: str | os.PathLike, data_files: list[Path], outroot: str | os.PathLike,
             options: dict[str, Any] | None = None, scheduler: str | None = None,
             retries: int = 1, log: Callable[[str], None] = print) -> list[ScanOutcome]:
    options = dict(options or {})
    outroot = Path(outroot)
    outroot.mkdir(parents=True, exist_ok=True)
    jobs = [(Path(d), output_folder(outroot, Path(d))) for d in data_files]
    stems = [data.stem for data, _ in jobs]
    if len(set(stems)) != len(stems):
        raise SchedulerError("two data files share a name; their output folders would clash")
    outcomes: list[ScanOutcome] = []
    if scheduler is None:
        for data, outdir in jobs:
            attempts = 0
            while True:
                attempts += 1
                try:
                    report = run_one(str(artifact), str(data), str(outdir), options)
                    outcomes.append(_outcome(data, outdir, report, attempts=attempts))
                    break
                except PtychoError as err:  # bad input: retrying cannot help
                    outcomes.append(_outcome(data, outdir, None, _error_line(err), attempts))
                    break
                except Exception as err:  # noqa: BLE001 - reported per scan, never lost
                    if attempts > retries:
                        outcomes.append(_outcome(data, outdir, None, _error_line(err),
                                                 attempts))
                        break
            log(f"{data.name}: {outcomes[-1].status}")
        return outcomes

    client, cluster = _client(scheduler)
    try:
        futures = [client.submit(run_one, str(artifact), str(data), str(outdir), options,
                                 retries=retries, pure=False, key=f"ptycho-run-{i}-{data.stem}")
                   for i, (data, outdir) in enumerate(jobs)]
        for (data, outdir), future in zip(jobs, futures, strict=True):
            try:
                outcomes.append(_outcome(data, outdir, future.result()))
            except Exception as err:  # noqa: BLE001 - the worker's exception, re-raised here
                outcomes.append(_outcome(data, outdir, None, _error_line(err),
                                         attempts=retries + 1))
            log(f"{data.name}: {outcomes[-1].status}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return outcomes


SUMMARY_COLUMNS = ("scan", "status", "patterns", "patterns/s", "seconds", "median R",
                   "outliers", "vs training", "output / error")


def consistency_cells(report: dict[str, Any]) -> tuple[str, str, str]:
    """(median R-factor, outlier count, "in range" / "OUTSIDE" / "") of one scan's
    data-consistency section; empty where it was not computed."""
    from runtime.physics_check import residual_summary

    summary = residual_summary(report.get("consistency"))
    if summary is None:
        return "", "", ""
    outside = summary["out_of_distribution"]
    verdict = "" if outside is None else "OUTSIDE" if outside else "in range"
    return f"{summary['median_r_factor']:.3f}", str(summary["outliers"]), verdict


def summary_rows(outcomes: list[ScanOutcome]) -> list[tuple[str, ...]]:
    """One row per scan, in :data:`SUMMARY_COLUMNS` order: a scan whose residual is outside
    what the model saw in training stands out among the night's scans."""
    return [(Path(o.data).name, o.status, str(o.patterns or ""),
             f"{o.patterns_per_s:,.0f}" if o.patterns_per_s else "",
             f"{o.seconds:.2f}" if o.seconds else "", *consistency_cells(o.report),
             f"{o.outdir} (above --max-residual)" if o.status == "residual"
             else o.error or o.outdir)
            for o in outcomes]
