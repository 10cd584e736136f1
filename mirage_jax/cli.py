"""Command-line flags that every entry point shares, defined once.

`launch.py`, `python -m mirage_jax.generate`, `python -m mirage_jax.editing.stats`,
`python -m mirage_jax.editing.mend_train` and the benchmarks all load a model the same way; their
`--model` / `--dtype` / `--allow_pickle` (next: `--mesh`) are defined here so that a flag means the
same thing, with the same default and help text, wherever it appears. Likewise `--hp` /
`--hparams_for` for the commands that read `configs/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import flags

if TYPE_CHECKING:
    from mirage_jax.model import Model

DTYPES = ("float32", "bfloat16", "float16")


def _define(name: str, fv: flags.FlagValues, define, *args, **kwargs) -> None:
    """Define a flag unless this process already has it (two CLIs' modules imported together,
    e.g. by tests, must not collide with DuplicateFlagError)."""
    if name not in fv:
        define(name, *args, flag_values=fv, **kwargs)


def define_model_flags(fv: flags.FlagValues = flags.FLAGS, dtype_default: str | None = "float32") -> None:
    """--model, --dtype, --allow_pickle. `dtype_default=None` lets a command choose per model
    (the generation benchmark: float32, or bfloat16 for its random 7B model)."""
    _define("model", fv, flags.DEFINE_string, "default",
            "'default' (the embedded SmolLM2-135M-Instruct), an HF checkpoint directory or a .gguf file")
    _define("dtype", fv, flags.DEFINE_enum, dtype_default, list(DTYPES), "parameter dtype")
    _define("allow_pickle", fv, flags.DEFINE_bool, False,
            "allow pickle *.bin checkpoints (they can run code when loaded)")


def define_hparam_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """--hp key=value (repeatable; parsed by the field's declared type) and --hparams_for."""
    _define("hp", fv, flags.DEFINE_multi_string, [],
            "hyper-parameter override key=value (repeatable), e.g. --hp layers=4,5 --hp lr=1e-4")
    _define("hparams_for", fv, flags.DEFINE_string, None, "borrow the configs/ entry of this model key")


def load_model_from_flags(fv: flags.FlagValues = flags.FLAGS, dtype: str | None = None) -> Model:
    """The model the flags name (`dtype` overrides --dtype where the command decided it)."""
    from mirage_jax.model import load_model

    return load_model(fv.model, dtype=dtype or fv.dtype or "float32", allow_pickle=fv.allow_pickle)
