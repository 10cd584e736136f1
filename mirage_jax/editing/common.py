"""What every weight-editing method shares: where the edited matrices live in the pytree."""

from __future__ import annotations

from typing import Any, Mapping

import jax


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


def check_layers(layers, num_layers: int, method: str) -> None:
    for layer in layers:
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"{method}: layer {layer} out of range; the model has layers 0..{num_layers - 1}")
