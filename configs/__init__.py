"""Hyper-parameters per method x model: the only place they live.

`get_hparams(method, model_name, overrides)` picks the table entry whose key the model name
contains (case-insensitive), then applies command-line overrides ("key=value").
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from configs import ft, memit, mend, rome

# method -> {model key -> hparams}; keys are matched as substrings of the lower-cased model name.
TABLES: dict[str, dict[str, Any]] = {"FT-M": ft.FT_M, "FT-L": ft.FT_L, "ROME": rome.ROME, "R-ROME": rome.R_ROME,
                                  "MEMIT": memit.MEMIT, "AlphaEdit": memit.ALPHAEDIT, "MEND": mend.MEND}
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


def _parse(default: Any, raw: str) -> Any:
    """JSON where it parses ("1e-3", "[20, 21]", "true"), else the string; "none" is None;
    a tuple field also takes "20,21"."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(default, tuple):
        if not isinstance(value, list):
            value = [json.loads(v) if v.strip().lstrip("-").replace(".", "", 1).isdigit() else v.strip()
                     for v in raw.split(",") if v.strip()]
        return tuple(value)
    return value


def apply_overrides(hp: Any, overrides: Sequence[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(hp)}
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise HparamError(f"bad override {item!r}; expected key=value with key in: {', '.join(fields)}")
        changes[key] = _parse(fields[key].default, raw)
    return dataclasses.replace(hp, **changes)


def get_hparams(method: str, model_name: str, overrides: Sequence[str] = (), key: str | None = None) -> Any:
    if method not in TABLES:
        raise HparamError(f"no hyper-parameter table for method {method!r}; valid: {', '.join(TABLES)}")
    key = key or model_key(method, model_name)
    if key not in TABLES[method]:
        raise HparamError(f"{method}: unknown model key {key!r}; known: {', '.join(TABLES[method])}")
    return apply_overrides(TABLES[method][key], overrides)
