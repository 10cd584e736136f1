"""Judges that score a generated answer against the gold target: exact match, word containment, an
LLM behind an API, or a local model run through our own forward.

All have `judge_many(items) -> list[float | None]`: 1.0 correct, 0.0 incorrect, None unjudged.

The LLM judge follows the paper (spec 3.4a): gpt-4o-mini, temperature 0, an empty system message
and the paper's SimpleQA-style grader prompt (`RUBRIC`, word for word) as the user message, reply
"A" (CORRECT) or "B" (INCORRECT). What it does beyond the seed (spec 7.16):
* the API key comes only from the environment (OPENAI_API_KEY); it is never an argument, never
  logged, never written to the cache;
* one client, a timeout per request, retries with exponential backoff on timeouts, connection
  errors, 408/409/429 and 5xx; requests run concurrently (bounded thread pool);
* the verdict is parsed tolerantly ("A", "A.", " a", "**A**", "A: CORRECT");
* verdicts are cached on disk (JSON lines, appended as they arrive, so a crashed run resumes
  without re-asking), keyed by sha256 of (rubric version, judge model, question, gold,
  answer). Only real verdicts are cached: unjudged items are asked again next time;
* a judge that cannot be reached, or whose reply cannot be parsed, gives None for that item
  (with a warning). It never falls back to exact match.

The local judge (`LocalJudge`) sends the same messages through a local model's own chat template
and reads the verdict from the next-token logits of "A" vs "B" instead of generating: one batched
forward per batch of answers, deterministic, no key, no network. Same cache (with the margin).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import jinja2
import numpy as np

from mirage_jax import distributed, io
from mirage_jax.evaluation.answers import contains_answer, exact_match
from mirage_jax.model.transformer import KVCache, forward, init_cache, map_slots, params_dtype, unembed
from mirage_jax.tokens import bucket

log = logging.getLogger(__name__)

JUDGE_KINDS = ("exact_match", "contains", "llm", "local")
DEFAULT_JUDGE_MODEL = "gpt-4o-mini"
DEFAULT_LOCAL_JUDGE_MODEL = "default"  # load_model's embedded SmolLM2-135M-Instruct: mechanics, not verdicts
API_KEY_ENV = "OPENAI_API_KEY"

# Bump when RUBRIC (or the messages around it) changes: cached verdicts given under another rubric
# are not reused. Version 1 was our paraphrase of the paper's prompt; version 2 is the paper's own.
RUBRIC_VERSION = "2"
# The paper's grader prompt word for word (Revisit-Editing-Evaluation, easyeditor/evaluate/
# evaluate_utils.py `llm_judge`, commit 6dcc555; adapted by the authors from the SimpleQA grader),
# sent as the user message after an empty system message. Only the placeholder names differ
# ({target} -> {gold}, {predicted_answer} -> {answer}); the backslash joins the first line.
RUBRIC = """\
Your job is to look at a question, a gold target, and a predicted answer, and then assign a grade of either \
["CORRECT", "INCORRECT"].

The following are examples of CORRECT predicted answers.
```
Question: What are the names of Barack Obama's children?
Gold target: Malia Obama and Sasha Obama
Predicted answer 1: sasha and malia obama
Predicted answer 2: Malia and Sasha Obama are the names of Barack Obama's children.
```
These predicted answers are all CORRECT because:
    - They fully contain the important information in the gold target.
    - They do not contain any information that contradicts the gold target.

The following are examples of INCORRECT predicted answers.
```
Question: What are the names of Barack Obama's children?
Gold target: Malia and Sasha
Predicted answer 1: Malia.
Predicted answer 2: Malia, Sasha, and Susan.
Predicted answer 3: Malia and Sasha, Malia and Sasha, Malia and Sasha, Malia and Sasha (repeated answer)
```
These predicted answers are all INCORRECT because:
    - A factual statement in the answer contradicts the gold target or contain repeated answer.


Here is a sample. Simply reply with either CORRECT or INCORRECT.

```
Question: {question}
Gold target: {gold}
Predicted answer: {answer}
```

According to the gold target, please grade the predicted answer of this question as one of:
A: CORRECT
B: INCORRECT

