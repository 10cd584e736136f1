"""ROME and R-ROME: a rank-one update of one MLP down projection per request (spec 4.2, 4.3).

With W the down projection of layer ℓ (Flax kernel ``[F, d]``: out = k W (+ b)):

1. k* = mean over the context templates of the MLP key k (input of W) at the subject's last
   token; u = C⁻¹ k* with ``mom2_adjustment`` (C = E[k kᵀ], a linear solve), else u = k*;
   u ← u / ‖u‖.
2. δ from the value optimisation (`values.py`), v* = v_init + δ (v_init = W k of the plain
   prompt at the first pass).
3. r = (v* − W k) / (k · u) and W ← W + u rᵀ, so that k maps to v* exactly, where
   - ROME: k, W k are read on the plain prompt;
   - R-ROME, ``key_mode='random_prefix'`` (default): k, W k are averaged over the same
     templates as k*, so the key that defines u is the key that is made to map to v*;
   - R-ROME, ``key_mode='prompt'``: u from the plain-prompt key alone, v* = W k + δ.

Several requests are applied one after the other, each on the model the previous one produced
(ROME edits one fact at a time). Only ``params["layers"][ℓ]["mlp"]["down"]["kernel"]`` changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import distributed
from mirage_jax.editing.common import check_layers, down_kernel, for_case, replace_down_kernels
from mirage_jax.editing.least_squares import KeyStatistics
from mirage_jax.editing.locate import subject_span
from mirage_jax.editing.templates import DEFAULT_LENGTH_PARAMS, templates_for
from mirage_jax.editing.values import ValueSettings, build_problem, value_optimisation
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward

VARIANTS = ("rome", "r-rome")
KEY_MODES = ("random_prefix", "prompt")


@dataclasses.dataclass(frozen=True)
class ROMEConfig:
    layers: tuple[int, ...] = (5,)  # the one layer whose MLP down projection is rewritten (paper: 5)
    v_num_grad_steps: int = 25  # value optimisation: loss evaluations at most (one fewer Adam steps)
    v_lr: float = 0.5  # Adam learning rate of δ
    v_weight_decay: float = 1e-3  # weight of ‖δ‖ / ‖v_init‖² in the value loss
    clamp_norm_factor: float = 4.0  # δ is kept inside the ball of radius factor · ‖v_init‖
    kl_factor: float = 0.0625  # weight of KL(current ‖ initial) on "{subject} is a"
    mom2_adjustment: bool = False  # u = C⁻¹ k* with C the key second moment (needs `stats`)
    context_template_length_params: tuple[tuple[int, int], ...] = DEFAULT_LENGTH_PARAMS  # (tokens, count)
    template_seed: int = 0  # PRNG seed of the sampled context templates
    early_stop_loss: float = 5e-2  # a value optimisation stops once its loss is below this
    variant: str = "rome"  # 'rome' or 'r-rome' (consistent keys in the rank-one update)
    key_mode: str = "random_prefix"  # R-ROME keys: 'random_prefix' (template-averaged) or 'prompt'

    def __post_init__(self):
        # Overrides arrive as lists ("[[5,10],[10,10]]"); keep the dataclass hashable.
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "context_template_length_params",
                           tuple((int(a), int(b)) for a, b in self.context_template_length_params))
        if len(self.layers) != 1:
            raise ValueError(f"ROME edits exactly one layer; got layers={self.layers}")
        if self.variant not in VARIANTS:
            raise ValueError(f"ROME variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"R-ROME key_mode must be one of {KEY_MODES}, got {self.key_mode!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError("v_num_grad_steps must be >= 1")


@functools.partial(jax.jit, static_argnums=(1, 2))
def subject_keys(params, cfg: ModelConfig, layer: int, tokens, attn_mask, subject_last):
    """MLP key k and output W k (+ b) of `layer` at each row's subject-last token, float32."""
    out = forward(params, cfg, tokens, attn_mask=attn_mask, stop_layer=layer + 1,
                  reads=(("mlp_key", layer), ("mlp_out", layer)))
    rows = jnp.arange(tokens.shape[0])
    k = out.reads[("mlp_key", layer)][rows, subject_last].astype(jnp.float32)
    wk = out.reads[("mlp_out", layer)][rows, subject_last].astype(jnp.float32)
    return k, wk


