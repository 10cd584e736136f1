"""Editing methods: each a pure function `(params, cfg, tokenizer, requests, hp, **ctx) -> (params, info)`.

`ctx` holds what some methods need beyond the request: `stats` (second moments of the MLP keys,
for MEMIT / AlphaEdit / ROME with mom2_adjustment) and `state` (what a method carries from one
edit of a sequence to the next; returned as `info["state"]`).

The registry is the one place that maps a method name (as the paper spells it) to its
hyper-parameter dataclass and its edit function. A method never imports the evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from mirage_jax.editing.ft import FTConfig, ft_edit
from mirage_jax.editing.memit import MEMITConfig, memit_edit
from mirage_jax.editing.mend import MENDConfig, mend_edit
from mirage_jax.editing.rome import ROMEConfig, rome_edit

EditFn = Callable[..., tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class EditMethod:
    name: str
    hparams_cls: type
    apply: EditFn  # (params, cfg, tokenizer, requests, hp, **ctx) -> (new params, info)
    batchable: bool  # may edit several requests in one application (batch mode)
    needs_stats: Callable[[Any], bool] = lambda hp: False  # whether `hp` requires key statistics


def _ft(params, cfg, tokenizer, requests, hp: FTConfig):
    return ft_edit(params, cfg, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], hp)


def _mend(params, cfg, tokenizer, requests, hp: MENDConfig, stats=None, state=None):
    return mend_edit(params, cfg, tokenizer, requests, hp)


def _rome_as(variant: str) -> EditFn:
    """The method name decides the variant, whatever `hp.variant` says."""

    def apply(params, cfg, tokenizer, requests, hp: ROMEConfig, stats=None, state=None):
        return rome_edit(params, cfg, tokenizer, requests, dataclasses.replace(hp, variant=variant), stats)

    return apply


def _memit_as(algorithm: str) -> EditFn:
    def apply(params, cfg, tokenizer, requests, hp: MEMITConfig, stats=None, state=None):
        return memit_edit(params, cfg, tokenizer, requests, dataclasses.replace(hp, algorithm=algorithm), stats, state)

    return apply


METHODS: dict[str, EditMethod] = {
    "FT-L": EditMethod("FT-L", FTConfig, _ft, batchable=True),
    "FT-M": EditMethod("FT-M", FTConfig, _ft, batchable=True),
    # One request at a time; several requests are applied one after the other.
    "ROME": EditMethod("ROME", ROMEConfig, _rome_as("rome"), False, lambda hp: hp.mom2_adjustment),
    "R-ROME": EditMethod("R-ROME", ROMEConfig, _rome_as("r-rome"), False, lambda hp: hp.mom2_adjustment),
    "MEMIT": EditMethod("MEMIT", MEMITConfig, _memit_as("memit"), True, lambda hp: True),
    "AlphaEdit": EditMethod("AlphaEdit", MEMITConfig, _memit_as("alphaedit"), True, lambda hp: True),
    # Untrained (hp.archive None): one SGD step of edit_lr on the inner matrices.
    "MEND": EditMethod("MEND", MENDConfig, _mend, batchable=True),
}


class UnknownMethodError(ValueError):
    pass


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
