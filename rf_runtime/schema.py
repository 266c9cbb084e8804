"""Validation at the boundary: one typed reader for every file format, one integer check, one finite check.

Each file format (bundle manifest, stream snapshot header, training config, model card) is a set of
frozen dataclasses; ``parse(cls, raw, ...)`` checks a decoded JSON / YAML value against the
annotations and builds the dataclass, or raises the format's error naming the key, the expected
type and what it got:

    parse(FileEntry, {"path": "a.onnx", "sha256": "..", "bytes": "12"}, where="bundle/manifest.json",
          error=BundleError, prefix="files.dit_step.")
    -> BundleError: bundle/manifest.json: key 'files.dit_step.bytes' must be an integer, got '12'

Supported annotations: dataclasses (unknown keys refused, unless the class sets
``_extra_keys = True``), ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[str, X]``, ``dict`` (any mapping), ``int`` (Python or numpy integers, never bools), ``float``,
``bool``, ``str``, ``typing.Any``. Lists become tuples where the annotation says tuple. numpy only.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, Callable

import numpy as np

from rf_runtime.errors import InputError, RFError


def is_int(value) -> bool:
    """True for Python and numpy integers; False for bools (``True`` is not one frame) and all else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_int(
    value,
    name: str,
    *,
    minimum: int | None = None,
    none_ok: bool = False,
    error: type[RFError] = InputError,
    hint: str = "",
) -> int | None:
    """``value`` as a Python int, checked: an integer (Python or numpy, not a bool) >= ``minimum``;
    None passes when ``none_ok``. Anything else raises ``error`` naming ``name``."""
    if value is None and none_ok:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        want = (
            "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if none_ok else "")
        )
        kind = "" if type(value) in (int, float, str, type(None)) else f" ({type(value).__name__})"
        raise error(f"{name} must be {want}, got {value!r}{kind}" + (f": {hint}" if hint else ""))
    return int(value)


def first_nonfinite(arrays: dict) -> str | None:
    """The name of the first array (numpy, or anything with ``.isfinite``-able values such as a torch
    tensor) holding a NaN or an infinity, or None when all are finite. Integer arrays are finite."""
    for name, a in arrays.items():
        if hasattr(a, "is_floating_point"):  # a torch tensor; no torch import here
            if a.is_floating_point() and not bool(a.isfinite().all()):
                return name
            continue
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return name
    return None


def require_finite(arrays: dict, where: str, error: type[RFError], hint: str) -> None:
    """Raise ``error`` naming the first array of ``arrays`` that holds a NaN or an infinity."""
    bad = first_nonfinite(arrays)
    if bad is not None:
        raise error(f"{where}: {bad} holds NaN or infinite values: {hint}")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {sorted(f.name for f in dataclasses.fields(tp))}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict or tp is dict:
        return "a mapping" + (f" of {_plural(args[1])}" if args else "")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, _describe(tp))


def _convert(value, tp, key: str, fail: Callable[[str, str, Any], Exception], yaml_numbers: bool):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None or len(inner) != 1:
            raise fail(key, _describe(tp), value)
        return _convert(value, inner[0], key, fail, yaml_numbers)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(key, _describe(tp), value)
        return _build(tp, value, key + ".", fail, yaml_numbers)
    if origin is tuple or origin is list:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise fail(key, _describe(tp), value)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            out = [_convert(v, args[0], f"{key}[{i}]", fail, yaml_numbers) for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise fail(key, _describe(tp), value)
            out = [
                _convert(v, a, f"{key}[{i}]", fail, yaml_numbers) for i, (v, a) in enumerate(zip(value, args))
            ]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail(key, _describe(tp), value)
        args = typing.get_args(tp)
        if not args:
            return value
        return {k: _convert(v, args[1], f"{key}.{k}", fail, yaml_numbers) for k, v in value.items()}
    if tp is float:
        if yaml_numbers and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating)):
            raise fail(key, "a number", value)
        return float(value)
    if tp is int:
        if not is_int(value):
            raise fail(key, "an integer", value)
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(key, "true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise fail(key, "a string", value)
        return value
    raise fail(key, f"a value of the unsupported type {tp}", value)


def _build(cls, raw: dict, prefix: str, fail, yaml_numbers: bool):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown and not getattr(cls, "_extra_keys", False):
        raise fail(f"{prefix}{unknown[0]}", sorted(fields), None)
    missing = [
        n
        for n, f in fields.items()
        if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise fail(f"{prefix}{missing[0]}", _describe(hints[missing[0]]), dataclasses.MISSING)
    return cls(
        **{k: _convert(v, hints[k], prefix + k, fail, yaml_numbers) for k, v in raw.items() if k in fields}
    )


def parse(
    cls,
    raw,
    *,
    where: str,
    error: type[RFError],
    hint: str,
    prefix: str = "",
    what: str = "key",
    yaml_numbers: bool = False,
    valid_keys: Callable[[str], list] | None = None,
):
    """Build the dataclass ``cls`` from ``raw`` (a decoded JSON/YAML mapping), or raise ``error``:
    "<where>: <what> '<key>' must be <type>, got <value>: <hint>" (also for a missing or unknown key).
    ``yaml_numbers``: accept strings such as "1e-4" for floats (YAML 1.1 reads them as strings)."""
    head = f"{where}: " if where else ""

    def fail(key: str, want: str | None, got):
        if isinstance(want, list):  # an unknown key; ``want``: the valid ones
            parent = key.rpartition(".")[0]
            return error(
                f"{head}unknown {what} '{key}'; valid keys{' under ' + parent if parent else ''} are "
                f"{want}: {hint}"
            )
        if got is dataclasses.MISSING:
            return error(f"{head}{what} '{key}' is required ({want}) and missing: {hint}")
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        return error(f"{head}{what} '{key}' must be {want}, got {shown}: {hint}")

    if not isinstance(raw, dict):
        kind = type(raw).__name__ if raw is not None else "nothing"
        raise error(
            f"{head}{'the file' if not prefix else what + ' ' + repr(prefix[:-1])} must be a mapping of keys "
            f"to values, got {kind}: {hint}"
        )
    return _build(cls, raw, prefix, fail, yaml_numbers)
