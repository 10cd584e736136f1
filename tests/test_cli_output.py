"""What a newcomer sees on the command line: launch.py's last words, early judge errors, one-line
errors from `python -m mirage_jax.generate`, and no start-up noise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirage_jax import cli, report
from mirage_jax.generate import GenerationError, check_cli_args
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("PyTorch was not found", "Unable to initialize backend 'tpu'")


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **changes}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("cli") / "ckpt", seed=5)


def test_launch_ends_with_the_table_its_files_and_the_judge(tmp_path, tiny_ckpt):
    """The main job's last words: the paper-style table (formatted numbers, no JSON), the paths of
    its files, the judge line; no start-up noise on stderr. Then the report reads the same run. Its
    XLA programs went to --compile_cache (every one of them here: the tiny model's compile in < 1 s)."""
    out, xla = tmp_path / "out", tmp_path / "xla"
    p = subprocess.run([sys.executable, "launch.py", "--method=FT-M", f"--model={tiny_ckpt}", "--dataset=demo",
                        "--ds_size=2", "--evaluation=both", "--context_type=question-only", "--max_new_tokens=4",
                        "--hparams_for=smollm2-135m", "--hp", "layers=1", "--hp", "num_steps=2",
                        f"--output_dir={out}", f"--compile_cache={xla}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                       env=_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list(xla.iterdir())) >= 4  # at least the FT loop, the scorer, prefill and decode
    run = "FT-M_ckpt_demo_single_both_question-only"
    files = [out / f"{run}.jsonl", out / f"{run}_summary.json", out / f"{run}_table.md"]
    assert all(f.exists() for f in files)
    text = p.stdout
    assert text.startswith("| Model | Method | demo Rel syn | demo Rel WILD |"), text[:500]
    assert "{" not in text
    [row] = [line for line in text.splitlines() if line.startswith("| ckpt | FT-M |")]
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert len(cells) == 6 and all(c[:5].replace(".", "").isdigit() and len(c.split()[0]) == 5 for c in cells)
    for f in files:
        assert f"  {f}\n" in text
    assert "WILD graded by exact match" in text and "n=2." in text
    assert not any(noise in p.stderr for noise in NOISE), p.stderr[-2000:]
    runs = report.load_runs([out])
    assert [(r.method, r.model, r.dataset, r.n_samples) for r in runs] == [("FT-M", "ckpt", "demo", 2)]
    written = report.write_report(runs, out / "report", figures=False)
    assert row in written["markdown"].read_text()  # the same row as launch printed


def test_launch_checks_the_judge_before_loading_the_model(tmp_path):
    """--judge=llm without OPENAI_API_KEY: one line about the key. The model path does not exist,
    so an error about it instead would mean the model was loaded first."""
    p = subprocess.run([sys.executable, "launch.py", "--judge=llm", "--model=/nonexistent/model",
                        f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=_env())
    assert p.returncode == 1
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert "OPENAI_API_KEY" in p.stderr and "nonexistent" not in p.stderr


def test_generate_rejects_bad_input_before_loading_the_model():
    with pytest.raises(GenerationError, match="--prompt is empty"):
        check_cli_args("", 10)
    with pytest.raises(GenerationError, match="--prompt is empty"):
        check_cli_args(None, 10)
    with pytest.raises(GenerationError, match="--max_new_tokens must be >= 1, got 0"):
        check_cli_args("x", 0)
    check_cli_args("x", 1)


@pytest.mark.parametrize("args, message", [
    (["--prompt="], "error: --prompt is empty"),
    (["--prompt=x", "--max_new_tokens=-3"], "error: --max_new_tokens must be >= 1, got -3"),
    (["--prompt=x", "--model=/nonexistent/model"], "error: /nonexistent/model: checkpoint directory does not exist"),
])
def test_generate_cli_bad_input_is_one_line(args, message):
    p = subprocess.run([sys.executable, "-m", "mirage_jax.generate", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=_env())
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr[-2000:]


def test_startup_noise_filters_drop_only_those_records():
    """The filters `mirage_jax.cli` installs at import drop the two start-up lines and nothing else
    from the same loggers (a CUDA probe failure, other transformers warnings stay visible)."""
    cli.quiet_startup()  # idempotent: importing cli already did it
    assert sum(isinstance(f, cli._DropStartupNoise) for f in logging.getLogger("transformers").filters) == 1
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, level, dropped, kept in [
        ("transformers", logging.WARNING, "PyTorch was not found. Models won't be available",
         "Setting `pad_token_id` to `eos_token_id`"),
        ("jax._src.xla_bridge", logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: no libtpu.so",
         "Unable to initialize backend 'cuda': no GPU"),
    ]:
        logger = logging.getLogger(name)
        handler, old_level = Keep(), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            logger.log(level, dropped)
            logger.log(level, kept)
            logger.error(dropped)  # the same text as an error is not start-up noise
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
    assert seen == ["Setting `pad_token_id` to `eos_token_id`", "PyTorch was not found. Models won't be available",
                    "Unable to initialize backend 'cuda': no GPU",
                    "Unable to initialize backend 'tpu': INTERNAL: no libtpu.so"]


def test_generate_starts_quietly_without_pytorch(tiny_ckpt):
    """A real run of the generate CLI where PyTorch is absent (as after the README's install):
    stdout is the continuation, stderr is empty -- no transformers warning, no TPU probe line."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "  # find_spec('torch') -> None: 'not installed'
            f"sys.argv = ['generate', '--model={tiny_ckpt}', '--prompt=t1 t2 t3', '--max_new_tokens=3']; "
            "runpy.run_module('mirage_jax.generate', run_name='__main__', alter_sys=True)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env=_env())
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.split()) == 3 and p.stderr == "", p.stderr[-2000:]
