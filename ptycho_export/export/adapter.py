"""Wrap a model we did not train into the export contract: diffraction in, amplitude + phase out.

An `InferenceAdapter` says which method of the foreign module predicts, which of its other
arguments are constants (probe, positions, scale factors) and how its output maps to two
real float32 tensors. `AdaptedModule` holds the module and the constants (as buffers, so
`.to()` moves them and no device is baked in) and exposes the same
`forward(diffraction) -> (amplitude, phase)` as our own `InferenceWrapper`.

`dry_run` calls the method once, eagerly, before anything is frozen, and turns the classic
failures of foreign models into one-line refusals: a LightningModule method that needs its
Trainer, `self.log` in the predict path, float64 reaching a float32 layer, an output that
does not match the adapter.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ptycho_export.export.complex_ops import user_frame
from ptycho_export.export.formats import UsageError
from ptycho_export.export.lint import ExportLintError, check_float32

OUTPUT_KINDS = ("complex", "amp_phase", "re_im")
# Per-sample input scales computed inside the graph from the input itself, so an artifact
# takes raw amplitudes at any level. name -> (numerator as a function of N, formula).
# Both are upstream PtychoPINN's Parseval RMS scale, which its code writes two ways.
INPUT_SCALE_RULES: dict[str, tuple[Callable[[int], float], str]] = {
    "rms": (lambda n: float(n * n),
            "sqrt(N^2 / mean over the sample's C patterns of sum over pixels of x^2)"),
    "rms-half": (lambda n: (n / 2.0) ** 2,
                 "sqrt((N/2)^2 / mean over the sample's C patterns of sum over pixels of x^2)"),
}
OutputFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
_PY_SCALARS = (bool, int, float, complex)
_NARROW = {torch.float64: torch.float32, torch.complex128: torch.complex64}


@dataclass
class InferenceAdapter:
    """How to call a foreign model for inference.

    input_shape:  (C, N, N) of one diffraction sample (C = gridsize**2).
    method:       the method that predicts (`forward`, `forward_predict`, ...).
    input_name:   keyword of the diffraction argument; None passes it first, positionally.
    constants:    other arguments, passed by keyword on every call. Tensors and numpy
                  arrays become buffers of the wrapper (float64 -> float32 and
                  complex128 -> complex64, each cast recorded in the manifest); Python
                  numbers are baked into the graph as they are.
    output:       "complex" (a complex tensor: amplitude = |z|, phase = angle z),
                  "amp_phase" (a pair), "re_im" (a pair of real and imaginary parts),
                  or a callable mapping the method's result to (amplitude, phase).
    output_index: pick this element of a tuple/list result before mapping it.
    cast_float64: cast the module's own float64 parameters/buffers to float32 (recorded);
                  without it they are refused.
    input_scale:  {argument: rule}: arguments computed per sample from the input inside
                  the graph, shape (B, 1, 1, 1) float32 (rules: INPUT_SCALE_RULES; an
                  all-zero sample gets 1).
    """

    input_shape: tuple[int, int, int]
    method: str = "forward"
    input_name: str | None = None
    constants: dict[str, Any] = field(default_factory=dict)
    output: str | OutputFn = "complex"
    output_index: int | None = None
    cast_float64: bool = False
    input_scale: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise UsageError(f"input shape {self.input_shape!r}: give (C, N, N) positive "
                             "integers, e.g. (1, 64, 64) or (4, 64, 64) for gridsize 2")
        if shape[1] != shape[2]:
            raise UsageError(f"input shape {shape}: patches must be square (N, N)")
        self.input_shape = shape  # type: ignore[assignment]
        if not callable(self.output) and self.output not in OUTPUT_KINDS:
            raise UsageError(f"output {self.output!r}: choose from {', '.join(OUTPUT_KINDS)} "
                             "or give a callable (result -> (amplitude, phase))")
        if not re.fullmatch(r"[A-Za-z_]\w*", self.method):
            raise UsageError(f"method {self.method!r} is not a Python method name")
        for name in self.constants:
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise UsageError(f"constant {name!r} is not a Python argument name")
        if self.input_name is not None and self.input_name in self.constants:
            raise UsageError(f"{self.input_name!r} is both the input and a constant")
        for name, rule in self.input_scale.items():
            if rule not in INPUT_SCALE_RULES:
                raise UsageError(f"input scale {name}={rule}: choose a rule from "
                                 f"{', '.join(INPUT_SCALE_RULES)}")
            if not re.fullmatch(r"[A-Za-z_]\w*", name) or name == self.input_name:
                raise UsageError(f"input scale {name!r} is not an argument name of its own")
            if name in self.constants:
                raise UsageError(f"{name!r} is both a constant and computed from the input "
                                 "(--input-scale): drop it from the constants")

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the manifest (constants by name, dtype and shape)."""
        output = self.output if isinstance(self.output, str) else \
            f"callable {getattr(self.output, '__qualname__', type(self.output).__name__)}"
        consts = {}
        for name, value in self.constants.items():
            if isinstance(value, torch.Tensor | np.ndarray):
                consts[name] = {"dtype": str(value.dtype).replace("torch.", ""),
                                "shape": list(value.shape)}
            else:
                consts[name] = {"python": repr(value)}
        scales = {name: {"rule": rule, "per_sample": INPUT_SCALE_RULES[rule][1],
                         "shape": ["batch", 1, 1, 1]}
                  for name, rule in self.input_scale.items()}
        return {"method": self.method, "input_name": self.input_name,
                "input_shape": list(self.input_shape), "output": output,
                "output_index": self.output_index, "constants": consts,
                "cast_float64": self.cast_float64, "input_scale": scales}


