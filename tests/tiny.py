"""Tiny random-init `transformers` checkpoints of every supported family, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

TINY = {"vocab_size": 128, "hidden": 64, "layers": 2, "heads": 4, "inter": 96}


def hf_tiny_config(family: str, **overrides):
    """The HF config of a tiny `family` model; `overrides` are constructor arguments that replace
    or add to ours (e.g. sliding_window=4, rope_scaling={...}), so derived settings are honoured."""
    import transformers as tf

    v, d, n, h, f = (TINY[k] for k in ("vocab_size", "hidden", "layers", "heads", "inter"))
    llama_like = {"vocab_size": v, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": n,
                  "num_attention_heads": h, "num_key_value_heads": 2, "max_position_embeddings": 256}
    gpt_like = {"vocab_size": v, "n_embd": d, "n_layer": n, "n_head": h, "n_positions": 256}
    if family == "llama":
        cls, kw = tf.LlamaConfig, llama_like
    elif family == "llama3":
        cls, kw = tf.LlamaConfig, dict(
            llama_like, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})
    elif family == "mistral":
        cls, kw = tf.MistralConfig, dict(llama_like, sliding_window=None)
    elif family == "qwen2":
        cls, kw = tf.Qwen2Config, dict(llama_like, tie_word_embeddings=True)
    elif family == "gpt2":
        cls, kw = tf.GPT2Config, gpt_like
    elif family == "gptj":
        cls, kw = tf.GPTJConfig, dict(gpt_like, rotary_dim=8)
    else:
        raise ValueError(family)
    return cls(**{**kw, **overrides})


def context_override(family: str, n_positions: int) -> dict:
    """The `hf_tiny_config` override that sets the context length, whatever the family calls it."""
    return {"n_positions": n_positions} if family in ("gpt2", "gptj") else {"max_position_embeddings": n_positions}


FAMILIES = ("llama", "llama3", "mistral", "qwen2", "gpt2", "gptj")


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM"}


def hf_tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor `save_pretrained` writes for the HF config `cfg`, in a fixed order.

    Written out per family from transformers' module definitions (not from our exporter, so a wrong name
    on our side cannot hide behind the same wrong name here); the parity run checks the list against
    `AutoModelForCausalLM.from_config(cfg).state_dict()` (tests/test_golden.py).
    """
    t = cfg.model_type
    if t in ("llama", "mistral", "qwen2"):
        d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        qkv_bias = t == "qwen2" or getattr(cfg, "attention_bias", False)
        out = [("model.embed_tokens.weight", (v, d))]
        for i in range(cfg.num_hidden_layers):
            L = f"model.layers.{i}."
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out.append((f"{L}self_attn.{proj}.weight", (rows, d)))
                if qkv_bias:
                    out.append((f"{L}self_attn.{proj}.bias", (rows,)))
            out.append((f"{L}self_attn.o_proj.weight", (d, q)))
            out += [(f"{L}mlp.gate_proj.weight", (f, d)), (f"{L}mlp.up_proj.weight", (f, d)),
                    (f"{L}mlp.down_proj.weight", (d, f)),
                    (f"{L}input_layernorm.weight", (d,)), (f"{L}post_attention_layernorm.weight", (d,))]
        out.append(("model.norm.weight", (d,)))
        if not cfg.tie_word_embeddings:
            out.append(("lm_head.weight", (v, d)))
        return out
    d, v = cfg.n_embd, cfg.vocab_size
    inner = cfg.n_inner or 4 * d
    ln = lambda n: [(f"{n}.weight", (d,)), (f"{n}.bias", (d,))]  # noqa: E731
    out = [("transformer.wte.weight", (v, d))]
    if t == "gpt2":  # Conv1D: weights are [in, out]
        out.append(("transformer.wpe.weight", (cfg.n_positions, d)))
        for i in range(cfg.n_layer):
            L = f"transformer.h.{i}."
            out += ln(L + "ln_1") + [(L + "attn.c_attn.weight", (d, 3 * d)), (L + "attn.c_attn.bias", (3 * d,)),
                                     (L + "attn.c_proj.weight", (d, d)), (L + "attn.c_proj.bias", (d,))]
            out += ln(L + "ln_2") + [(L + "mlp.c_fc.weight", (d, inner)), (L + "mlp.c_fc.bias", (inner,)),
                                     (L + "mlp.c_proj.weight", (inner, d)), (L + "mlp.c_proj.bias", (d,))]
    elif t == "gptj":  # nn.Linear: [out, in]; one LayerNorm per block (attention and MLP in parallel)
        for i in range(cfg.n_layer):
            L = f"transformer.h.{i}."
            out += ln(L + "ln_1") + [(f"{L}attn.{p}.weight", (d, d)) for p in ("q_proj", "k_proj", "v_proj")]
            out.append((L + "attn.out_proj.weight", (d, d)))
            out += [(L + "mlp.fc_in.weight", (inner, d)), (L + "mlp.fc_in.bias", (inner,)),
                    (L + "mlp.fc_out.weight", (d, inner)), (L + "mlp.fc_out.bias", (d,))]
    else:
        raise ValueError(t)
    out += ln("transformer.ln_f")
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (v, d)))
        if t == "gptj":
            out.append(("lm_head.bias", (v,)))
    return out


