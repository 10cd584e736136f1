"""Tiny random-init `transformers` checkpoints of every supported family, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

TINY = dict(vocab_size=128, hidden=64, layers=2, heads=4, inter=96)


def hf_tiny_config(family: str):
    import transformers as tf

    v, d, n, h, f = (TINY[k] for k in ("vocab_size", "hidden", "layers", "heads", "inter"))
    if family == "llama":
        return tf.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
                              num_attention_heads=h, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama3":
        return tf.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
                              num_attention_heads=h, num_key_value_heads=2, max_position_embeddings=256,
                              rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "mistral":
        return tf.MistralConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
                                num_attention_heads=h, num_key_value_heads=2, sliding_window=None,
                                max_position_embeddings=256)
    if family == "qwen2":
        return tf.Qwen2Config(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
                              num_attention_heads=h, num_key_value_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=True)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=v, n_embd=d, n_layer=n, n_head=h, n_positions=256)
    if family == "gptj":
        return tf.GPTJConfig(vocab_size=v, n_embd=d, n_layer=n, n_head=h, n_positions=256, rotary_dim=8)
    raise ValueError(family)


FAMILIES = ("llama", "llama3", "mistral", "qwen2", "gpt2", "gptj")


def save_tiny(family: str, out: Path, seed: int = 0) -> Path:
    """Random-init HF model of `family` saved under `out` (safetensors). Returns the directory."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_tiny_config(family))
    with torch.no_grad():  # non-trivial norm weights/biases so their conversion is exercised
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(str(out))
    return out


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over ids 0..vocab_size-1 ("t0".."tN"), so decoding is inspectable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")