def per_sample_scale(diffraction: torch.Tensor, rule: str, patch_size: int) -> torch.Tensor:
    """INPUT_SCALE_RULES[rule] of each sample, (B, 1, 1, 1) float32, in tensor ops only
    (it is traced and exported with the model; N comes from the adapter, not from a shape
    read while tracing); 1 for an all-zero sample."""
    numerator = INPUT_SCALE_RULES[rule][0](patch_size)
    power = diffraction.square().sum(dim=(-2, -1)).mean(dim=1).reshape(-1, 1, 1, 1)
    safe = torch.where(power > 0, power, torch.ones_like(power))
    return torch.where(power > 0, torch.sqrt(numerator / safe), torch.ones_like(power))


def _as_tensor(name: str, value: Any, notes: list[str]) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) \
        else value.detach().clone().cpu()
    narrow = _NARROW.get(tensor.dtype)
    if narrow is not None:
        wide = tensor
        tensor = tensor.to(narrow)
        scale = float(wide.abs().max()) if wide.numel() else 0.0
        change = float((tensor.to(wide.dtype) - wide).abs().max()) if wide.numel() else 0.0
        notes.append(f"constant '{name}' {tuple(wide.shape)} was {str(wide.dtype)[6:]}: cast "
                     f"to {str(narrow)[6:]} (max relative change "
                     f"{change / scale if scale else 0.0:.1e})")
    return tensor


def _is_lightning(module: nn.Module) -> bool:
    return any(c.__name__ == "LightningModule" and c.__module__.split(".")[0] in
               ("lightning", "pytorch_lightning") for c in type(module).__mro__)


