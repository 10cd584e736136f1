"""FT-L / FT-M against their definition: which leaves move, by how much, and when it stops."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mirage_jax.editing.ft import FTConfig, ft_edit
from mirage_jax.evaluation.synthetic import token_accuracy
from mirage_jax.model import load_model
from tiny import save_tiny

PROMPTS, TARGETS = ["t10 t11 t12", "t20 t21"], ["t50 t51", "t60"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny("llama", tmp_path_factory.mktemp("ft"), seed=7))


def _changed(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    return {jax.tree_util.keystr(p) for (p, x), y in zip(la, lb) if not np.array_equal(np.asarray(x), np.asarray(y))}


@pytest.mark.parametrize("objective", ["target_new", "prompt_last"])
def test_only_the_trained_kernels_change_and_the_edit_is_learned(tiny, objective):
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=40, objective=objective)
    new, info = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, hp)
    assert _changed(tiny.params, new) == {"['layers'][1]['mlp']['down']['kernel']"}
    if objective == "target_new":  # FT-M: teacher-forced accuracy of the targets reaches 1
        assert np.mean(token_accuracy(new, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS)) == 1.0
    assert info["steps"] <= 40


def test_linf_norm_constraint_bounds_every_weight_change(tiny):
    eps = 1e-3
    new, _ = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS,
                     FTConfig(layers=(0, 1), lr=1e-1, num_steps=10, norm_constraint=eps))
    for layer in (0, 1):
        d = np.abs(np.asarray(new["layers"][layer]["mlp"]["down"]["kernel"]) -
                   np.asarray(tiny.params["layers"][layer]["mlp"]["down"]["kernel"]))
        assert d.max() <= eps + 1e-7 and d.max() > eps / 2  # the box is reached and respected


def test_early_stop_when_the_loss_is_already_low(tiny):
    # The random tiny model's logits are nearly flat (loss ~3.8 at best), so move the threshold
    # instead of the loss: a loss below it at the first evaluation means no step at all.
    _, info = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, FTConfig(layers=(1,), num_steps=5))
    hp = FTConfig(layers=(1,), lr=1e-2, num_steps=60, early_stop_loss=info["loss"] + 1.0)
    again, info2 = ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, hp)
    assert info2["steps"] == 1 and not _changed(tiny.params, again)


def test_bad_layer_and_empty_target_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="layer 7 out of range"):
        ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, PROMPTS, TARGETS, FTConfig(layers=(7,)))
    with pytest.raises(ValueError, match="empty target"):
        ft_edit(tiny.params, tiny.cfg, tiny.tokenizer, ["t1 t2"], ["  "], FTConfig(layers=(1,)))
