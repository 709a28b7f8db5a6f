"""One runner protocol for every way this project runs a model: onnxruntime here, the torch
runners (eager, TorchScript, `.pt2`) in ptycho_export.parity, found through a registry.

A runner is activated (its session or module built), says what it takes
(:meth:`Runner.input_metadata`), runs named float32 numpy inputs to named numpy outputs
(:meth:`Runner.infer`, the feed checked against that metadata first), and is deactivated.
The export gate, ptycho-parity, ptycho-bench and ptycho-run then loop over runners instead
of each opening models its own way.

The runtime never imports the torch side by name: torch runners register under a kind
(``torchscript``, ``pt2``, ...) through the ``ptycho_export.runners`` entry points, loaded
the first time a kind this module does not know is asked for. Pure numpy + onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

ENTRY_POINT_GROUP = "ptycho_export.runners"


@dataclass(frozen=True)
class TensorMeta:
    """One input a runner takes: its name, shape (None where any size goes: a dynamic
    batch) and dtype."""

    name: str
    shape: tuple[int | None, ...] | None  # None: any shape (an eager module says nothing)
    dtype: str = "float32"

    def problem(self, value: np.ndarray) -> str:
        """'' when ``value`` fits, else what does not. A dtype that widens exactly to the
        runner's (float32 into a float64 reference) fits; one that would be narrowed
        (float64 into a float32 graph, the classic deployment bug) does not."""
        if not np.can_cast(value.dtype, np.dtype(self.dtype), casting="safe"):
            return f"{self.name} is {value.dtype}, expected {self.dtype}"
        if self.shape is None:
            return ""
        if value.ndim != len(self.shape) or any(
                want is not None and got != want for got, want in zip(value.shape, self.shape,
                                                                      strict=True)):
            shown = ", ".join("?" if d is None else str(d) for d in self.shape)
            return f"{self.name} has shape {value.shape}, expected ({shown})"
        return ""


class Runner(Protocol):
    """What every runner does (Polygraphy's runner shape)."""

    name: str

    def activate(self) -> None: ...

    def input_metadata(self) -> list[TensorMeta]: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None: ...


class RunnerError(ValueError):
    """A feed that does not fit the runner's inputs."""


class BaseRunner:
    """The protocol's bookkeeping: activate on first use, check every feed against the
    input metadata, context-manager use. Subclasses implement :meth:`_activate`,
    :meth:`_metadata` and :meth:`_infer` (and :meth:`_deactivate` if they hold anything)."""

    name: str = "runner"

    def __init__(self) -> None:
        self.active = False
        self._inputs: list[TensorMeta] = []

    def activate(self) -> None:
        if not self.active:
            self._activate()
            self._inputs = self._metadata()  # once: infer checks every feed against it
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def input_metadata(self) -> list[TensorMeta]:
        self.activate()
        return list(self._inputs)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.activate()
        wanted = self._inputs
        missing = [meta.name for meta in wanted if meta.name not in feed]
        if missing:
            raise RunnerError(f"{self.name}: the feed lacks {missing} (it has "
                              f"{sorted(feed)})")
        ready = {}
        for meta in wanted:
            value = np.asarray(feed[meta.name])
            problem = meta.problem(value)
            if problem:
                raise RunnerError(f"{self.name}: {problem}")
            ready[meta.name] = np.ascontiguousarray(value, dtype=meta.dtype)
        return self._infer(ready)

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _metadata(self) -> list[TensorMeta]:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
               "tensor(float16)": "float16", "tensor(int64)": "int64"}