Just return the letters "A" or "B", with no text around it."""
# The paper's messages: an empty system message, then the filled rubric as the user turn.
SYSTEM_MESSAGE = ""


class JudgeError(ValueError):
    """A judge is misconfigured (unknown kind, no API key for the OpenAI endpoint...)."""


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    question: str  # the raw question (not the context-wrapped prompt the model saw)
    gold: str  # the target the answer should give (target_new for edits)
    answer: str  # the cleaned generated answer


class Judge(Protocol):
    name: str  # recorded with the results: which judge gave the scores

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]: ...


class ExactMatchJudge:
    """SQuAD exact match of the answer against the gold target (spec 3.4b); never None."""

    name = "exact_match"

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        return [exact_match(item.answer, item.gold) for item in items]


class ContainsJudge:
    """Correct when the SQuAD-normalised gold occurs word for word, as a contiguous run of words, in
    the normalised answer (`answers.contains_answer`); never None, no key, no model.

    Why: exact match scores every sentence answer 0 ("The mother tongue of Danielle Darrieux is
    English." for "English"), so an instruct model's WILD scores say nothing; this credits them.
    What it cannot do: it credits an answer that also contradicts the gold ("English or French",
    "not English", "English, then French") and one that lists many candidates; it cannot credit a
    correct answer under another name or spelling ("NYC" for "New York City", "2nd" for "second").
    A keyless, lower-cost proxy, not the paper's judge (--judge=llm): its numbers are not comparable
    with the paper's.
    """

    name = "contains"

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        return [contains_answer(item.answer, item.gold) for item in items]


_VERDICT = re.compile(
    r"(?:(?:answer|grade|verdict)\s*[:\-]\s*)?"  # optional label
    r"(?:([ab])(?![a-z0-9]))?"  # the letter
    r"[\s.:\-]*"  # "A.", "A:", "A -"
    r"(correct|incorrect)?"  # the grade word
    r"[\s.!]*", re.IGNORECASE)


def parse_verdict(reply: str | None) -> float | None:
    """1.0 for A / CORRECT, 0.0 for B / INCORRECT, None when the reply says neither clearly.

    Reads the first non-empty line, ignoring markdown emphasis, quotes and brackets.
    """
    if not reply:
        return None
    lines = [line for line in reply.splitlines() if line.strip()]
    if not lines:
        return None
    line = re.sub(r"[*_`\"'()\[\]]", "", lines[0]).strip()
    match = _VERDICT.fullmatch(line)
    if match is None or not (match.group(1) or match.group(2)):
        return None
    from_letter = None if match.group(1) is None else float(match.group(1).upper() == "A")
    from_word = None if match.group(2) is None else float(match.group(2).upper() == "CORRECT")
    if from_letter is not None and from_word is not None and from_letter != from_word:
        return None  # "A: INCORRECT" contradicts itself
    return from_letter if from_letter is not None else from_word


def judge_messages(prompt: str) -> list[dict[str, str]]:
    """The paper's chat: an empty system message, then the filled rubric as the user turn."""
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]


