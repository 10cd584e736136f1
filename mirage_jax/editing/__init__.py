"""Editing methods: each a pure function `(params, cfg, tokenizer, requests, hp) -> (params, info)`.

The registry is the one place that maps a method name (as the paper spells it) to its
hyper-parameter dataclass and its edit function. A method never imports the evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from mirage_jax.editing.ft import FTConfig, ft_edit

EditFn = Callable[[Any, Any, Any, Sequence[Any], Any], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class EditMethod:
    name: str
    hparams_cls: type
    apply: EditFn  # (params, cfg, tokenizer, requests, hp) -> (new params, info)
    batchable: bool  # may edit several requests in one application (batch mode)


def _ft(params, cfg, tokenizer, requests, hp: FTConfig):
    return ft_edit(params, cfg, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], hp)


METHODS: dict[str, EditMethod] = {
    "FT-L": EditMethod("FT-L", FTConfig, _ft, batchable=True),
    "FT-M": EditMethod("FT-M", FTConfig, _ft, batchable=True),
}


class UnknownMethodError(ValueError):
    pass


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
