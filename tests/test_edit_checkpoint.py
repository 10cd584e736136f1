"""Sequence checkpoints (`mirage_jax.edit_checkpoint`): only the difference is stored, and it comes
back bit for bit; files from other runs or damaged ones are one-line errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import edit_checkpoint as ec
from mirage_jax.model import diff


def _base():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"embed": {"embedding": jax.random.normal(k[0], (8, 4)).astype(jnp.bfloat16)},
            "layers": [{"mlp": {"down": {"kernel": jax.random.normal(k[1], (6, 4))}}},
                       {"mlp": {"down": {"kernel": jax.random.normal(k[2], (6, 4))}}}]}


def _edited(base):
    """Layer 1's kernel changed, an adapter added under layer 0, the embedding rebuilt with equal
    values (a new object: must not be stored), layer 0's kernel shared."""
    layers = [dict(base["layers"][0], mlp=dict(base["layers"][0]["mlp"],
                                               grace={"keys": jnp.ones((2, 6)), "count": jnp.int32(1)})),
              {"mlp": {"down": {"kernel": base["layers"][1]["mlp"]["down"]["kernel"] + 1.0}}}]
    return {"embed": {"embedding": jnp.array(np.asarray(base["embed"]["embedding"]))}, "layers": layers}


def test_only_the_difference_is_stored_and_it_comes_back_bit_for_bit(tmp_path):
    base = _base()
    params = _edited(base)
    state = {5: jnp.arange(4.0), "x": jnp.ones((2,), jnp.bfloat16)}
    assert set(map(jax.tree_util.keystr, diff.changed_leaves(base, params))) == {
        "['layers'][0]['mlp']['grace']['keys']", "['layers'][0]['mlp']['grace']['count']",
        "['layers'][1]['mlp']['down']['kernel']"}
    path = tmp_path / "seq.npz"
    ec.save(path, "k1", base, ec.SequenceState(3, params, state, {7: {"loss": 0.5}}))
    with np.load(path) as z:
        assert len(z.files) == 1 + 3 + 2  # manifest, three changed leaves, two state entries
    got = ec.load(path, "k1", base)
    assert got.n_chunks == 3 and got.infos == {7: {"loss": 0.5}}
    assert jax.tree_util.tree_structure(got.params) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert set(got.state) == {5, "x"} and got.state["x"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.state[5], state[5])
    # shared leaves stay shared: the unedited pytree's own arrays, not copies
    assert got.params["layers"][0]["mlp"]["down"]["kernel"] is base["layers"][0]["mlp"]["down"]["kernel"]
    assert ec.load(tmp_path / "none.npz", "k1", base) is None
    none_state = ec.SequenceState(1, base, None, {})
    ec.save(path, "k1", base, none_state)
    assert ec.load(path, "k1", base).state is None


def test_other_runs_damaged_files_and_unstorable_edits_are_one_line_errors(tmp_path):
    base = _base()
    path = tmp_path / "seq.npz"
    ec.save(path, "k1", base, ec.SequenceState(1, _edited(base), None, {}))
    with pytest.raises(ec.CheckpointError, match="other settings"):
        ec.load(path, "k2", base)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ec.CheckpointError, match="delete it"):
        ec.load(path, "k1", base)
    gone = {"embed": base["embed"], "layers": base["layers"][:1]}
    with pytest.raises(ec.CheckpointError, match="removed"):
        ec.save(path, "k1", base, ec.SequenceState(1, gone, None, {}))
    with pytest.raises(ec.CheckpointError, match="not a dict of arrays"):
        ec.save(path, "k1", base, ec.SequenceState(1, base, [jnp.ones(2)], {}))