class OrtRunner(BaseRunner):
    """An onnxruntime session: built from a path on activation (through
    runtime.session.create_session, which checks that the provider really runs and keeps
    CUDA TF32 off), or an already built one. ``inputs`` and ``outputs``, when given, say
    what to feed and fetch instead of asking the session: ptycho-run passes the manifest's
    (already checked against the graph), which also lets the torch sessions of model.ts
    and model.pt2, with onnxruntime's ``run(names, feed)``, run through this runner."""

    def __init__(self, name: str, path: str | os.PathLike[str] | None = None, *,
                 provider: str = "cpu", threads: int | None = None, session: Any = None,
                 inputs: list[TensorMeta] | None = None, outputs: list[str] | None = None
                 ) -> None:
        super().__init__()
        if (path is None) == (session is None):
            raise ValueError("OrtRunner takes a model path or a session, not both")
        self.name, self.path, self.provider, self.threads = name, path, provider, threads
        self.session = session
        self._given_inputs, self._output_names = inputs, outputs

    def _activate(self) -> None:
        if self.session is None:
            from runtime.session import create_session

            self.session, _ = create_session(self.path, self.provider, self.threads)

    def _deactivate(self) -> None:
        if self.path is not None:
            self.session = None

    def _metadata(self) -> list[TensorMeta]:
        if self._output_names is None:
            self._output_names = [o.name for o in self.session.get_outputs()]
        if self._given_inputs is not None:
            return list(self._given_inputs)
        return [TensorMeta(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                           _ORT_DTYPES.get(i.type, i.type)) for i in self.session.get_inputs()]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._output_names
        return dict(zip(names, self.session.run(names, feed), strict=True))


def fill_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """``x`` (at most ``batch`` rows) padded to ``batch`` rows by repeating its last row,
    the one padding every fixed-batch loop uses (the gate, ptycho-parity, ptycho-run): the
    graph sees rows like the real ones, and the caller drops the padding's outputs."""
    if len(x) >= batch:
        return x
    return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])


class FixedBatchRunner:
    """A fixed-batch runner fed any number of samples: chunks of its batch, the last one
    padded by :func:`fill_batch`, padding dropped from the outputs. A gate then sees every
    case whole instead of the first ``batch`` samples."""

    def __init__(self, runner: Runner, batch: int) -> None:
        self.runner, self.batch = runner, int(batch)

    @property
    def name(self) -> str:
        return self.runner.name

    def activate(self) -> None:
        self.runner.activate()

    def deactivate(self) -> None:
        self.runner.deactivate()

    def input_metadata(self) -> list[TensorMeta]:
        return [TensorMeta(m.name, None if m.shape is None else (None, *m.shape[1:]), m.dtype)
                for m in self.runner.input_metadata()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(next(iter(feed.values())))
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, count, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in feed.items()}
            used = len(next(iter(chunk.values())))
            if used < self.batch:
                chunk = {k: fill_batch(v, self.batch) for k, v in chunk.items()}
            for name, value in self.runner.infer(chunk).items():
                parts.setdefault(name, []).append(value[:used])
        return {name: np.concatenate(values) for name, values in parts.items()}


# ----------------------------------------------------------------------------- registry

RunnerFactory = Callable[..., Any]
_FACTORIES: dict[str, RunnerFactory] = {}
_ENTRY_POINTS: dict[str, Any] | None = None  # kind -> importlib EntryPoint, not yet loaded


def register_runner(kind: str, factory: RunnerFactory) -> None:
    """Make ``kind`` openable by :func:`runner_factory` (later registrations win)."""
    _FACTORIES[kind] = factory


def _entry_points() -> dict[str, Any]:
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}
    return _ENTRY_POINTS


def runner_factory(kind: str) -> RunnerFactory:
    """The factory registered for ``kind``. The torch side's kinds come from the
    ``ptycho_export.runners`` entry points, each imported only when asked for (so asking
    for one never imports torch for another). LookupError names what is known when nothing
    provides ``kind``; an entry point's own import error (no torch here) propagates."""
    if kind not in _FACTORIES and kind in _entry_points():
        _FACTORIES[kind] = _entry_points()[kind].load()
    if kind not in _FACTORIES:
        raise LookupError(f"no runner of kind {kind!r} is installed (known: "
                          f"{', '.join(known_kinds()) or 'none'}); the torch runners "
                          "come with the train extra")
    return _FACTORIES[kind]


def known_kinds() -> list[str]:
    return sorted(set(_FACTORIES) | set(_entry_points()))


register_runner("onnxruntime", OrtRunner)
