"""What the machine says it has free: one reader for every check sized by the input."""

from __future__ import annotations

import os


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
