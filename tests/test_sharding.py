"""Sharding: mesh strings, the leaf table and its fallbacks, memory at full size, and sharded ==
unsharded for the forward, generation, edits and statistics on 8 CPU devices (in a subprocess)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mirage_jax.model import load_model
from mirage_jax.model import sharding as S
from mirage_jax.model.memory import HARDWARE, MODELS, GiB, abstract_mesh, footprint, param_shapes
from tiny import FAMILIES, save_tiny

HERE = Path(__file__).resolve().parent


def test_mesh_strings():
    assert S.parse_mesh("", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert S.parse_mesh("data:2,tensor:4", 8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert S.parse_mesh("data:2, fsdp:-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad, says in [("data:3", "has 3 devices; this run has 8"), ("model:8", "unknown axis 'model'"),
                      ("data2", "is not axis:size"), ("data:-1,fsdp:-1", "only one axis"),
                      ("data:2,data:4", "given twice"), ("data:0", "sizes are positive"),
                      ("data:3,fsdp:-1", "do not divide")]:
        with pytest.raises(S.MeshError, match=says):
            S.parse_mesh(bad, 8)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {f: load_model(save_tiny(f, tmp_path_factory.mktemp(f), seed=1)) for f in FAMILIES}


def test_param_shapes_equal_every_loaded_family(tiny_models):
    """The memory table's shapes are what the loader builds (so the table cannot drift)."""
    for family, model in tiny_models.items():
        want = jax.tree.map(lambda a: (a.shape, a.dtype), model.params)
        got = jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(model.cfg, jnp.float32))
        assert got == want, family


def test_every_weight_matrix_of_every_family_has_logical_axes(tiny_models):
    """A leaf missing from the table would silently stay replicated: only norms may."""
    for family, model in tiny_models.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
            name = S.leaf_name(path)
            if leaf.ndim == 2 or name.endswith(("q/bias", "k/bias", "v/bias", "up/bias", "gate/bias")):
                assert any(S.logical_axes(path, leaf.ndim)), f"{family}: {name} has no logical axes"


def test_indivisible_heads_fall_back_to_replication_logged_once(caplog):
    mesh = abstract_mesh("tensor:4", 4)
    cfg = MODELS["Llama-2-7B"].replace(num_heads=9, num_kv_heads=3, head_dim=64)  # SmolLM2's head counts
    warned: set = set()
    with caplog.at_level(logging.INFO, logger=S.__name__):
        for _ in range(3):  # three layers' q kernels: one log line
            spec = S.spec_for("layers/*/attn/q/kernel", (576, 576), ("embed", "heads"), mesh, cfg=cfg, warned=warned)
    assert spec == S.PartitionSpec(None, None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "layers/*/attn/q/kernel" in lines[0] and "tensor=4" in lines[0], lines
    # A width that divides is split on the head boundary (576 = 9 * 64 over 3 devices).
    assert S.spec_for("x", (576, 576), ("embed", "heads"), abstract_mesh("tensor:3", 3), cfg=cfg) == \
        S.PartitionSpec(None, "tensor")


def test_memory_at_full_size_70b_fits_v5e16_and_7b_fits_a_v5e_chip():
    """jax.ShapeDtypeStructs only: per-device bytes with the default rules (BUILD_NOTES table)."""
    n, cap = HARDWARE["v5e-16"]
    fp = footprint(MODELS["Llama-2-70B"], abstract_mesh("", n))
    assert fp.total <= cap * GiB
    # ~69B parameters in bf16 split 16 ways (the embedding and head along the width too).
    assert abs(fp.params - 2 * 68.98e9 / 16) / fp.params < 0.01
    n, cap = HARDWARE["v5e-8"]
    for name in ("Llama-2-7B", "Llama-3-8B", "Mistral-7B"):
        assert footprint(MODELS[name], abstract_mesh("", n)).total <= cap * GiB, name
    # ... and on one 16 GiB chip alone a 7B model's bf16 weights (12.6 GiB) leave too little for an edit.
    one = footprint(MODELS["Llama-3-8B"], abstract_mesh("", 1))
    assert one.params > 14 * GiB


def test_sharded_equals_unsharded_on_8_cpu_devices(tmp_path):
    """Loading into shards, forward, greedy generation (with and without a shared prompt prefix), key
    statistics and FT-M / ROME / MEMIT / MEND edits on meshes data:8, fsdp:8 and data:2,tensor:4 vs one
    device (tests/mesh_worker.py).

    Edited leaves agree within 1e-5, or within 10x what 1e-7 relative parameter noise does to the
    same edit on one device (MEMIT with λ = 1 amplifies rounding; measured in the worker).
    """
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "mesh_worker.py"), str(out), "data:8", "fsdp:8",
                           "data:2,tensor:4"], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 8 and res["shared_prefill"] >= 1  # SHARED's prefix was prefilled once
    for spec in ("data:8", "fsdp:8", "data:2,tensor:4"):
        r = res[spec]
        assert r["loaded_equal"], spec
        assert r["forward"] <= 1e-5, (spec, r["forward"])
        assert r["greedy_identical"], spec
        assert r["stats"] <= 1e-5, (spec, r["stats"])
        for method, diff in r["edits"].items():  # within 1e-5, or within what rounding alone does
            assert diff <= max(1e-5, 10 * res["rounding"][method]), (spec, method, diff, res["rounding"][method])
    # The layouts really differ: weights split on fsdp / tensor, replicated on data.
    assert res["fsdp:8"]["specs"]["layers/*/mlp/up/kernel"] == str(S.PartitionSpec("fsdp", None))
    assert res["data:2,tensor:4"]["specs"]["layers/*/mlp/up/kernel"] == str(S.PartitionSpec(None, "tensor"))
    assert res["data:8"]["specs"]["layers/*/mlp/up/kernel"] == str(S.PartitionSpec(None, None))


def test_mesh_flag_is_checked_and_one_device_needs_no_mesh():
    from absl import flags

    from mirage_jax import cli

    assert jax.device_count() == 1  # the test process (the 8-device runs are subprocesses)
    for value, error in (("fsdp:-1", None), ("", None), ("data:2", "has 2 devices; this run has 1"),
                         ("model:1", "unknown axis")):
        fv = flags.FlagValues()
        cli.define_model_flags(fv)
        fv(["prog", f"--mesh={value}"])
        if error is None:
            assert cli.mesh_from_flags(fv) is None
        else:
            with pytest.raises(S.MeshError, match=error):
                cli.mesh_from_flags(fv)
