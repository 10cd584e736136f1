"""MEMIT and AlphaEdit: batched multi-layer least-squares edits (spec 4.4; Fang et al. 2025).

For a batch of n requests and edit layers ℓ_1 < ... < ℓ_L (the last one, ℓ_L, is where the target
hidden states live):

1. z_i = h_{ℓ_L,i} + δ_i: the value optimisation (`values.py`) with δ added to the residual
   leaving ℓ_L at the subject's last token, all requests and templates in one jitted loop.
2. For each edit layer ℓ_j in ascending order, on the model updated so far:
   K = keys at the subject's last token (per request, the mean of the plain-prompt key and the
   mean templated key), R = Z − H_{ℓ_L} (current hidden states), spread R / (L − j), and
   - MEMIT:     (λ C_ℓ + Kᵀ K) Δ = Kᵀ R_j
   - AlphaEdit: (P_ℓ (Kᵀ K + K_pᵀ K_p) + α I) Δ = P_ℓ Kᵀ R_j, P_ℓ the null-space projector
                of C_ℓ (so the preserved keys' outputs do not move) and K_pᵀ K_p the keys of
                earlier edits of a sequence (carried in `state`).
   W_ℓ ← W_ℓ + Δ at once, so later layers see the earlier updates.

Everything that runs per step is jitted (value optimisation, key reads, solves); the Python
loop is over the L edit layers only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.editing.common import check_layers, down_kernel, for_case, replace_down_kernels
from mirage_jax.editing.least_squares import KeyStatistics, alphaedit_delta, memit_delta
from mirage_jax.editing.locate import subject_span
from mirage_jax.editing.templates import templates_for
from mirage_jax.editing.values import ValueSettings, build_problem, value_optimisation
from mirage_jax.model.config import ModelConfig
from mirage_jax.model.transformer import forward

ALGORITHMS = ("memit", "alphaedit")


@dataclasses.dataclass(frozen=True)
class MEMITConfig:
    layers: tuple[int, ...] = (4, 5, 6, 7, 8)  # edit layers; z lives at the last one (paper)
    algorithm: str = "memit"  # 'memit' or 'alphaedit' (null-space projected update)
    v_num_grad_steps: int = 25  # value optimisation: loss evaluations at most
    v_lr: float = 0.5  # Adam learning rate of δ
    v_weight_decay: float = 1e-3  # weight of ‖δ‖ / ‖v_init‖²
    clamp_norm_factor: float = 4.0  # ‖δ‖ <= clamp_norm_factor · ‖h‖
    kl_factor: float = 0.0625  # weight of the KL term on "{subject} is a"
    early_stop_loss: float = 5e-2  # a request whose loss is below this stops optimising
    mom2_update_weight: float = 15000.0  # λ: weight of the preserved-key covariance C
    mom2_n_samples: int = 100000  # documents behind C (selects the statistics file)
    nullspace_threshold: float = 2e-2  # AlphaEdit: eigenvalues of C below this span the null space
    l2_reg: float = 10.0  # AlphaEdit: α, ridge term of its normal equations
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 5),)  # MEMIT: 5 of length 10
    template_seed: int = 0  # PRNG seed of the sampled context templates
    batch_size: int = 1  # requests per edit in batch mode
    chunk_size: int = 64  # requests per value optimisation / key read (bounds device memory)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def layer_keys_and_hidden(params, cfg: ModelConfig, layer: int, top: int, tokens, attn_mask, subject_last):
    """Key of `layer` and hidden state leaving `top` at each row's subject-last token."""
    out = forward(params, cfg, tokens, attn_mask=attn_mask, stop_layer=top + 1,
                  reads=(("mlp_key", layer), ("residual", top)))
    rows = jnp.arange(tokens.shape[0])
    return (out.reads[("mlp_key", layer)][rows, subject_last].astype(jnp.float32),
            out.reads[("residual", top)][rows, subject_last].astype(jnp.float32))


def _request_keys(keys: np.ndarray, n: int, m: int) -> np.ndarray:
    """Per request: mean of the plain-prompt key and the mean templated key (MEMIT's k)."""
    k = keys[: n * m].reshape(n, m, -1)
    return 0.5 * (k[:, 0] + k[:, 1:].mean(1)) if m > 1 else k[:, 0]


