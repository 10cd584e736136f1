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


def save_tiny(family: str, out: Path, seed: int = 0, attn_gain: float = 1.0, **overrides) -> Path:
    """Random-init HF model of `family` saved under `out` (safetensors). Returns the directory.

    `attn_gain` multiplies every attention weight. At the default init (std 0.02) attention is
    nearly uniform and adds little to the residual, so what positions do (RoPE, sliding window)
    barely reaches the logits; a gain of ~5 makes attention sharp and dominant, so a position bug
    shows far above bfloat16 rounding. `overrides` go to `hf_tiny_config`.
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_tiny_config(family, **overrides))
    with torch.no_grad():  # non-trivial norm weights/biases so their conversion is exercised
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if ".attn." in name or ".self_attn." in name:
                p.mul_(attn_gain)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
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
