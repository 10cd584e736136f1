"""Architecture description of a decoder-only transformer, read from an HF `config.json`.

One dataclass covers every supported family; the differences between families are a handful of
switches (norm type, gated MLP, parallel residual, rotary width, biases), so the forward pass is
one function rather than one class per family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# model_type -> family. Families share a conversion table (see checkpoint.py).
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    "gptj": "gptj",
}


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be understood (unknown family, missing key...)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (rope_type 'llama3') or linear scaling."""

    rope_type: str = "llama3"  # 'llama3' or 'linear'
    factor: float = 8.0  # overall context extension factor
    low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # context length the model was trained at


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of the network; hashable so it can be a `jax.jit` static argument."""

    model_type: str  # HF model_type ('llama', 'mistral', 'qwen2', 'gpt2', 'gptj')
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int  # d_ff, width of the MLP key k (input of the down projection)
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads for grouped-query attention
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    norm: str = "rms"  # 'rms' (Llama family) or 'layer' (GPT-2, GPT-J)
    activation: str = "silu"  # 'silu' or 'gelu_new' (tanh approximation)
    gated_mlp: bool = True  # act(gate(x)) * up(x) (Llama) vs act(fc_in(x)) (GPT)
    parallel_residual: bool = False  # GPT-J: x + attn(ln(x)) + mlp(ln(x))
    attn_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-2)
    attn_out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases on the MLP matrices (GPT-2, GPT-J)
    lm_head_bias: bool = False  # GPT-J
    tie_word_embeddings: bool = False
    learned_positions: bool = False  # GPT-2 absolute position table instead of RoPE
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None: full head_dim; GPT-J rotates only the first dims
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # Mistral: keys further back than this are masked
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # every id that ends a turn (EOS, <|im_end|>, ...)
    pad_token_id: int | None = None

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{where}: config.json has no '{key}'")
    return cfg[key]


def config_from_hf(cfg: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """Translate an HF config dict into a `ModelConfig`; unknown `model_type` is an error."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    common = dict(
        model_type=model_type,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gpt2")),
    )
    if model_type in ("gpt2", "gptj"):
        d = int(_require(cfg, "n_embd", where))
        n_head = int(_require(cfg, "n_head", where))
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{where}: unsupported activation_function {act!r} (gelu_new only)")
        gpt2 = model_type == "gpt2"
        return ModelConfig(
            vocab_size=int(_require(cfg, "vocab_size", where)),
            hidden_size=d,
            intermediate_size=int(cfg.get("n_inner") or 4 * d),
            num_layers=int(_require(cfg, "n_layer", where)),
            num_heads=n_head,
            num_kv_heads=n_head,
            head_dim=d // n_head,
            max_position_embeddings=int(cfg.get("n_positions", 2048)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            norm="layer",
            activation="gelu_new",
            gated_mlp=False,
            parallel_residual=not gpt2,
            attn_bias=gpt2,
            attn_out_bias=gpt2,
            mlp_bias=True,
            lm_head_bias=not gpt2,
            learned_positions=gpt2,
            rotary_dim=None if gpt2 else cfg.get("rotary_dim"),
            **common,
        )
    # Llama / Mistral / Qwen2.
    d = int(_require(cfg, "hidden_size", where))
    n_head = int(_require(cfg, "num_attention_heads", where))
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: unsupported hidden_act {act!r} (silu only)")
    rope_theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    typed = rope_params.get("rope_type") not in (None, "default")
    scaling = cfg.get("rope_scaling") or (rope_params if typed else None)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope_scaling = RopeScaling(
                rope_type="llama3",
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        elif kind == "linear":
            rope_scaling = RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
        elif kind not in (None, "default"):
            raise ConfigError(f"{where}: unsupported rope_scaling type {kind!r} (llama3, linear)")
    sliding = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=d,
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_layers=int(_require(cfg, "num_hidden_layers", where)),
        num_heads=n_head,
        num_kv_heads=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(cfg.get("head_dim") or d // n_head),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        sliding_window=int(sliding) if sliding else None,
        attn_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        attn_out_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        **common,
    )


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies of the rotary embedding (numpy, float64), with Llama-3 scaling."""
    import numpy as np

    dim = cfg.rope_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return inv / s.factor
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