def memit_edit(params: Any, cfg: ModelConfig, tokenizer: Any, requests: Sequence[Any], hp: MEMITConfig,
               stats: KeyStatistics | None = None, state: dict | None = None,
               templates: Sequence[str] | None = None) -> tuple[Any, dict]:
    """Edit all `requests` at once -> (new params, info). `stats` gives C on the device (MEMIT)
    or its null-space projector (AlphaEdit), each computed once per statistics object.

    info["state"] carries AlphaEdit's accumulated K_pᵀ K_p per layer for the next edit of a
    sequence; pass it back as `state`. `templates`: as in `rome_edit` (None samples them now).
    """
    check_layers(hp.layers, cfg.num_layers, "MEMIT")
    if hp.algorithm not in ALGORITHMS:
        raise ValueError(f"MEMIT: algorithm must be one of {ALGORITHMS}, got {hp.algorithm!r}")
    if stats is None:
        # Imported here: `python -m mirage_jax.editing.stats` must not find itself imported by the package.
        from mirage_jax.editing.stats import missing_stats_error

        raise missing_stats_error(getattr(tokenizer, "name_or_path", "model"), hp.layers)
    for r in requests:  # fail before any work, naming the record
        for_case(r, subject_span, r.prompt, r.subject)
    layers = tuple(sorted(int(l) for l in hp.layers))
    top = layers[-1]
    templates = templates_for(params, cfg, tokenizer, hp, templates)
    n, m = len(requests), len(templates)
    settings = ValueSettings.from_hparams(hp, top, "residual")
    # Thousands of requests: optimise and read keys chunk by chunk (one compiled shape per chunk
    # size); z is fixed before any weight changes, keys are re-read per layer on the current model.
    chunks, z_parts, losses, steps = [], [], [], []
    for s in range(0, n, hp.chunk_size):
        part = requests[s : s + hp.chunk_size]
        problem = build_problem(tokenizer, [r.prompt for r in part], [r.subject for r in part],
                                [r.target_new for r in part], templates)
        val = value_optimisation(params, cfg, problem, settings)
        b = problem.batch
        chunks.append((len(part), jnp.asarray(b.tokens), jnp.asarray(b.attn_mask), jnp.asarray(b.subject_last)))
        z_parts.append(val.v_init + val.delta)  # target hidden states at the top layer
        losses += [float(x) for x in val.loss]
        steps += [int(x) for x in val.steps]
    z = jnp.asarray(np.concatenate(z_parts))
    state = dict(state or {})
    layer_info = []
    for j, layer in enumerate(layers):
        k_parts, h_parts = [], []
        for c, tokens, mask, last in chunks:
            keys, hidden = layer_keys_and_hidden(params, cfg, layer, top, tokens, mask, last)
            k_parts.append(_request_keys(np.asarray(keys), c, m))
            h_parts.append(np.asarray(hidden)[np.arange(c) * m])
        k = jnp.asarray(np.concatenate(k_parts))
        resid = (z - jnp.asarray(np.concatenate(h_parts))) / (len(layers) - j)
        if hp.algorithm == "memit":
            cov = _checked(stats.second_moment_device(layer), layer, cfg.intermediate_size)
            delta = memit_delta(k, resid, cov, hp.mom2_update_weight)
        else:
            proj = _checked(stats.projector(layer, hp.nullspace_threshold), layer, cfg.intermediate_size)
            prev = state.get(layer, jnp.zeros_like(proj))
            delta = alphaedit_delta(k, resid, proj, prev, hp.l2_reg)
            state[layer] = prev + k.T @ k
        kernel = down_kernel(params, layer)
        params = replace_down_kernels(params, {layer: kernel.astype(jnp.float32) + delta})
        layer_info.append({"layer": layer, "resid_norm": float(jnp.linalg.norm(resid, axis=-1).mean()),
                           "delta_norm": float(jnp.linalg.norm(delta))})
    info = {"algorithm": hp.algorithm, "layers": list(layers), "templates": list(templates),
            "z_loss": losses, "z_steps": steps,
            "per_layer": layer_info}
    if hp.algorithm == "alphaedit":
        info["state"] = state
    return params, info


def _checked(matrix: jax.Array, layer: int, d_ff: int) -> jax.Array:
    """`matrix` (C or P of `layer`) if it is [d_ff, d_ff]; statistics of another model are an error."""
    if matrix.shape != (d_ff, d_ff):
        raise ValueError(f"MEMIT: statistics of layer {layer} have shape {matrix.shape}; expected ({d_ff}, {d_ff})")
    return matrix
