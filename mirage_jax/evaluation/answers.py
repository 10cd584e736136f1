"""WILD evaluation text handling: context wrapping, stop rules, answer cleaning, exact match, containment.

Pure Python; the generation loop (generate.py) owns tokens, this module owns strings.

Stop rules (spec 3.2-3.3 and 7.13-7.15). The paper's generation stops as soon as the decoded
continuation ends with "." or "\\n" or the EOS string, then strips one trailing ".", "\\n" and
EOS. That cuts "Robert C. Newton" to "Robert C", "24,303.04" to "24,303" and turns a leading
newline into an empty answer. `StopRule.seed()` reproduces it; `StopRule()` (= `improved`) is
the default:

* EOS / end-of-turn strings end the answer wherever they appear;
* whitespace (newlines included) before the first visible character is skipped;
* after that, the first newline ends the answer;
* a period ends the answer only when followed by whitespace (or the end of the finished
  text) and the word before it is neither a single capital initial ("C.") nor an
  abbreviation ("U.S.", "Mr.", "St.") -- so periods between digits never end it;
* the cleaned answer is stripped of surrounding whitespace and of a final sentence period
  (an abbreviation keeps its period: "Washington, D.C.").

`find_stop(text, rule)` is called by the generation loop on the decoded continuation so far;
it returns `end`, the length of the prefix the rule keeps (terminator included), or None while
the answer may go on. `clean_answer(text, rule)` turns a continuation (cut or not) into the
answer that is judged.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

CONTEXT_TYPES = ("question-only", "qa_inst", "chat_temp")
QA_INST_TEMPLATE = "Please answer the question:\n\nQ: {question}\nA:"


@dataclasses.dataclass(frozen=True)
class WrappedPrompt:
    """The model input for one question and how to tokenise it."""

    text: str
    # False when `text` already holds the special tokens the model expects (a chat template
    # renders its own BOS); True to let the tokenizer add them (BOS), as the seed does.
    add_special_tokens: bool


def wrap_context(question: str, context_type: str, tokenizer: Any = None) -> WrappedPrompt:
    """Wrap a raw question in one of the WILD contexts (spec 3.1).

    'chat_temp' uses the tokenizer's own chat template (the seed hard-codes Llama-2's, with a
    double BOS and an EOS before the answer, spec 7.14).
    """
    if context_type == "question-only":
        return WrappedPrompt(question, add_special_tokens=True)
    if context_type == "qa_inst":
        return WrappedPrompt(QA_INST_TEMPLATE.format(question=question), add_special_tokens=True)
    if context_type == "chat_temp":
        if tokenizer is None:
            raise ValueError("context_type 'chat_temp' needs a tokenizer with a chat template")
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True, tokenize=False)
        except ValueError as e:  # transformers: "tokenizer.chat_template is not set"
            raise ValueError(f"context_type 'chat_temp': the tokenizer has no usable chat "
                             f"template ({e})") from e
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return WrappedPrompt(text, add_special_tokens=False)
    raise ValueError(f"unknown context_type {context_type!r}; valid: {', '.join(CONTEXT_TYPES)}")


# Words that end in a period without ending a sentence. Case-sensitive on purpose: "No." is an
# answer, "No. 5" is rarer; "etc." usually ends a list and so ends the answer too.
ABBREVIATIONS = frozenset({
    "Mr", "Mrs", "Ms", "Dr", "Prof", "Sr", "Jr", "St", "Mt", "Ft", "Gen", "Col", "Lt", "Sgt",
    "Capt", "Cmdr", "Adm", "Rev", "Hon", "Gov", "Sen", "Rep", "Pres", "Co", "Corp", "Inc",
    "Ltd", "Bros", "Ave", "Blvd", "Rd", "Dept", "Univ", "Vol", "Op", "vs", "approx", "ca",
    "cf", "al", "Jan", "Feb", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec",
})
_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # "U.S", "D.C", "e.g" (final period excluded)
_LEADING_PUNCT = "\"'([{“‘«"


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Where a generated answer ends and how it is cleaned."""

    kind: str = "improved"  # 'seed' (the paper's rule) or 'improved'
    eos_strings: tuple[str, ...] = ()  # decoded EOS / end-of-turn strings of the model
    abbreviations: frozenset[str] = ABBREVIATIONS  # 'improved': words whose period is not final

    def __post_init__(self):
        if self.kind not in ("seed", "improved"):
            raise ValueError(f"unknown stop rule {self.kind!r}; valid: seed, improved")
        if isinstance(self.eos_strings, str):
            raise TypeError("eos_strings must be a tuple of strings, not a string")
        if any(not s for s in self.eos_strings):
            raise ValueError("eos_strings must not contain empty strings")

    @property
    def stop_chars(self) -> str:
        """The characters an answer can end on ('.', '\\n', an EOS string's last): the generation loop
        checks the text early when a token holds one (`generate_ids`' `stop_chars`)."""
        return ".\n" + "".join(s[-1] for s in self.eos_strings)

    @classmethod
    def seed(cls, eos_strings: tuple[str, ...] = ()) -> StopRule:
        """The paper: stop at the first '.', '\\n' or EOS; strip one of each at the end."""
        return cls(kind="seed", eos_strings=tuple(eos_strings))

    @classmethod
    def improved(cls, eos_strings: tuple[str, ...] = ()) -> StopRule:
        return cls(kind="improved", eos_strings=tuple(eos_strings))