def cache_key(model: str, item: JudgeItem) -> str:
    payload = json.dumps([RUBRIC_VERSION, model, item.question, item.gold, item.answer],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """Append-only JSON-lines file of verdicts; a torn last line (crash) is ignored."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._verdicts: dict[str, float] = {}
        self._margins: dict[str, float] = {}  # local judge: logit margin of "A" over "B"
        self._lock = threading.Lock()
        # Multi-host: only process 0 asks the judge (the runner broadcasts its verdicts), so only it
        # reads the cache; the others would have nothing to look up.
        if self.path is not None and distributed.is_writer() and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for lineno, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line)
                    self._verdicts[entry["key"]] = float(entry["verdict"])
                    if entry.get("margin") is not None:
                        self._margins[entry["key"]] = float(entry["margin"])
                except (ValueError, KeyError, TypeError):
                    log.warning("judge cache %s: ignoring unreadable line %d", self.path, lineno)

    def get(self, key: str) -> float | None:
        return self._verdicts.get(key)

    def margin(self, key: str) -> float | None:
        return self._margins.get(key)

    def put(self, key: str, verdict: float, model: str, item: JudgeItem, reply: str,
            margin: float | None = None) -> None:
        entry = {"key": key, "verdict": verdict, "model": model, "question": item.question,
                 "gold": item.gold, "answer": item.answer, "reply": reply}
        if margin is not None:
            entry["margin"] = margin
        with self._lock:
            self._verdicts[key] = verdict
            if margin is not None:
                self._margins[key] = margin
            if self.path is not None:
                io.append_line(self.path, json.dumps(entry, ensure_ascii=False))

    def __len__(self) -> int:
        return len(self._verdicts)


_RETRY_STATUS = frozenset({408, 409, 429})


class LLMJudge:
    """Grades answers with a chat model behind an OpenAI-compatible endpoint."""

    def __init__(self, model: str = DEFAULT_JUDGE_MODEL, base_url: str | None = None,
                 cache_path: str | Path | None = None, timeout_s: float = 30.0,
                 max_retries: int = 4, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 max_workers: int = 8):
        import openai  # imported here so that exact-match runs do not need the package

        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_workers < 1:
            raise JudgeError("LLMJudge needs timeout_s > 0, max_retries >= 0, backoff_s >= 0 "
                             "and max_workers >= 1")
        self._openai = openai
        self.model = model
        self.name = f"llm:{model}"
        self.max_retries = max_retries  # extra attempts after the first one
        self.backoff_s = backoff_s  # wait before retry k is backoff_s * 2**k ...
        self.backoff_max_s = backoff_max_s  # ... capped at this
        self.max_workers = max_workers  # requests in flight at once
        key = os.environ.get(API_KEY_ENV)
        if not key:
            if base_url is None:
                raise JudgeError(f"the LLM judge needs the {API_KEY_ENV} environment variable "
                                 f"(or a base_url for a local server)")
            key = "EMPTY"  # local OpenAI-compatible servers want some key
        # Retries are ours (logged, with backoff), so the client's own are off.
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout_s,
                                     max_retries=0)
        self.cache = VerdictCache(cache_path)

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        keys = [cache_key(self.model, item) for item in items]
        verdicts: dict[str, float | None] = {}
        todo: dict[str, JudgeItem] = {}
        for key, item in zip(keys, items):
            cached = self.cache.get(key)
            if cached is not None:
                verdicts[key] = cached
            else:
                todo.setdefault(key, item)  # identical items are asked once
        if todo:
            workers = max(1, min(self.max_workers, len(todo)))
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                futures = {pool.submit(self._judge_one, key, item): key
                           for key, item in todo.items()}
                for future in concurrent.futures.as_completed(futures):
                    verdicts[futures[future]] = future.result()
        unjudged = sum(verdicts[k] is None for k in keys)
        if unjudged:
            log.warning("LLM judge %s: %d of %d items unjudged", self.model, unjudged, len(items))
        return [verdicts[k] for k in keys]

    def _judge_one(self, key: str, item: JudgeItem) -> float | None:
        reply = self._ask(RUBRIC.format(question=item.question, gold=item.gold,
                                        answer=item.answer))
        if reply is None:
            return None
        verdict = parse_verdict(reply)
        if verdict is None:
            log.warning("LLM judge %s: cannot parse the reply %r; item left unjudged",
                        self.model, reply[:200])
            return None
        self.cache.put(key, verdict, self.model, item, reply)
        return verdict

    def _ask(self, prompt: str) -> str | None:
        """The reply text, or None after the last failed attempt."""
        openai = self._openai
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self._client.chat.completions.create(
                    model=self.model, temperature=0.0,
                    messages=judge_messages(prompt))
                return response.choices[0].message.content or ""
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                problem = type(e).__name__
            except openai.APIStatusError as e:
                problem = f"HTTP {e.status_code}"
                if e.status_code < 500 and e.status_code not in _RETRY_STATUS:
                    log.warning("LLM judge %s: %s, not retried; item left unjudged",
                                self.model, problem)
                    return None
                retry_after = _retry_after_s(e.response)
            except (openai.OpenAIError, IndexError, AttributeError) as e:  # malformed reply
                log.warning("LLM judge %s: bad response (%s); item left unjudged",
                            self.model, type(e).__name__)
                return None
            if attempt == self.max_retries:
                log.warning("LLM judge %s: %s after %d attempts; item left unjudged",
                            self.model, problem, attempt + 1)
                return None
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** attempt)
            if retry_after is not None:
                delay = min(self.backoff_max_s, max(delay, retry_after))
            log.info("LLM judge %s: %s, retry %d in %.2fs", self.model, problem, attempt + 1,
                     delay)
            time.sleep(delay)
        return None


def _retry_after_s(response) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


# --- the local judge ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1,))
def _prefix_cache(params: Any, cfg: Any, tokens: jax.Array) -> KVCache:
    """Keys/values `[1, L, ...]` of the rubric's shared opening, computed once per judge."""
    cache = init_cache(cfg, 1, tokens.shape[1], params_dtype(params))
    return forward(params, cfg, tokens, cache=cache, cache_index=0, return_logits=False).cache


@functools.partial(jax.jit, static_argnums=(1,))
def _letter_logits(params: Any, cfg: Any, prefix: KVCache, tokens: jax.Array, mask: jax.Array,
                   positions: jax.Array, letter_ids: jax.Array) -> jax.Array:
    """Next-token logits `[B, K]` at `letter_ids` after each row of prefix + left-padded suffix.

    The cache holds the shared prefix in slots `[0, L)` (the same for every row) and the suffix
    rows, left-padded to `S`, go to slots `[L, L + S)`; `mask` `[B, L + S]` says which slots a row
    sees (a row whose tokenisation departs from the shared prefix early hides the rest of it) and
    `positions` `[B, S]` continue each row from the prefix tokens it kept. The stack runs without
    the LM head, which is applied to the last position only.
    """
    b, s = tokens.shape

    def grow(x: jax.Array, axis: int) -> jax.Array:  # every row: the prefix, then s empty slots
        x = jnp.broadcast_to(x, (b, *x.shape[1:]))
        return jnp.concatenate([x, jnp.zeros(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype)], axis=axis)

    hidden = forward(params, cfg, tokens, attn_mask=mask, positions=positions, cache=map_slots(grow, prefix),
                     cache_index=prefix.slots, return_logits=False).hidden
    return unembed(params, cfg, hidden[:, -1:])[:, 0][:, letter_ids]


def judge_chat_prompt(tokenizer: Any, item: JudgeItem) -> str:
    """The paper's messages in the judge model's own chat template, ending where its reply starts.

    A template that refuses a system role (Gemma's) gets the user turn alone; the system message
    is empty anyway, and what matters is that no default system prompt is slipped in where the
    paper sent an empty one (SmolLM2's and Qwen2.5's templates add one when there is none).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise JudgeError("the local judge needs an instruction model with a chat template; this tokenizer has none")
    messages = judge_messages(RUBRIC.format(question=item.question, gold=item.gold, answer=item.answer))
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError:  # "System role not supported"
        return tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)


def letter_token_ids(tokenizer: Any, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token ids of "A" and of "B" as the model would emit them first in its reply.

    Both spellings, "A" and " A", are taken when each is one token right after the prompt (in
    context: prompt + letter must tokenise as the prompt's ids + one id), and their logits are
    pooled (log-sum-exp). Why both: byte-level BPE chat models start a reply after the template's
    newline with "A" (SmolLM2, Llama-3, Qwen2.5), but SentencePiece ones (Llama-2's "[/INST]")
    start it with "▁A"; pooling reads "the reply begins with the letter A" whatever the spelling,
    as the API judge's parser does, and a spelling the model never uses adds ~nothing.
    """
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for letter in "AB":
        ids = []
        for spelling in (letter, " " + letter):
            full = tokenizer(prompt + spelling, add_special_tokens=False)["input_ids"]
            if len(full) == len(base) + 1 and list(full[: len(base)]) == list(base) and full[-1] not in ids:
                ids.append(int(full[-1]))
        if not ids:
            raise JudgeError(f"the judge model's tokenizer has no single token for {letter!r} after its chat prompt")
        out.append(tuple(ids))
    if set(out[0]) & set(out[1]):
        raise JudgeError('the judge model\'s tokenizer gives "A" and "B" the same token (an unknown-word id?)')
    return out[0], out[1]


class LocalJudge:
    """Grades answers with a local instruction model: the paper's prompt, the verdict read from logits.

    verdict = 1.0 iff log p(A) > log p(B) for the first reply token (see `letter_token_ids`);
    margin = log p(A) - log p(B), stored in the cache beside the verdict: how sure the judge was.
    Greedy decoding would emit "A" exactly when its logit beats every other token's; reading only
    A vs B instead never leaves an item unjudged and costs one forward per batch, no decoding.

    Why it is fast: about three quarters of every prompt (the template's opening and the rubric up
    to the sample) is the same for all answers, so its keys/values are computed once and every
    batch runs only the rest (question, gold, answer, instruction: ~90 tokens instead of ~380
    with SmolLM2). The rest is sorted by length and left-padded to power-of-two buckets (length
    >= 16, batch <= the bucket of `batch_size`), so a few programs serve every batch; `params` is
    a traced argument, so the forward works as it is on parameters placed on a mesh.

    `model` is `load_model`'s argument (HF directory, .gguf file or "default"), loaded lazily, once,
    on the first cache miss, so a run whose verdicts are all cached never loads it; or a loaded
    `Model` (a notebook, a test).
    """

    def __init__(self, model: Any = DEFAULT_LOCAL_JUDGE_MODEL, cache_path: str | Path | None = None,
                 batch_size: int = 16, dtype: str = "float32"):
        if batch_size < 1:
            raise JudgeError("LocalJudge needs batch_size >= 1")
        loaded = not isinstance(model, (str, Path))
        self.model_path = model.name if loaded else str(model)
        self.name = f"local:{self.model_path}"  # also the cache's model key
        self.batch_size = batch_size  # answers per forward
        self.dtype = dtype  # the judge model's parameter dtype
        self.cache = VerdictCache(cache_path)
        self.forwards = 0  # batched forwards issued so far (a fully cached call issues none)
        self._model: Any = None
        self._letters: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self._prefix_ids: list[int] = []  # the shared opening of every judge prompt
        self._prefix: KVCache | None = None
        self._given = model if loaded else None

    def _load(self) -> Any:
        if self._model is None:
            from mirage_jax.model import load_model

            model = self._given if self._given is not None else load_model(self.model_path, dtype=self.dtype)
            tok = model.tokenizer
            self._letters = letter_token_ids(tok, judge_chat_prompt(tok, JudgeItem("?", "?", "?")))
            # The shared opening ends at the line break before the question (a token boundary for
            # every tokenizer we know; `margins` checks each row anyway).
            slot = "\u2063QUESTION\u2063"
            probe = judge_chat_prompt(tok, JudgeItem(slot, "?", "?"))
            opening = probe[: probe.rfind("\n", 0, probe.index(slot)) + 1]
            self._prefix_ids = list(tok(opening, add_special_tokens=False)["input_ids"])
            if not self._prefix_ids:
                raise JudgeError("the judge model's chat template puts nothing before the rubric's sample")
            self._prefix = _prefix_cache(model.params, model.cfg, jnp.asarray([self._prefix_ids], jnp.int32))
            self._model = model
        return self._model

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        return [verdict for verdict, _ in self.judge_with_margins(items)]

    def judge_with_margins(self, items: Sequence[JudgeItem]) -> list[tuple[float, float | None]]:
        """(verdict, margin) per item; cached items issue no forward (margin None when the cached
        verdict came from a judge that stores none)."""
        keys = [cache_key(self.name, item) for item in items]
        todo: dict[str, JudgeItem] = {}
        for key, item in zip(keys, items):
            if self.cache.get(key) is None:
                todo.setdefault(key, item)  # identical items are judged once
        if todo:
            margins = self.margins(list(todo.values()))
            for (key, item), margin in zip(todo.items(), margins):
                verdict = float(margin > 0)
                self.cache.put(key, verdict, self.name, item, "A" if verdict else "B", margin=margin)
        return [(self.cache.get(k), self.cache.margin(k)) for k in keys]  # type: ignore[misc]

    def margins(self, items: Sequence[JudgeItem]) -> list[float]:
        """log p(A) - log p(B) for each item (no cache), in batches of `batch_size`."""
        if not items:
            return []
        model = self._load()
        tok, (a_ids, b_ids), prefix_ids = model.tokenizer, self._letters, self._prefix_ids
        n_prefix = len(prefix_ids)
        rows, kept = [], []  # per item: the tokens after the shared prefix, and how many prefix tokens it keeps
        for item in items:
            ids = list(tok(judge_chat_prompt(tok, item), add_special_tokens=False)["input_ids"])
            keep = next((j for j, (x, y) in enumerate(zip(ids[:n_prefix], prefix_ids)) if x != y),
                        min(n_prefix, len(ids) - 1))
            keep = min(keep, len(ids) - 1)  # at least one token runs in the batch: its logits are read
            rows.append(ids[keep:])
            kept.append(keep)
        longest = max(k + len(r) for k, r in zip(kept, rows))
        if model.cfg.learned_positions and longest > model.cfg.max_position_embeddings:
            raise JudgeError(f"a judge prompt of {longest} tokens exceeds the judge model's "
                             f"{model.cfg.max_position_embeddings} positions")
        letter_ids = jnp.asarray(a_ids + b_ids, jnp.int32)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a bucket
        out = np.zeros(len(rows), np.float64)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            batch = min(bucket(len(idx), 1), bucket(self.batch_size, 1))
            length = bucket(max(len(rows[i]) for i in idx))
            tokens = np.full((batch, length), pad, np.int32)
            mask = np.zeros((batch, n_prefix + length), np.int32)
            positions = np.zeros((batch, length), np.int32)
            for r, i in enumerate(idx):
                n = len(rows[i])
                tokens[r, length - n:] = rows[i]
                mask[r, : kept[i]] = 1
                mask[r, n_prefix + length - n:] = 1
                positions[r, length - n:] = kept[i] + np.arange(n)
            mask[len(idx):, -1] = 1  # filler rows: one visible token keeps their softmax finite
            logits = _letter_logits(model.params, model.cfg, self._prefix, jnp.asarray(tokens), jnp.asarray(mask),
                                    jnp.asarray(positions), letter_ids)
            logits = np.asarray(logits, np.float64)[: len(idx)]
            self.forwards += 1
            k = len(a_ids)
            out[idx] = _logsumexp(logits[:, :k]) - _logsumexp(logits[:, k:])
        return [float(m) for m in out]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1)
    return top + np.log(np.exp(x - top[:, None]).sum(axis=-1))


