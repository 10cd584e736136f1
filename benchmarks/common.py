"""What the benchmarks share: a random-weight 7B-shaped Llama built straight into a pytree."""

from __future__ import annotations

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, max_position_embeddings=4096, norm_eps=1e-5, rope_theta=10000.0)


def random_llama_params(cfg, seed: int = 0, dtype=None):
    """Parameter pytree of a Llama model (our layout, see model/transformer.py), N(0, 0.02) weights
    and unit norm scales, drawn leaf by leaf on the device in `dtype` (no float32 copy)."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.bfloat16
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 7 * cfg.num_layers))
    normal = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                     static_argnums=1)  # fused: the float32 draw never materialises in full

    def dense(shape):
        return {"kernel": normal(next(keys), shape)}

    def ones():
        return {"scale": jnp.ones((d,), dtype)}

    layers = [
        {"attn_norm": ones(), "mlp_norm": ones(),
         "attn": {"q": dense((d, hq)), "k": dense((d, hk)), "v": dense((d, hk)), "o": dense((hq, d))},
         "mlp": {"gate": dense((d, f)), "up": dense((d, f)), "down": dense((f, d))}}
        for _ in range(cfg.num_layers)
    ]
    return {"embed": {"embedding": normal(next(keys), (v, d))}, "layers": layers, "final_norm": ones(),
            "lm_head": dense((d, v))}


def benchmark_tokenizer(directory: str | None):
    """The tokenizer of a `--random_llama7b` run: a directory's, else the default model's."""
    if directory:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    from mirage_jax.model import load_model

    return load_model("default").tokenizer


def load_edit_subject(model: str, random_llama7b: bool, tokenizer: str | None):
    """(cfg, params, tokenizer, name) to edit: a loaded model, or a random Llama-2-7B-shaped one
    in bfloat16 whose vocabulary is widened to the tokenizer's (every id has an embedding row)."""
    import jax
    import jax.numpy as jnp

    from mirage_jax.model import ModelConfig, load_model

    if not random_llama7b:
        m = load_model(model)
        return m.cfg, m.params, m.tokenizer, m.name
    tok = benchmark_tokenizer(tokenizer)
    cfg = ModelConfig(model_type="llama", **dict(LLAMA2_7B, vocab_size=len(tok)))
    return cfg, jax.block_until_ready(random_llama_params(cfg, dtype=jnp.bfloat16)), tok, "random-llama-2-7b-shape-bf16"
