"""Hyper-parameters per method x model: the only place they live.

`get_hparams(method, model_name, overrides)` picks the table entry whose key the model name
contains (case-insensitive), then applies command-line overrides ("key=value").
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

from configs import ft, grace, memit, mend, rome, wise

# method -> {model key -> hparams}; keys are matched as substrings of the lower-cased model name.
TABLES: dict[str, dict[str, Any]] = {"FT-M": ft.FT_M, "FT-L": ft.FT_L, "ROME": rome.ROME, "R-ROME": rome.R_ROME,
                                  "MEMIT": memit.MEMIT, "AlphaEdit": memit.ALPHAEDIT, "MEND": mend.MEND,
                                  "GRACE": grace.GRACE, "WISE": wise.WISE}
DEFAULT_KEY = "smollm2-135m"  # the embedded default model


class HparamError(ValueError):
    pass


def model_key(method: str, model_name: str) -> str:
    table = TABLES[method]
    name = model_name.lower()
    for key in sorted(table, key=len, reverse=True):
        if key in name:
            return key
    raise HparamError(
        f"no {method} hyper-parameters for model {model_name!r}; known: {', '.join(table)}. "
        f"Pass --hparams_for=<one of those> to borrow a table entry and --hp key=value to adjust it"
    )


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any) -> Any:
    """`value` (a string, or what JSON gave) as the declared type `tp`; ValueError if it is not one.

    Supports what our config dataclasses declare: bool, int, float, str, `X | None` and tuples
    (`tuple[T, ...]` and fixed `tuple[A, B]`), nested."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for alt in (a for a in args if a is not type(None)):
            try:
                return _coerce(alt, value)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{value!r} has {len(value)} items, expected {len(args)}")
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise ValueError(f"{value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
        try:  # "1e5" for a sample count
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not number.is_integer():
            raise ValueError(f"{value!r} is not an integer") from None
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
    if tp is str:
        return value if isinstance(value, str) else json.dumps(value)
    raise ValueError(f"overrides of type {_type_name(tp)} are not supported")


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def apply_overrides(hp: Any, overrides: Sequence[str]) -> Any:
    """`hp` with "key=value" overrides, each parsed by the field's declared type: "20,21" or
    "[20, 21]" for a tuple, "none" for an optional field, "true"/"false" for a bool.

    A wrong value names the field, its type and what was given (one line, no traceback)."""
    cls = type(hp)
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(hp)]
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise HparamError(f"bad override {item!r}; expected key=value with key in: {', '.join(fields)}")
        try:
            changes[key] = _coerce(hints[key], raw.strip())
        except ValueError as err:  # json.JSONDecodeError included
            raise HparamError(f"--hp {key}: {cls.__name__}.{key} is {_type_name(hints[key])}, "
                              f"got {raw!r} ({err})") from None
    return dataclasses.replace(hp, **changes)


def get_hparams(method: str, model_name: str, overrides: Sequence[str] = (), key: str | None = None) -> Any:
    if method not in TABLES:
        raise HparamError(f"no hyper-parameter table for method {method!r}; valid: {', '.join(TABLES)}")
    key = key or model_key(method, model_name)
    if key not in TABLES[method]:
        raise HparamError(f"{method}: unknown model key {key!r}; known: {', '.join(TABLES[method])}")
    return apply_overrides(TABLES[method][key], overrides)
