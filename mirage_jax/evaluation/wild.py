"""WILD evaluation (spec section 3): wrap the question as a user would ask it, let the model
generate freely with the jitted loop until the stop rule fires, clean the answer, judge it.

Everything a sample needs (edit prompt, rephrase, all locality prompts) goes through one
batched `generate_ids` call; the judge sees the raw question, never the wrapped prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mirage_jax.evaluation.answers import StopRule, clean_answer, find_stop, normalize_answer, wrap_context
from mirage_jax.generate import PromptStates, generate_ids
from mirage_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class WildConfig:
    context_type: str = "question-only"  # 'question-only', 'qa_inst' or 'chat_temp'
    max_new_tokens: int = 50  # the paper's budget
    stop_rule: str = "improved"  # 'seed' (the paper's "." / "\n" / EOS) or 'improved'
    batch_size: int | None = None  # prompts per generation batch; None: `generate.default_batch`


@dataclasses.dataclass(frozen=True)
class WildAnswer:
    ids: tuple[int, ...]  # generated ids up to and including the stop (the paper's locality unit)
    raw: str  # the raw generation, special tokens kept
    answer: str  # the cleaned answer that is judged


def stop_rule_for(tokenizer: Any, cfg: ModelConfig, kind: str) -> StopRule:
    eos = tuple(dict.fromkeys(tokenizer.decode([i]) for i in cfg.eos_token_ids))
    eos = tuple(s for s in eos if s)
    return StopRule.seed(eos) if kind == "seed" else StopRule.improved(eos)


def wild_answers(params: Any, cfg: ModelConfig, tokenizer: Any, questions: Sequence[str],
                 wc: WildConfig, members: Sequence[int] | None = None,
                 token_texts: Sequence[str] | None = None, states: PromptStates | None = None,
                 keep_states: bool = False) -> list[WildAnswer]:
    """Greedy, stopped answers to raw questions under the chosen context type (`members`: with an
    `EditStack` as params, the stacked edit that answers each question; `token_texts`: the model's
    decoded vocabulary, `Model.token_texts`, so that it is not decoded again per call; `states`,
    `keep_states`: the prompts' lower layers kept or used, `generate.PromptStates`)."""
    if not questions:
        return []
    rule = stop_rule_for(tokenizer, cfg, wc.stop_rule)
    wrapped = [wrap_context(q, wc.context_type, tokenizer) for q in questions]
    ids = [tokenizer(w.text, add_special_tokens=w.add_special_tokens)["input_ids"] for w in wrapped]
    gens = generate_ids(params, cfg, tokenizer, ids, max_new_tokens=wc.max_new_tokens,
                        stop_fn=lambda text: find_stop(text, rule) is not None, stop_chars=rule.stop_chars,
                        token_texts=token_texts, batch_size=wc.batch_size, members=members, states=states,
                        keep_states=keep_states)
    return [WildAnswer(g.ids, g.raw_text, clean_answer(g.raw_text, rule)) for g in gens]


def locality_same_generation(pre: WildAnswer, post: WildAnswer) -> float:
    """The paper's WILD locality: 1 iff the post-edit ids equal the pre-edit ids exactly."""
    return float(tuple(pre.ids) == tuple(post.ids))


def locality_same_answer(pre: WildAnswer, post: WildAnswer) -> float:
    """Answer-level locality: the cleaned answers agree after SQuAD normalisation."""
    return float(normalize_answer(pre.answer) == normalize_answer(post.answer))