def save_tiny(family: str, out: Path, seed: int = 0, attn_gain: float = 1.0, **overrides) -> Path:
    """Random-init HF model of `family` saved under `out` (safetensors, config, tokenizer). Returns the directory.

    Written with numpy alone (no torch), so the test command needs no PyTorch and every machine gets
    the same numbers (`np.random.default_rng(seed)`): the golden files of tests/golden/ hold what
    transformers computes on exactly these checkpoints. The init follows HF's (weights ~0.02·N), with
    non-trivial norm weights (1 + 0.1·N) and biases (0.1·N) so that their conversion is exercised.

    `attn_gain` multiplies every attention weight. At the default init (std 0.02) attention is
    nearly uniform and adds little to the residual, so what positions do (RoPE, sliding window)
    barely reaches the logits; a gain of ~5 makes attention sharp and dominant, so a position bug
    shows far above bfloat16 rounding. `overrides` go to `hf_tiny_config`.
    """
    import numpy as np
    from safetensors.numpy import save_file

    cfg = hf_tiny_config(family, **overrides)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(cfg):
        norm, bias = "norm" in name or "ln_" in name, name.endswith(".bias")
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1 if norm or bias else 0.02)
        if norm and not bias:
            a += np.float32(1.0)
        if ".attn." in name or ".self_attn." in name:
            a *= np.float32(attn_gain)
        tensors[name] = a
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})  # "pt": transformers reads it
    cfg.architectures = [ARCHITECTURES[cfg.model_type]]
    cfg.save_pretrained(str(out))
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(str(out))
    return out


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over ids 0..vocab_size-1 ("t0".."tN"), so decoding is inspectable.

    The special tokens ("t0" unk/pad, "t1" EOS) match whole words only: as plain added tokens they
    are cut out of the raw text first, which turned "t10" into ["t1", "t0"] (EOS + unk).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    word = lambda t: AddedToken(t, single_word=True, special=True)  # noqa: E731
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=word("t0"), pad_token=word("t0"),
                                   eos_token=word("t1"))


def qaedit_records(n: int) -> list[dict]:
    """`n` QAEdit-schema records in the tiny vocabulary (distinct prompts, one locality prompt each),
    for runner tests of the adapter methods."""
    return [{"prompt": f"t{10 + 3 * i} t{11 + 3 * i} t5", "subject": f"t{11 + 3 * i}", "target": f"t{60 + i}",
             "rephrase": f"t{11 + 3 * i} t{10 + 3 * i} t6",
             "locality": [{"loc": f"t{90 + i} t99", "loc_ans": "t8"}]} for i in range(n)]


def resume_after_kill_mid_line(path, resume, n: int) -> dict:
    """Cut the results file `path` of a finished sequential run of `n` samples as a kill while
    writing its 4th line would, call `resume()` (the same run with resume=True) and check that every
    sample is in the file once with the rows it had; returns `resume()`'s summary."""
    import json

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:30])
    summary = resume()
    again = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted(r["case_id"] for r in again) == list(range(n))
    assert {r["case_id"]: r["post"] for r in again} == {r["case_id"]: r["post"] for r in rows}
    return summary
