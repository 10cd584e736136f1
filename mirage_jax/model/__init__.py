"""Load a model (checkpoint directory, .gguf file or "default") into config + params + tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

from mirage_jax.model.adapters import ADAPTER_NOTE, has_adapters, load_adapters, save_adapters, strip_adapters
from mirage_jax.model.checkpoint import (
    DTYPES,
    CheckpointError,
    convert_to_params,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from mirage_jax.model.config import ConfigError, ModelConfig, config_from_hf
from mirage_jax.model.sharding import placement
from mirage_jax.model.transformer import ForwardOutput, KVCache, forward, init_cache, unembed
from mirage_jax.tokens import vocab_texts

DEFAULT_MODEL = "default"
# Tokens that end an assistant turn in the chat templates of the supported families.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>")


@dataclasses.dataclass
class Model:
    """What a researcher holds in a notebook: static config, the parameter pytree, the tokenizer.

    `params` is never mutated by the library: an edit returns a new pytree, so the original stays
    available for restoring and for pre-edit evaluation.
    """

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    hf_config: dict
    name: str

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Every token's text, decoded once per model: the generation loop looks up which tokens hold
        a stop character (`generate.generate_ids`' `token_texts`)."""
        return vocab_texts(self.tokenizer, self.cfg.vocab_size)

    def with_params(self, params: Any) -> Model:
        return dataclasses.replace(self, params=params)

    def forward(self, tokens, **kw) -> ForwardOutput:
        return forward(self.params, self.cfg, tokens, **kw)

    def save(self, out_dir: str | Path) -> Path:
        """Export as an HF safetensors checkpoint that `transformers` loads.

        Adapters (GRACE's codebook) are not weights: they go to `adapters.ADAPTER_FILE` beside the
        checkpoint, which `load_model` reads back; config.json and a log line tell a plain-HF
        consumer that the edit lives there (transformers itself loads the unedited model)."""
        if not has_adapters(self.params):
            return save_hf_checkpoint(out_dir, self.cfg, self.params, self.hf_config, self.tokenizer)
        hf_config = dict(self.hf_config, mirage_jax_adapters=ADAPTER_NOTE)
        out = save_hf_checkpoint(out_dir, self.cfg, strip_adapters(self.params), hf_config, self.tokenizer)
        save_adapters(self.params, out)
        logging.getLogger(__name__).warning(ADAPTER_NOTE)
        return out


def stop_token_ids(cfg: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids of the config and tokenizer plus the end-of-turn tokens the vocabulary has."""
    ids = set(cfg.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(i for i in ids if i < cfg.vocab_size))


def _finish(cfg: ModelConfig, params, tokenizer, hf_config: dict, name: str) -> Model:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = cfg.replace(eos_token_ids=stop_token_ids(cfg, tokenizer))
    return Model(cfg, params, tokenizer, hf_config, name)


def load_model(path: str | Path = DEFAULT_MODEL, dtype: str = "float32", allow_pickle: bool = False,
               mesh: Any = None) -> Model:
    """Load "default" (SmolLM2-135M-Instruct from its GGUF), a `.gguf` file or an HF directory.

    `mesh` (a `jax.sharding.Mesh`, see `mirage_jax.model.sharding`): every parameter is built
    directly in its shards (`sharding.placement`); everything downstream is the same code.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if str(path) == DEFAULT_MODEL or str(path).endswith(".gguf"):
        from mirage_jax.model.gguf import default_gguf_path, read_gguf

        gguf_path = default_gguf_path() if str(path) == DEFAULT_MODEL else Path(path)
        if not gguf_path.exists():
            raise CheckpointError(f"{gguf_path}: GGUF file does not exist")
        ck = read_gguf(gguf_path)
        cfg = config_from_hf(ck.hf_config, where=str(gguf_path))
        get = ck.tensors.__getitem__  # dequantized numpy arrays: sliceable as they are
        params = convert_to_params(cfg, ck.tensors.keys(), get, DTYPES[dtype], str(gguf_path),
                                   placement=placement(mesh, cfg) if mesh is not None else None, get_slices=get)
        name = "SmolLM2-135M-Instruct" if str(path) == DEFAULT_MODEL else gguf_path.stem
        return _finish(cfg, params, ck.tokenizer, ck.hf_config, name)
    ckpt = Path(path)
    cfg, params, hf_cfg = load_hf_checkpoint(ckpt, dtype=dtype, allow_pickle=allow_pickle, mesh=mesh)
    params = load_adapters(params, cfg, ckpt)  # an adapter edit saved beside the weights (GRACE)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k != "mirage_jax_adapters"}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as err:  # transformers raises many types; the user needs one line
        raise CheckpointError(f"{ckpt}: cannot load the tokenizer ({type(err).__name__}: {err})") from None
    return _finish(cfg, params, tokenizer, hf_cfg, ckpt.name)


__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "Model",
    "ModelConfig",
    "config_from_hf",
    "forward",
    "init_cache",
    "load_model",
    "unembed",
]