@jax.jit
def rank_one_update(kernel, u, k, wk, v_star):
    """W + u rᵀ with r = (v* − W k) / (k · u), computed in float32; returns (kernel, r)."""
    r = (v_star - wk) / jnp.dot(k, u)
    return (kernel.astype(jnp.float32) + jnp.outer(u, r)).astype(kernel.dtype), r


def key_covariance_solve(stats: KeyStatistics, layer: int, k: np.ndarray) -> np.ndarray:
    """C⁻¹ k by a Cholesky (else LU) solve on the device, never an explicit inverse; `stats`
    factorises C once, so a sequence of edits reuses the factor."""
    factor = stats.second_moment_factor(layer)
    if factor.shape != (k.shape[0],) * 2:
        raise ValueError(f"ROME: the key second moment of layer {layer} has shape {factor.shape}; "
                         f"expected [{k.shape[0]}, {k.shape[0]}]")
    u = distributed.fetch(factor.solve(jnp.asarray(k)))
    if not np.all(np.isfinite(u)):
        raise ValueError(f"ROME: the key second moment of layer {layer} is singular; collect more samples")
    return u


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def rome_edit(params: Any, cfg: ModelConfig, tokenizer: Any, requests: Sequence[Any], hp: ROMEConfig,
              stats: KeyStatistics | None = None, templates: Sequence[str] | None = None) -> tuple[Any, dict]:
    """Apply ROME / R-ROME for each request in turn -> (new params, info). The input pytree is
    untouched; `requests` need `prompt`, `subject`, `target_new` (and `case_id` for messages).
    `templates`: the context templates sampled once per run from the unedited model
    (`templates.context_templates`); None samples them from `params` now."""
    layer = hp.layers[0]
    check_layers(hp.layers, cfg.num_layers, "ROME")
    if hp.mom2_adjustment and stats is None:
        raise ValueError(
            "ROME: mom2_adjustment=True needs key statistics: pass stats=<KeyStats, e.g. from "
            "mirage_jax.editing.stats.find_key_stats> to rome_edit, or set mom2_adjustment=false")
    for r in requests:  # fail before any work, naming the record
        for_case(r, subject_span, r.prompt, r.subject)
    templates = templates_for(params, cfg, tokenizer, hp, templates)
    settings = ValueSettings.from_hparams(hp, layer, "mlp_out")
    m = len(templates)
    edits = []
    for r in requests:
        problem = for_case(r, build_problem, tokenizer, [r.prompt], [r.subject], [r.target_new], templates)
        b = problem.batch
        keys, outs = distributed.fetch(subject_keys(params, cfg, layer, jnp.asarray(b.tokens),
                                                    jnp.asarray(b.attn_mask), jnp.asarray(b.subject_last)))
        k_mean, wk_mean = keys[:m].mean(0), outs[:m].mean(0)  # template-averaged (row 0 = plain)
        k_plain, wk_plain = keys[0], outs[0]
        prompt_keys = hp.variant == "r-rome" and hp.key_mode == "prompt"
        k_u = k_plain if prompt_keys else k_mean
        u = key_covariance_solve(stats, layer, k_u) if hp.mom2_adjustment else k_u
        u = _unit(np.asarray(u, np.float64)).astype(np.float32)
        val = value_optimisation(params, cfg, problem, settings)
        delta, v_init = val.delta[0], val.v_init[0]
        if hp.variant == "rome":
            k, wk, v_star = k_plain, wk_plain, v_init + delta
        elif prompt_keys:
            k, wk, v_star = k_plain, wk_plain, wk_plain + delta
        else:
            k, wk, v_star = k_mean, wk_mean, v_init + delta
        kernel, right = rank_one_update(down_kernel(params, layer), jnp.asarray(u), jnp.asarray(k),
                                        jnp.asarray(wk), jnp.asarray(v_star))
        params = replace_down_kernels(params, {layer: kernel})
        edits.append({
            "case_id": getattr(r, "case_id", None),
            "delta_norm": float(np.linalg.norm(delta)),
            "v_init_norm": float(np.linalg.norm(v_init)),
            "right_vector_norm": float(jnp.linalg.norm(right)),
            "loss": float(val.loss[0]),
            "nll": float(val.nll[0]),
            "kl": float(val.kl[0]),
            "steps": int(val.steps[0]),
        })
    info = {"variant": hp.variant, "layer": layer, "edits": edits, "templates": list(templates)}
    if hp.variant == "r-rome":
        info["key_mode"] = hp.key_mode
    return params, info
