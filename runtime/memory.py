"""What the machine says it has free (one reader for every check sized by the input), and
what this process uses (the benchmarks' resident-set figures)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def mem_available_bytes(meminfo: str | os.PathLike[str] = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    value, *unit = line.split()[1:]
                    return int(value) * (1024 if unit[:1] == ["kB"] else 1)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def _status_mb(key: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return None


def rss_mb() -> float:
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    with contextlib.suppress(ImportError):
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """VmHWM (resettable on Linux), else ru_maxrss (monotonic over the process)."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    import resource  # POSIX only: imported here, so the runtime still imports elsewhere

    # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True