def prepare_model(module: nn.Module, adapter: InferenceAdapter) -> tuple[nn.Module, list[str]]:
    """A detached copy of `module`: CPU, eval mode, no Trainer, float64 handled."""
    notes: list[str] = []
    if not isinstance(module, nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not callable(getattr(module, adapter.method, None)):
        methods = sorted(m for m in dir(type(module)) if not m.startswith("_") and
                         "predict" in m or m == "forward")
        raise UsageError(f"{type(module).__qualname__} has no method {adapter.method!r}"
                         + (f" (candidates: {', '.join(methods)})" if methods else ""))
    try:
        model = copy.deepcopy(module)  # Lightning's __getstate__ also drops the Trainer
    except Exception as err:  # noqa: BLE001 - any copy failure: work on the original
        model = module
        notes.append(f"the module could not be copied ({type(err).__name__}); it was moved "
                     "to CPU and switched to eval mode in place")
    if _is_lightning(model):
        for attr in ("_trainer", "_fabric"):
            if attr in vars(model):
                setattr(model, attr, None)
        notes.append(f"{type(model).__qualname__} is a LightningModule: exported detached "
                     f"from any Trainer (method {adapter.method!r} called in eval mode)")
    model = model.to("cpu").eval()
    wide = [(n, t) for kind in (model.named_parameters(), model.named_buffers())
            for n, t in kind if t.dtype in _NARROW]
    if wide and not adapter.cast_float64:
        findings = check_float32(model, allow_complex=True)
        raise ExportLintError("; ".join(findings) + " -- or let the exporter cast them, with "
                              "a note in the manifest (InferenceAdapter(cast_float64=True), "
                              "--cast-float64)")
    if wide:
        with torch.no_grad():
            for _, tensor in wide:
                tensor.data = tensor.data.to(_NARROW[tensor.dtype])
        names = ", ".join(n for n, _ in wide[:5]) + (f" and {len(wide) - 5} more"
                                                    if len(wide) > 5 else "")
        notes.append(f"cast {len(wide)} float64/complex128 parameter(s)/buffer(s) of the module "
                     f"to float32/complex64: {names}")
    return model, notes


class AdaptedModule(nn.Module):
    """diffraction (B, C, N, N) float32 -> (amplitude, phase) float32, via the adapter."""

    def __init__(self, model: nn.Module, adapter: InferenceAdapter) -> None:
        super().__init__()
        self.model = model
        self.method = adapter.method
        self.input_name = adapter.input_name
        self.output_kind = adapter.output
        self.output_index = adapter.output_index
        self.input_scale = dict(adapter.input_scale)
        self.patch_size = int(adapter.input_shape[-1])
        self.notes: list[str] = []
        self.python_constants: dict[str, Any] = {}
        self.buffer_names: dict[str, str] = {}
        for i, (name, value) in enumerate(adapter.constants.items()):
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, torch.Tensor | np.ndarray):
                buffer = f"constant_{i}_{name}"
                self.register_buffer(buffer, _as_tensor(name, value, self.notes))
                self.buffer_names[name] = buffer
            elif value is None or isinstance(value, _PY_SCALARS + (str,)) or (
                    isinstance(value, tuple | list) and all(isinstance(v, _PY_SCALARS)
                                                            for v in value)):
                self.python_constants[name] = value
            else:
                raise UsageError(f"constant {name!r} is a {type(value).__name__}: give a "
                                 "tensor, numpy array, number, string or tuple of numbers")

    def call(self, diffraction: torch.Tensor) -> Any:
        """The foreign method's raw result."""
        kwargs = dict(self.python_constants)
        kwargs.update({name: getattr(self, buffer) for name, buffer in self.buffer_names.items()})
        kwargs.update({name: per_sample_scale(diffraction, rule, self.patch_size)
                       for name, rule in self.input_scale.items()})
        method = getattr(self.model, self.method)
        if self.input_name is None:
            return method(diffraction, **kwargs)
        return method(**{self.input_name: diffraction}, **kwargs)

    def map_output(self, result: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.output_index is not None:
            result = result[self.output_index]
        if callable(self.output_kind):
            amplitude, phase = self.output_kind(result)
            return amplitude, phase
        if self.output_kind == "complex":
            return result.abs(), torch.angle(result)
        first, second = result
        if self.output_kind == "amp_phase":
            return first, second
        z = torch.complex(first, second)  # re_im
        return z.abs(), torch.angle(z)

    def forward(self, diffraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.map_output(self.call(diffraction))


@contextlib.contextmanager
def detached_from_trainer() -> Iterator[None]:
    """While tracing: LightningModule's `trainer` property returns None instead of raising
    (torch.jit.trace reads every property of every submodule; Lightning's own
    `to_torchscript` sets the same flag). Methods that *use* the Trainer were already
    refused by `dry_run`."""
    classes = []
    for name in ("lightning.pytorch.core.module", "pytorch_lightning.core.module"):
        found = sys.modules.get(name)
        if found is not None and hasattr(found.LightningModule, "_jit_is_scripting"):
            classes.append(found.LightningModule)
    previous = [cls._jit_is_scripting for cls in classes]
    for cls in classes:
        cls._jit_is_scripting = True
    try:
        yield
    finally:
        for cls, value in zip(classes, previous, strict=True):
            cls._jit_is_scripting = value


def _where(err: BaseException) -> str:
    frame = user_frame(traceback.extract_tb(err.__traceback__))
    return f" at {frame}" if frame else ""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype)[6:]} tensor {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(
            _describe(v) for v in value[:4])
    return f"a {type(value).__name__}"


def _check_result(wrapper: AdaptedModule, result: Any) -> None:
    kind, label = wrapper.output_kind, f"{type(wrapper.model).__qualname__}.{wrapper.method}"
    if wrapper.output_index is not None:
        if not isinstance(result, tuple | list) or len(result) <= wrapper.output_index:
            raise ExportLintError(f"output_index {wrapper.output_index}: {label} returned "
                                  f"{_describe(result)}")
        result = result[wrapper.output_index]
    if kind == "complex" and not (isinstance(result, torch.Tensor) and result.is_complex()):
        raise ExportLintError(f"output='complex' but {label} returned {_describe(result)}: use "
                              "output='amp_phase' or 're_im' for a pair, output_index for one "
                              "element of a tuple, or a callable")
    if kind in ("amp_phase", "re_im") and not (
            isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(t, torch.Tensor) and not t.is_complex() for t in result)):
        raise ExportLintError(f"output={kind!r} expects a pair of real tensors but {label} "
                              f"returned {_describe(result)}")


