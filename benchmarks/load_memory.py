"""Peak host memory of loading a checkpoint onto one device vs straight into shards on 8 CPU devices.

A ~1B-parameter Llama-shaped checkpoint (random bf16 weights, safetensors) is written once to
--dir; each load then runs in a fresh process (XLA fixes its device count at start-up) that
reports its peak RSS and the bytes of the loaded parameters. On CPU devices the parameters live in
host memory, so "overhead" = peak RSS - Python/JAX baseline - parameter bytes: what the loader
holds beyond its result (one whole tensor on one device; one device's slice when sharded).

    python benchmarks/load_memory.py --dir=/tmp/load_memory
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from absl import app, flags

from common import REPO

flags.DEFINE_string("dir", "/tmp/load_memory", "where the random checkpoint is written (about 2.2 GB)")
flags.DEFINE_string("worker", None, "internal: load with this mesh ('' = one device) and print JSON")
FLAGS = flags.FLAGS

# Llama-shaped, ~1.1B parameters (TinyLlama-1.1B's config).
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
          "tie_word_embeddings": False}


def write_checkpoint(out: Path) -> Path:
    """Random bf16 weights under HF names, one safetensors file per layer (as large checkpoints ship)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    c, rng = CONFIG, np.random.default_rng(0)
    d, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], d_head(c)
    kv = c["num_key_value_heads"] * hd

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

    files = {"model-embed.safetensors": {"model.embed_tokens.weight": w(v, d), "lm_head.weight": w(v, d),
                                         "model.norm.weight": np.ones(d, ml_dtypes.bfloat16)}}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        files[f"model-{i:02d}.safetensors"] = {
            p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": np.ones(d, ml_dtypes.bfloat16),
            p + "post_attention_layernorm.weight": np.ones(d, ml_dtypes.bfloat16)}
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, str(out / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(CONFIG))
    return out


def d_head(c: dict) -> int:
    return c["hidden_size"] // c["num_attention_heads"]


def worker(ckpt: Path, mesh_spec: str) -> dict:
    """In this process: baseline RSS after JAX starts, then load; peak RSS and parameter bytes."""
    import jax
    import numpy as np

    from mirage_jax.model.checkpoint import load_hf_checkpoint
    from mirage_jax.model.sharding import make_mesh

    jax.numpy.zeros(1).block_until_ready()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    _, params, _ = load_hf_checkpoint(ckpt, dtype="bfloat16", mesh=mesh)
    jax.block_until_ready(params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    leaves = jax.tree_util.tree_leaves(params)
    largest = max(x.nbytes for x in leaves)
    shard = max(s.data.nbytes for x in leaves for s in x.addressable_shards)
    return {"mesh": mesh_spec or "one device", "devices": len(jax.devices()),
            "param_bytes": sum(x.nbytes for x in leaves), "largest_tensor": largest, "largest_shard": shard,
            "base_rss": base, "peak_rss": peak,
            "n_params": int(sum(np.prod(x.shape) for x in leaves))}


def main(argv):
    del argv
    ckpt = Path(FLAGS.dir)
    if FLAGS.worker is not None:
        print(json.dumps(worker(ckpt, FLAGS.worker)))
        return
    write_checkpoint(ckpt)
    rows = []
    for spec, devices in (("", 1), ("fsdp:8", 8)):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run([sys.executable, __file__, f"--dir={ckpt}", f"--worker={spec}"], env=env,
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 1 / 2**20
    print(f"checkpoint: {rows[0]['n_params'] / 1e9:.2f}B parameters, bf16, {rows[0]['param_bytes'] * mb:.0f} MiB")
    print("| load | devices | peak RSS - baseline (MiB) | params (MiB) | overhead (MiB) "
          "| largest tensor / shard (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        grown = r["peak_rss"] - r["base_rss"]
        print(f"| {r['mesh']} | {r['devices']} | {grown * mb:.0f} | {r['param_bytes'] * mb:.0f} | "
              f"{(grown - r['param_bytes']) * mb:.0f} | "
              f"{r['largest_tensor'] * mb:.0f} / {r['largest_shard'] * mb:.0f} |")


if __name__ == "__main__":
    app.run(main)