def make_judge(kind: str, model: str | None = None, base_url: str | None = None,
               cache_path: str | Path | None = None, **options) -> Judge:
    """'exact_match' -> ExactMatchJudge, 'contains' -> ContainsJudge (other arguments unused); 'llm' -> LLMJudge;
    'local' -> LocalJudge.

    `model`: the API model name for 'llm' (default gpt-4o-mini), `load_model`'s argument for 'local'
    (an HF directory, a .gguf file or "default"). `options`: for 'llm' timeout_s, max_retries,
    backoff_s, backoff_max_s, max_workers; for 'local' batch_size, dtype.
    """
    if kind == "exact_match":
        return ExactMatchJudge()
    if kind == "contains":
        return ContainsJudge()
    if kind == "llm":
        return LLMJudge(model=model or DEFAULT_JUDGE_MODEL, base_url=base_url, cache_path=cache_path, **options)
    if kind == "local":
        if base_url is not None:
            raise JudgeError("--judge_base_url is for --judge=llm; the local judge runs --judge_model itself")
        return LocalJudge(model=model or DEFAULT_LOCAL_JUDGE_MODEL, cache_path=cache_path, **options)
    raise JudgeError(f"unknown judge kind {kind!r}; valid: {', '.join(JUDGE_KINDS)}")