def dry_run(wrapper: AdaptedModule, example: tuple[torch.Tensor, ...]
            ) -> tuple[tuple[int, ...], dict[str, list[float]]]:
    """One eager call with the refusals described in the module docstring. Returns the
    per-sample output shape and the observed output ranges."""
    label = f"{type(wrapper.model).__qualname__}.{wrapper.method}"
    with warnings.catch_warnings(), torch.no_grad():
        # Lightning only warns when self.log runs without a Trainer: raise it here instead,
        # so the traceback names the user's line.
        warnings.filterwarnings("error", message=r".*`self\.log\(\)`.*")
        try:
            result = wrapper.call(*example)
        except Exception as err:  # every failure of foreign code becomes one line
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "`self.log()`" in text:
                raise ExportLintError(
                    f"{label} calls self.log(){_where(err)}: logging belongs to training "
                    "steps and a frozen model has no Trainer to log to; choose a method "
                    "without it") from None
            if "is not attached to a `Trainer`" in text:
                raise ExportLintError(
                    f"{label} uses self.trainer{_where(err)} (\"{text}\"): an exported model "
                    "has no Trainer. Choose an adapter method that predicts without it (e.g. "
                    "method='forward'), or add one that takes what it read from the Trainer "
                    "(datamodule statistics, scale factors) as arguments and pass those as "
                    "adapter constants") from None
            hint = ""
            if re.search(r"[Dd]ouble|float64", text):
                hint = (" -- float64 reached a float32 layer: pass constants as float32 "
                        "tensors (the adapter casts tensor constants it is given) and do not "
                        "create float64 tensors inside the method")
            raise ExportLintError(f"calling {label} on a float32 batch "
                                  f"{tuple(example[0].shape)} failed{_where(err)}: "
                                  f"{type(err).__name__}: {text[:300]}{hint}") from None
        _check_result(wrapper, result)
        amplitude, phase = wrapper.map_output(result)
    batch = example[0].shape[0]
    for name, out in (("amplitude", amplitude), ("phase", phase)):
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
            got = _describe(out)
            hint = (" (float64 somewhere in the method: a float64 constant, numpy array or "
                    "torch.tensor(...) without dtype)" if "float64" in got else "")
            raise ExportLintError(f"{label}: the adapter's {name} output is {got}, expected "
                                  f"float32{hint}")
        if out.dim() != 4 or out.shape[0] != batch:
            raise ExportLintError(f"{label}: the adapter's {name} output has shape "
                                  f"{tuple(out.shape)}; the runtime needs (batch, C, N, N) "
                                  "-- reshape it in an output callable")
    if amplitude.shape != phase.shape:
        raise ExportLintError(f"{label}: amplitude {tuple(amplitude.shape)} and phase "
                              f"{tuple(phase.shape)} differ in shape")
    ranges = {name: [float(t.min()), float(t.max())]
              for name, t in (("amplitude", amplitude), ("phase", phase))}
    return tuple(amplitude.shape[1:]), ranges
