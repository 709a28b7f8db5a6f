"""Read the plain data in a pickle (or dill) file without unpickling it.

Upstream bundles keep their configuration as `dill` pickles. Unpickling runs whatever code
the file names, so it is never done here. Instead the opcodes are interpreted one by one
(`pickletools.genops`): numbers, strings, bytes, None, booleans, lists, tuples, dicts and
sets are rebuilt; anything that would need a global (a class, a function, a reduce call)
becomes an `Opaque` placeholder that is never called, and is reported as skipped. Numpy
scalars and dtypes are the one exception, decoded from their bytes with `np.frombuffer`
(numeric kinds only), because configs hold them often.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass
from typing import Any

import numpy as np

_NUMPY_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
_NUMPY_DTYPE = ("numpy.dtype",)
_NUMERIC_KINDS = "biufc"
_LITERALS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
}
_EMPTY = {"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


class PlainPickleError(ValueError):
    """The file is not a pickle this reader can walk (damaged, or persistent ids)."""


@dataclass(frozen=True)
class Opaque:
    """What a global, reduce or object-building opcode would have made: only its name."""

    name: str
    args: tuple = ()


def _reduce(func: Any, args: Any) -> Any:
    name = func.name if isinstance(func, Opaque) else "?"
    if name in _NUMPY_DTYPE and isinstance(args, tuple) and args and isinstance(args[0], str):
        return Opaque(name, (args[0],))
    if name in _NUMPY_SCALAR and isinstance(args, tuple) and len(args) == 2 \
            and isinstance(args[0], Opaque) and args[0].name in _NUMPY_DTYPE \
            and isinstance(args[1], bytes):
        try:
            dtype = np.dtype(args[0].args[0])
        except TypeError:
            return Opaque(name)
        if dtype.kind in _NUMERIC_KINDS and dtype.itemsize == len(args[1]):
            return np.frombuffer(args[1], dtype=dtype)[0].item()
    return Opaque(name)


def _walk(data: bytes) -> Any:  # noqa: C901 - one branch per opcode family
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                return stack.pop()
            if name in _LITERALS:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name in _EMPTY:
                stack.append(_EMPTY[name]())
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("TUPLE", "LIST", "FROZENSET"):
                items = pop_mark()
                stack.append({"TUPLE": tuple, "LIST": list, "FROZENSET": frozenset}[name](items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                items = stack[-k:]
                del stack[-k:]
                stack.append(tuple(items))
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif name == "APPEND":
                value = stack.pop()
                if isinstance(stack[-1], list):
                    stack[-1].append(value)
            elif name == "APPENDS":
                items = pop_mark()
                if isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                if isinstance(stack[-1], dict):
                    stack[-1][key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                if isinstance(stack[-1], dict):
                    stack[-1].update(zip(items[::2], items[1::2], strict=True))
            elif name == "ADDITEMS":
                items = pop_mark()
                if isinstance(stack[-1], set):
                    stack[-1].update(items)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[int(arg)])
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(Opaque(f"{module}.{attr}"))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(Opaque(f"{module}.{attr}"))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                stack.append(_reduce(func, args))
            elif name == "NEWOBJ":
                _, cls = stack.pop(), stack.pop()
                stack.append(Opaque(cls.name if isinstance(cls, Opaque) else "?"))
            elif name == "NEWOBJ_EX":
                _, _, cls = stack.pop(), stack.pop(), stack.pop()
                stack.append(Opaque(cls.name if isinstance(cls, Opaque) else "?"))
            elif name == "BUILD":
                stack.pop()  # the state of an object this reader never builds
            elif name == "INST":
                pop_mark()
                module, _, attr = str(arg).partition(" ")
                stack.append(Opaque(f"{module}.{attr}"))
            elif name == "OBJ":
                items = pop_mark()
                first = items[0] if items else None
                stack.append(Opaque(first.name if isinstance(first, Opaque) else "?"))
            elif name in ("EXT1", "EXT2", "EXT4"):
                stack.append(Opaque(f"copyreg extension {arg}"))
            else:  # PERSID, BINPERSID, NEXT_BUFFER, READONLY_BUFFER, ...
                raise PlainPickleError(f"opcode {name} is not plain data")
    except PlainPickleError:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as err:
        raise PlainPickleError(f"not a readable pickle ({type(err).__name__}: {err})") from None
    raise PlainPickleError("not a readable pickle (no STOP opcode)")


def _contains_opaque(value: Any) -> str | None:
    if isinstance(value, Opaque):
        return value.name
    if isinstance(value, dict):
        for k, v in value.items():
            found = _contains_opaque(k) or _contains_opaque(v)
            if found:
                return found
    if isinstance(value, list | tuple | set | frozenset):
        for item in value:
            found = _contains_opaque(item)
            if found:
                return found
    return None


def read_plain_pickle(data: bytes) -> tuple[Any, list[str]]:
    """(plain value, what was skipped). A top-level dict keeps its plain entries and lists
    each skipped key with the type it would have built; any other value that needs code
    comes back as None with one skipped entry."""
    value = _walk(data)
    if isinstance(value, dict):
        kept, skipped = {}, []
        for key, item in value.items():
            found = _contains_opaque(key) or _contains_opaque(item)
            if found:
                skipped.append(f"{key!r} ({found})" if not isinstance(key, Opaque)
                               else f"a key of type {key.name}")
            else:
                kept[key] = item
        return kept, skipped
    found = _contains_opaque(value)
    return (None, [f"the whole value ({found})"]) if found else (value, [])
