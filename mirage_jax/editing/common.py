"""What every weight-editing method shares: where the edited matrices live in the pytree, and the
teacher-forced target NLL that the gradient-based editors (FT-M, MEND) minimise."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.model.transformer import unembed
from mirage_jax.tokens import EditInputError, read_slots

T = TypeVar("T")


def down_kernel(params: Any, layer: int) -> jax.Array:
    """MLP down projection of `layer` as a Flax kernel ``[d_ff, d]`` (HF weight transposed)."""
    return params["layers"][layer]["mlp"]["down"]["kernel"]


def replace_mlp(params: Any, updates: Mapping[tuple[int, str], Any]) -> Any:
    """A new pytree with ``layers[l]["mlp"][name]`` replaced by ``updates[(l, name)]`` (a dict of
    leaves); every other leaf is shared, so the original pytree stays valid (restoring an edit
    is keeping the old one)."""
    layers = list(params["layers"])
    for (layer, name), leaf in updates.items():
        layers[layer] = dict(layers[layer], mlp=dict(layers[layer]["mlp"], **{name: leaf}))
    return dict(params, layers=layers)


def replace_mlp_kernels(params: Any, kernels: Mapping[tuple[int, str], jax.Array]) -> Any:
    """Replace MLP kernels ``{(layer, 'gate'|'up'|'down'): kernel}``, cast to the old dtype."""
    mlp = lambda l, n: params["layers"][l]["mlp"][n]  # noqa: E731
    return replace_mlp(params, {(l, n): dict(mlp(l, n), kernel=k.astype(mlp(l, n)["kernel"].dtype))
                                for (l, n), k in kernels.items()})


def replace_down_kernels(params: Any, kernels: Mapping[int, jax.Array]) -> Any:
    """Replace the down kernels of some layers (ROME, MEMIT, FT)."""
    return replace_mlp_kernels(params, {(layer, "down"): k for layer, k in kernels.items()})


def for_case(request: Any, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), with an `EditInputError` prefixed by the request's case id: the runner skips
    that one request and the message names the record to fix."""
    try:
        return fn(*args)
    except EditInputError as err:
        raise EditInputError(f"case {getattr(request, 'case_id', '?')}: {err}") from None


def check_layers(layers, num_layers: int, method: str) -> None:
    for layer in layers:
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"{method}: layer {layer} out of range; the model has layers 0..{num_layers - 1}")


def per_row_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]``: the mean of `values` ``[B, T]`` over each row's `mask`ed entries (0 for a row without any)."""
    return (values * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def mean_per_request(token_nll: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `token_nll` [B, T] over each row's `mask`ed tokens, then over the rows that have any:
    every request weighs the same whatever its target length, and filler rows (no target) count
    for nothing."""
    per_row = per_row_mean(token_nll, mask)
    rows = mask.sum(-1) > 0
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(rows.sum(), 1)


def target_nll(logits: jax.Array, tokens: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Teacher-forced NLL of the target tokens of a `make_batch` batch (FT-M's objective, MEND's
    edit loss): ``−log p(tokens[t+1] | tokens[:t+1])`` at every position t whose *next* token is a
    target, `mean_per_request`. Prompt and padding tokens contribute nothing."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # position t predicts token t + 1
    tok_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return mean_per_request(-tok_lp, target_mask[:, 1:])


class Reads(NamedTuple):
    """Where the loss reads the model, packed: `[B, K]` positions whose output distribution scores a
    target token, the token, and a mask (K = `read_slots` of the most target tokens of a row).

    FT-M reads position t for the target token at t + 1 (teacher forcing); FT-L reads the last
    prompt token for every target token (a bag of tokens under one distribution). Only these K
    positions go through the LM head -- a 49k-word vocabulary costs as much as ten layers of a small
    model per position, and the other positions' logits were computed to be masked away.
    """

    pos: jax.Array  # [B, K] int32
    tok: jax.Array  # [B, K] int32
    mask: jax.Array  # [B, K] float32


def loss_reads(tokens: np.ndarray, target_mask: np.ndarray, prompt_last: np.ndarray, objective: str) -> Reads:
    """The packed reads of a `make_batch` batch for `objective` ('target_new' or 'prompt_last');
    rows whose `target_mask` is all zero (e.g. WISE's irrelevant row) read nothing."""
    b = tokens.shape[0]
    targets = [np.flatnonzero(target_mask[r]) for r in range(b)]
    k = read_slots(max((len(t) for t in targets), default=1), tokens.shape[1])
    pos, tok, mask = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32), np.zeros((b, k), np.float32)
    for r, idx in enumerate(targets):
        n = len(idx)
        pos[r, :n] = idx - 1 if objective == "target_new" else prompt_last[r]
        tok[r, :n], mask[r, :n] = tokens[r, idx], 1.0
    return Reads(jnp.asarray(pos), jnp.asarray(tok), jnp.asarray(mask))


def read_nll(params: Any, cfg: Any, hidden: jax.Array, reads: Reads) -> jax.Array:
    """`mean_per_request` NLL of the read target tokens, given the final hidden states ``[B, T, D]``
    (a forward with ``return_logits=False``): equals `target_nll` on the full logits for FT-M's reads,
    at K/T of its LM-head cost."""
    at = jnp.take_along_axis(hidden, reads.pos[:, :, None], axis=1)
    return mean_per_request(token_nll_at(params, cfg, at, reads.tok), reads.mask)


def token_nll_at(params: Any, cfg: Any, hidden: jax.Array, tok: jax.Array) -> jax.Array:
    """``[B, K]``: -log p(`tok`) under the next-token distribution of the final hidden states
    ``[B, K, D]`` (only these go through the LM head)."""
    logits = unembed(params, cfg, hidden)  # [B, K, V]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[..., None], axis=-1)[..., 0]