def _first(text: str, needles: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """Earliest occurrence (position, needle) of any needle at or after `start`."""
    best = None
    for needle in needles:
        i = text.find(needle, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, needle)
    return best


def _is_abbreviation(text: str, period: int, rule: StopRule) -> bool:
    """Whether the word right before `text[period] == '.'` keeps its period."""
    start = period
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:period].lstrip(_LEADING_PUNCT)
    if len(word) == 1 and word.isupper():  # an initial: "C." in "Robert C. Newton"
        return True
    return word in rule.abbreviations or _ACRONYM.fullmatch(word) is not None


def _improved_stop(text: str, rule: StopRule, finished: bool) -> int | None:
    eos = _first(text, rule.eos_strings)
    limit = eos[0] if eos else len(text)  # the answer never reaches past an EOS string
    content = len(text[:limit]) - len(text[:limit].lstrip())  # first visible character
    for i in range(content, limit):
        ch = text[i]
        if ch == "\n":
            return i + 1
        if ch != ".":
            continue
        if i + 1 < len(text):
            if not text[i + 1].isspace() and i + 1 != limit:
                continue  # "24,303.04", "U.S.A", ".com": not the end of a sentence
        elif not finished:
            return None  # a period at the end of a partial text: wait for the next character
        if not _is_abbreviation(text, i, rule):
            return i + 1
    return eos[0] + len(eos[1]) if eos else None


def find_stop(text: str, rule: StopRule = StopRule()) -> int | None:
    """End of the answer in the decoded continuation so far, or None if it may still go on.

    Returns `end` such that generation stops and keeps `text[:end]` (terminator included, as
    HF's `stop_strings` keeps it). The seed rule is matched on characters: HF matches stop
    strings at token ends, so a token with a period inside it (rare: "...", ".\\n") can make
    the seed stop one token later than here.
    """
    if rule.kind == "seed":
        hit = _first(text, (".", "\n") + rule.eos_strings)
        return None if hit is None else hit[0] + len(hit[1])
    return _improved_stop(text, rule, finished=False)


def clean_answer(text: str, rule: StopRule = StopRule()) -> str:
    """The answer that is judged, from a finished continuation (already cut or not)."""
    if rule.kind == "seed":
        end = find_stop(text, rule)
        text = text if end is None else text[:end]
        for suffix in (".", "\n") + rule.eos_strings[:1]:  # seed order: '.', '\n', EOS
            if text.endswith(suffix):
                text = text[: -len(suffix)]
        return text
    end = _improved_stop(text, rule, finished=True)
    text = text if end is None else text[:end]
    eos = _first(text, rule.eos_strings)
    if eos is not None:
        text = text[: eos[0]]
    text = text.strip()
    if text.endswith(".") and not _is_abbreviation(text, len(text) - 1, rule):
        text = text[:-1].rstrip()
    return text


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation (spec 3.4b): lower-case, drop ASCII punctuation, drop the articles
    a/an/the (replaced by a space), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 iff the normalised strings are equal (single reference, no aliases)."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def contains_answer(pred: str, gold: str) -> float:
    """1.0 iff the normalised gold's words occur as a contiguous run of the normalised answer's words.

    Word-level, not character-level: "New York" is not in "New Yorker", "20" is not in "2002". An
    empty gold (nothing left after normalisation) is never contained.
    """
    want, have = normalize_answer(gold).split(), normalize_answer(pred).split()
    n = len(want)
    return float(n > 0 and any(have[i : i + n] == want for i in range(len(have) - n + 1)))
