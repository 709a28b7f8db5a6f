"""Atomic outputs: every file and folder the tools write appears whole or not at all.

One way for all of them (bundles, scans, PNGs, JSON, npz, ptychodus products, export and
run folders): write under a temporary name beside the target, then ``os.replace``. A
reader never sees a half-written file, a failure or Ctrl-C removes the temporary and
leaves any previous output intact.

Temporary names are ``.<name>.<random>.tmp``: hidden, unique (two runs never share one),
and never matching a watcher's pattern such as ``*.h5`` (ptychodus watches a folder).
Files are created with ``O_EXCL`` and mode 0666 minus the umask, like a plain ``open()``:
``mkstemp``'s 0600 would survive the rename and hide a bundle or image from the group.
Callers map ``OSError`` to their own one-line message; nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from runtime.errors import EXIT_USAGE, PtychoError, naming


class OutputNotOurs(PtychoError):
    """-o names a folder this tool did not write: replacing it would delete the user's
    files, so it is refused unless --force."""

    exit_code = EXIT_USAGE


def ensure_replaceable(outdir: str | os.PathLike[str], is_ours: Any, what: str,
                       force: bool = False) -> None:
    """Refuse (before any work) an existing `outdir` that `is_ours(folder) -> bool` does
    not recognise as written by `what`: an empty folder or ours is fine, a file or anyone
    else's folder is not, unless `force`."""
    outdir = Path(outdir)
    if not outdir.exists() and not outdir.is_symlink():
        return
    if not outdir.is_dir():
        raise OutputNotOurs(f"{outdir}: exists and is not a folder; choose another -o")
    if force or not any(outdir.iterdir()) or is_ours(outdir):
        return
    shown = sorted(p.name for p in outdir.iterdir())
    listing = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
    raise OutputNotOurs(f"{outdir}: exists and was not written by {what} (it holds "
                        f"{listing}); it would be replaced, so nothing was done -- choose "
                        "another -o, or pass --force to replace it")


class OutputBusy(PtychoError):
    """Another live process is writing the same output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


STALE_EMPTY_LOCK_S = 10.0  # a lock without a pid this old was never finished


def _age_s(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


@contextlib.contextmanager
def output_lock(outdir: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold `.<name>.lock` beside `outdir` while a command writes it: a second writer of
    the same folder fails at once with one line, so one wins whole and nothing is mixed.
    A lock left by a process that no longer exists is taken over."""
    outdir = Path(outdir)
    if not outdir.parent.is_dir():  # nothing writes there yet; the command makes it later
        yield
        return
    lock = outdir.with_name(f".{outdir.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as err:
            if not isinstance(err, FileExistsError):
                raise naming(err, outdir) from err
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            unreadable_and_old = pid <= 0 and _age_s(lock) > STALE_EMPTY_LOCK_S
            if (pid > 0 and not _alive(pid)) or unreadable_and_old:
                lock.unlink(missing_ok=True)  # its writer is gone: take it over
                continue
            raise OutputBusy(f"{outdir}: another {what} (pid {pid if pid > 0 else '?'}) is "
                             f"writing it now ({lock.name} is held); wait for it to finish, "
                             "or choose another -o") from None
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()} {what}\n")
        except OSError as err:  # a full disk: no lock may stay behind
            lock.unlink(missing_ok=True)
            raise naming(err, outdir) from err
        break
    else:
        raise OutputBusy(f"{outdir}: its lock {lock.name} could not be taken; remove it if "
                         "no command is writing there")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def failed_beside(outdir: str | os.PathLike[str]) -> Path:
    """Where a failed command puts its report, so the previous output stays intact."""
    outdir = Path(outdir)
    return outdir.with_name(f"{outdir.name}.failed")

__all__ = ["OutputBusy", "OutputNotOurs", "ensure_replaceable", "failed_beside", "output_lock",
           "replace_dir",
           "temp_dir_beside", "write_atomic", "written_atomic"]


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"


def _beside(outdir: Path, kind: str) -> Path:
    """A hidden, unique name next to a folder: ``.<name>.<kind>-<8 hex>``."""
    return outdir.with_name(f".{outdir.name}.{kind}-{secrets.token_hex(4)}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def written_atomic(target: str | os.PathLike[str], *, durable: bool = False,
                   make_parents: bool = True) -> Iterator[Path]:
    """Yield a fresh, empty temporary path beside ``target`` for writers that want a
    file name (zipfile, h5py, matplotlib); on success it replaces ``target``.

    ``durable``: fsync the file before the rename, so a crash right after cannot leave
    a renamed but empty file (for data files others pick up: scans, products).
    ``make_parents=False``: a missing folder is an error (FileNotFoundError), not made.
    """
    target = Path(target)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def write_atomic(target: str | os.PathLike[str], mode: str = "wb", *, durable: bool = False,
                 make_parents: bool = True, **open_args: Any) -> Iterator[IO[Any]]:
    """Yield an open file (``mode`` "wb" or "w"; text mode takes ``encoding`` etc.) on a
    temporary name beside ``target``; on success it is flushed (and fsynced when
    ``durable``) and replaces ``target``."""
    if mode not in ("wb", "w"):
        raise ValueError(f"write_atomic writes new files: mode 'wb' or 'w', got {mode!r}")
    with written_atomic(target, make_parents=make_parents) as tmp, \
            open(tmp, mode, **open_args) as handle:  # noqa: PTH123
        yield handle
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


def temp_dir_beside(outdir: Path) -> Path:
    """Create and return an empty hidden folder next to ``outdir`` (its parent is made
    if needed) to fill and then swap in with :func:`replace_dir`."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(outdir, "tmp")
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (POSIX) until the block is done: a swap and its cleanup
    then finish whole, and the signal is handled right after (our handlers still exit
    with its code). Elsewhere, or off the main thread's mask support, a no-op."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = mask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


def replace_dir(tmp: Path, outdir: Path) -> None:
    """Swap the finished temp folder in; an older output survives until the swap. A
    signal during the swap or the removal of the old output waits until both are done,
    so neither a half-removed old folder nor a missing output is left behind."""
    with signals_deferred():
        _swap_dir(tmp, outdir)


def _swap_dir(tmp: Path, outdir: Path) -> None:
    backup = None
    if outdir.exists():
        backup = _beside(outdir, "old")
        os.replace(outdir, backup)
    try:
        os.replace(tmp, outdir)
    except BaseException:
        if backup is not None:
            os.replace(backup, outdir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
