"""What every weight-editing method shares: where the edited matrices live in the pytree."""

from __future__ import annotations

from typing import Any, Mapping

import jax


def down_kernel(params: Any, layer: int) -> jax.Array:
    """MLP down projection of `layer` as a Flax kernel ``[d_ff, d]`` (HF weight transposed)."""
    return params["layers"][layer]["mlp"]["down"]["kernel"]


def replace_down_kernels(params: Any, kernels: Mapping[int, jax.Array]) -> Any:
    """A new pytree with those layers' down kernels replaced; every other leaf is shared, so the
    original pytree stays valid (restoring an edit is keeping the old one)."""
    layers = list(params["layers"])
    for layer, kernel in kernels.items():
        old = layers[layer]
        down = dict(old["mlp"]["down"], kernel=kernel.astype(old["mlp"]["down"]["kernel"].dtype))
        layers[layer] = dict(old, mlp=dict(old["mlp"], down=down))
    return dict(params, layers=layers)


def check_layers(layers, num_layers: int, method: str) -> None:
    for layer in layers:
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"{method}: layer {layer} out of range; the model has layers 0..{num_layers - 1}")
