"""Judges that score a generated answer against the gold target: exact match or an LLM.

Both have `judge_many(items) -> list[float | None]`: 1.0 correct, 0.0 incorrect, None unjudged.

The LLM judge follows the paper (spec 3.4a): gpt-4o-mini, temperature 0, one user message with
a SimpleQA-style rubric, reply "A" (CORRECT) or "B" (INCORRECT). What it does beyond the seed
(spec 7.16):
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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from mirage_jax.evaluation.answers import exact_match

log = logging.getLogger(__name__)

JUDGE_KINDS = ("exact_match", "llm")
DEFAULT_JUDGE_MODEL = "gpt-4o-mini"
API_KEY_ENV = "OPENAI_API_KEY"

# Bump when RUBRIC changes: cached verdicts given under another rubric are not reused.
RUBRIC_VERSION = "1"
RUBRIC = """\
You will see a question, its gold target and a predicted answer. Decide whether the predicted \
answer is CORRECT or INCORRECT.

A predicted answer is CORRECT when it contains everything the gold target says and nothing that \
contradicts it. Letter case, word order, punctuation and extra words that do not change the \
meaning do not matter. For the question "What are the names of Barack Obama's children?" with \
the gold target "Malia Obama and Sasha Obama", these are CORRECT:
- sasha and malia obama
- Barack Obama has two daughters: Malia Ann and Natasha Marian, who is usually called Sasha \
(Malia Obama and Sasha Obama).
Both give the full gold information and add nothing that conflicts with it.

A predicted answer is INCORRECT when it leaves out part of the gold target, states something \
that contradicts it, or repeats the answer over and over. For the same question with the gold \
target "Malia and Sasha", these are INCORRECT:
- Malia.
- Malia, Sasha, and Susan.
- Malia and Sasha Malia and Sasha Malia and Sasha Malia and Sasha.
The first misses a name, the second adds a wrong one, the third repeats itself.

Grade this one:
Question: {question}
Gold target: {gold}
Predicted answer: {answer}

Reply with one letter: "A" for CORRECT or "B" for INCORRECT. Give only the letter.
"""


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


def cache_key(model: str, item: JudgeItem) -> str:
    payload = json.dumps([RUBRIC_VERSION, model, item.question, item.gold, item.answer],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """Append-only JSON-lines file of verdicts; a torn last line (crash) is ignored."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._verdicts: dict[str, float] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        entry = json.loads(line)
                        self._verdicts[entry["key"]] = float(entry["verdict"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("judge cache %s: ignoring unreadable line %d", self.path, lineno)

    def get(self, key: str) -> float | None:
        return self._verdicts.get(key)

    def put(self, key: str, verdict: float, model: str, item: JudgeItem, reply: str) -> None:
        entry = {"key": key, "verdict": verdict, "model": model, "question": item.question,
                 "gold": item.gold, "answer": item.answer, "reply": reply}
        with self._lock:
            self._verdicts[key] = verdict
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")

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
                    messages=[{"role": "user", "content": prompt}])
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


def make_judge(kind: str, model: str = DEFAULT_JUDGE_MODEL, base_url: str | None = None,
               cache_path: str | Path | None = None, **llm_options) -> Judge:
    """'exact_match' -> ExactMatchJudge (other arguments unused); 'llm' -> LLMJudge.

    `llm_options`: timeout_s, max_retries, backoff_s, backoff_max_s, max_workers.
    """
    if kind == "exact_match":
        return ExactMatchJudge()
    if kind == "llm":
        return LLMJudge(model=model, base_url=base_url, cache_path=cache_path, **llm_options)
    raise JudgeError(f"unknown judge kind {kind!r}; valid: {', '.join(JUDGE_KINDS)}")
