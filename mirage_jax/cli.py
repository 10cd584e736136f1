"""Command-line flags that every entry point shares, defined once.

`launch.py`, `python -m mirage_jax.generate`, `python -m mirage_jax.editing.stats`,
`python -m mirage_jax.editing.mend_train` and the benchmarks all load a model the same way; their
`--model` / `--dtype` / `--allow_pickle` / `--mesh` (and the multi-host start-up flags) are
defined here so that a flag means the same thing, with the same default and help text, wherever
it appears. Likewise `--hp` / `--hparams_for` for the commands that read `configs/`, and `--judge` / `--judge_model` /
`--judge_base_url` for `launch.py` and `python -m mirage_jax.regrade`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from absl import flags

if TYPE_CHECKING:
    from mirage_jax.evaluation.judge import Judge
    from mirage_jax.model import Model

DTYPES = ("float32", "bfloat16", "float16")

# Start-up lines that say nothing about the run: (logger, message start, highest level dropped).
# transformers warns at import that PyTorch is missing; we only use its tokenizers and configs, which
# need no PyTorch. JAX probes for a TPU on first use and logs the failed probe at INFO, which absl's
# handler prints (a real backend failure raises instead). Only these exact records are dropped.
STARTUP_NOISE = (("transformers", "PyTorch was not found.", logging.WARNING),
                 ("jax._src.xla_bridge", "Unable to initialize backend 'tpu'", logging.INFO))


class _DropStartupNoise(logging.Filter):
    def __init__(self, prefix: str, max_level: int):
        super().__init__()
        self.prefix, self.max_level = prefix, max_level

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= self.max_level and str(record.msg).startswith(self.prefix))


def quiet_startup() -> None:
    """Drop the STARTUP_NOISE records (idempotent). Called when this module is imported: every
    command line (launch.py, `python -m mirage_jax.*`, benchmarks) imports it to define its flags,
    before the model (and with it transformers and the JAX backends) loads."""
    for name, prefix, level in STARTUP_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStartupNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropStartupNoise(prefix, level))


quiet_startup()


def _define(name: str, fv: flags.FlagValues, define, *args, **kwargs) -> None:
    """Define a flag unless this process already has it (two CLIs' modules imported together,
    e.g. by tests, must not collide with DuplicateFlagError)."""
    if name not in fv:
        define(name, *args, flag_values=fv, **kwargs)


# --compile_cache of the commands users run again and again; MIRAGE_JAX_COMPILE_CACHE overrides it
# ("" = off: the test suite sets that, so that its runs leave nothing in the user's home).
USER_COMPILE_CACHE = os.environ.get("MIRAGE_JAX_COMPILE_CACHE", "~/.cache/mirage_jax/xla")


def define_model_flags(fv: flags.FlagValues = flags.FLAGS, dtype_default: str | None = "float32",
                       compile_cache: str = "") -> None:
    """--model, --dtype, --allow_pickle, --mesh, --compile_cache. `dtype_default=None` lets a
    command choose per model (the generation benchmark: float32, or bfloat16 for its random 7B
    model). `compile_cache`: the default of --compile_cache -- `USER_COMPILE_CACHE` for the
    commands users run again and again (launch.py), off for the benchmarks, whose first calls
    report compilation."""
    _define("model", fv, flags.DEFINE_string, "default",
            "'default' (the embedded SmolLM2-135M-Instruct), an HF checkpoint directory or a .gguf file")
    _define("dtype", fv, flags.DEFINE_enum, dtype_default, list(DTYPES), "parameter dtype")
    _define("allow_pickle", fv, flags.DEFINE_bool, False,
            "allow pickle *.bin checkpoints (they can run code when loaded)")
    _define("mesh", fv, flags.DEFINE_string, "",
            "device mesh as axis:size pairs over data, fsdp, tensor (e.g. data:2,tensor:4; -1 = the rest); "
            "empty: fsdp over every device. Parameters load straight into their shards")
    _define("compile_cache", fv, flags.DEFINE_string, compile_cache,
            "directory of JAX's persistent compilation cache: a second run with the same model and shapes loads "
            "its XLA programs instead of compiling them (empty: off; JAX_COMPILATION_CACHE_DIR wins when set)")
    define_distributed_flags(fv)


def define_distributed_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """--distributed, --coordinator_address, --num_processes, --process_id: a multi-host run
    (`mirage_jax.distributed`). All unset: one process. Defined with the model flags, so every
    command that loads a model can run on a TPU VM slice or a cluster."""
    _define("distributed", fv, flags.DEFINE_bool, False,
            "join a multi-host run whose processes the environment describes (TPU VM slice, SLURM, Open MPI): "
            "run the same command on every worker; only process 0 writes")
    _define("coordinator_address", fv, flags.DEFINE_string, None,
            "multi-host run without autodetection (GPU cluster, CPU processes): process 0's host:port; "
            "with --num_processes and --process_id")
    _define("num_processes", fv, flags.DEFINE_integer, None, "multi-host run: how many processes")
    _define("process_id", fv, flags.DEFINE_integer, None, "multi-host run: this process's index (0 writes)")


def define_hparam_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """--hp key=value (repeatable; parsed by the field's declared type) and --hparams_for."""
    _define("hp", fv, flags.DEFINE_multi_string, [],
            "hyper-parameter override key=value (repeatable), e.g. --hp layers=4,5 --hp lr=1e-4")
    _define("hparams_for", fv, flags.DEFINE_string, None, "borrow the configs/ entry of this model key")


def define_judge_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """--judge, --judge_model, --judge_base_url: how WILD answers are scored."""
    from mirage_jax.evaluation.judge import JUDGE_KINDS

    _define("judge", fv, flags.DEFINE_enum, "exact_match", list(JUDGE_KINDS),
            "how WILD answers are scored: exact match, the gold's words inside the answer (keyless proxy), "
            "an OpenAI-compatible API, or a local instruction model (the paper's grader prompt, verdict from "
            "the logits of A vs B)")
    _define("judge_model", fv, flags.DEFINE_string, None,
            "--judge=llm: API model name (default gpt-4o-mini); --judge=local: HF directory, .gguf file or "
            "'default' (default 'default', SmolLM2-135M: mechanics only, use a capable instruction model such "
            "as Qwen2.5-7B-Instruct for real verdicts)")
    _define("judge_base_url", fv, flags.DEFINE_string, None,
            "OpenAI-compatible endpoint for --judge=llm (key: $OPENAI_API_KEY)")


def judge_from_flags(cache_path: str | None, fv: flags.FlagValues = flags.FLAGS) -> Judge:
    """The judge the flags name; its verdicts (llm, local) are cached at `cache_path`."""
    from mirage_jax.evaluation.judge import make_judge

    return make_judge(fv.judge, fv.judge_model, fv.judge_base_url, cache_path=cache_path)


def load_model_from_flags(fv: flags.FlagValues = flags.FLAGS, dtype: str | None = None) -> Model:
    """The model the flags name (`dtype` overrides --dtype where the command decided it)."""
    from mirage_jax.distributed import initialize_from_flags
    from mirage_jax.model import load_model

    initialize_from_flags(fv)  # before the first JAX computation (idempotent)
    use_compile_cache(fv.compile_cache)
    return load_model(fv.model, dtype=dtype or fv.dtype or "float32", allow_pickle=fv.allow_pickle,
                      mesh=mesh_from_flags(fv))


def use_compile_cache(path: str) -> None:
    """Turn on JAX's persistent compilation cache at `path` (unless off or already set by the user).
    Why: in a 20-sample FT-M run on a CPU, XLA compilation was ~25% of the wall time (the FT loop,
    the synthetic scorer, prefill and decode at each bucket), paid again by every run of the same
    model; a program is keyed by its HLO, flags and backend, so a stale entry is never reused.
    Programs that took >= 0.2 s to compile are written (JAX's default, 1 s, left the default model's
    synthetic scorers of 0.5-1 s out: 7 s of a warm run), not the many tiny eager ones."""
    import jax

    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def mesh_from_flags(fv: flags.FlagValues = flags.FLAGS):
    """The --mesh over every device of every process; None on a single device (nothing to split)."""
    import jax

    from mirage_jax.model.sharding import make_mesh, parse_mesh

    spec = fv.mesh if "mesh" in fv else ""
    parse_mesh(spec, jax.device_count())  # a bad --mesh is an error even where there is nothing to split
    return None if jax.device_count() == 1 else make_mesh(spec)
