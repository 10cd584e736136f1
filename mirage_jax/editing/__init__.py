"""Editing methods: each a pure function `(params, cfg, tokenizer, requests, hp, **ctx) -> (params, info)`.

`ctx` holds what some methods need beyond the request: `stats` (second moments of the MLP keys,
for MEMIT / AlphaEdit / ROME with mom2_adjustment), `state` (what a method carries from one
edit of a sequence to the next; returned as `info["state"]`) and what `EditMethod.prepare`
computed once per run from the unedited model (ROME / MEMIT's context templates, MEND's editor
weights). Nothing is cached behind the caller's back: a run holds these values for its lifetime.

The registry is the one place that maps a method name (as the paper spells it) to its
hyper-parameter dataclass and its edit function. A method never imports the evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mirage_jax.editing.ft import FTConfig, ft_edit, ft_edit_each
from mirage_jax.editing.grace import GRACEConfig, grace_edit
from mirage_jax.editing.memit import MEMITConfig, memit_edit
from mirage_jax.editing.mend import MENDConfig, editor_net, mend_edit, resolve_editor
from mirage_jax.editing.rome import ROMEConfig, rome_edit
from mirage_jax.editing.templates import templates_for
from mirage_jax.editing.wise import WISEConfig, wise_edit, wise_templates

EditFn = Callable[..., tuple[Any, dict]]
EachFn = Callable[..., list[tuple[Any, dict]]]
PrepareFn = Callable[[Any, Any, Any, Any], dict]  # (params, cfg, tokenizer, hp) -> extra ctx for `apply`


def _nothing(params: Any, cfg: Any, tokenizer: Any, hp: Any) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class EditMethod:
    name: str
    hparams_cls: type
    apply: EditFn  # (params, cfg, tokenizer, requests, hp, **ctx) -> (new params, info)
    batchable: bool  # may edit several requests in one application (batch mode)
    needs_stats: Callable[[Any], bool] = lambda hp: False  # whether `hp` requires key statistics
    # Inputs that stay the same for every edit of a run, computed once from the unedited model
    # and passed to each `apply` as keyword arguments (the seed samples ROME's templates once
    # per process; a MEND archive is read once).
    prepare: PrepareFn = _nothing
    # Synthetic evaluation also in the seed's generated variant (spec 2.2): the seed evaluates GRACE
    # that way (vanilla generation), so its numbers are only comparable with it.
    generated_synthetic: bool = False
    # Single mode's edits of several requests, each from the same params, computed together
    # (params, cfg, tokenizer, requests, hp, **ctx) -> [(new params, info)] per request; None: one
    # `apply` per request.
    apply_each: EachFn | None = None


def _ft(params, cfg, tokenizer, requests, hp: FTConfig):
    return ft_edit(params, cfg, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], hp)


def _ft_each(params, cfg, tokenizer, requests, hp: FTConfig):
    return ft_edit_each(params, cfg, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], hp)


def _grace(params, cfg, tokenizer, requests, hp: GRACEConfig, stats=None, state=None):
    return grace_edit(params, cfg, tokenizer, requests, hp)


def _wise(params, cfg, tokenizer, requests, hp: WISEConfig, stats=None, state=None, templates=None):
    return wise_edit(params, cfg, tokenizer, requests, hp, templates)


def _wise_prepare(params, cfg, tokenizer, hp: WISEConfig) -> dict:
    return {"templates": wise_templates(params, cfg, tokenizer)}


def _mend(params, cfg, tokenizer, requests, hp: MENDConfig, stats=None, state=None, editor=None):
    return mend_edit(params, cfg, tokenizer, requests, hp, editor)


def _mend_prepare(params, cfg, tokenizer, hp: MENDConfig) -> dict:
    return {"editor": resolve_editor(editor_net(cfg, params, hp), hp)} if hp.archive else {}


def _templates(params, cfg, tokenizer, hp) -> dict:
    return {"templates": templates_for(params, cfg, tokenizer, hp)}


def _rome_as(variant: str) -> EditFn:
    """The method name decides the variant, whatever `hp.variant` says."""

    def apply(params, cfg, tokenizer, requests, hp: ROMEConfig, stats=None, state=None, templates=None):
        return rome_edit(params, cfg, tokenizer, requests, dataclasses.replace(hp, variant=variant), stats, templates)

    return apply


def _memit_as(algorithm: str) -> EditFn:
    def apply(params, cfg, tokenizer, requests, hp: MEMITConfig, stats=None, state=None, templates=None):
        return memit_edit(params, cfg, tokenizer, requests, dataclasses.replace(hp, algorithm=algorithm), stats, state,
                          templates)

    return apply


METHODS: dict[str, EditMethod] = {
    "FT-L": EditMethod("FT-L", FTConfig, _ft, batchable=True, apply_each=_ft_each),
    "FT-M": EditMethod("FT-M", FTConfig, _ft, batchable=True, apply_each=_ft_each),
    # One request at a time; several requests are applied one after the other.
    "ROME": EditMethod("ROME", ROMEConfig, _rome_as("rome"), False, lambda hp: hp.mom2_adjustment, _templates),
    "R-ROME": EditMethod("R-ROME", ROMEConfig, _rome_as("r-rome"), False, lambda hp: hp.mom2_adjustment, _templates),
    "MEMIT": EditMethod("MEMIT", MEMITConfig, _memit_as("memit"), True, lambda hp: True, _templates),
    "AlphaEdit": EditMethod("AlphaEdit", MEMITConfig, _memit_as("alphaedit"), True, lambda hp: True, _templates),
    # Untrained (hp.archive None): one SGD step of edit_lr on the inner matrices.
    "MEND": EditMethod("MEND", MENDConfig, _mend, batchable=True, prepare=_mend_prepare),
    # An adapter (a codebook under the edited layer's mlp), not a weight delta; one request per edit.
    "GRACE": EditMethod("GRACE", GRACEConfig, _grace, batchable=False, generated_synthetic=True),
    # An adapter too (side memory + shards under the edited layer's mlp); one request per edit.
    "WISE": EditMethod("WISE", WISEConfig, _wise, batchable=False, prepare=_wise_prepare),
}


class UnknownMethodError(ValueError):
    pass


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
