import pytest

from mirage_jax.evaluation.answers import (
    CONTEXT_TYPES,
    StopRule,
    WrappedPrompt,
    clean_answer,
    exact_match,
    find_stop,
    normalize_answer,
    wrap_context,
)

SEED = StopRule.seed(("</s>",))
IMPROVED = StopRule.improved(("</s>", "<|eot_id|>"))


class _ChatTokenizer:
    """Renders a Llama-3-like template (which includes its own BOS), like HF does."""

    def __init__(self, template=True):
        self.template = template
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.calls.append((messages, add_generation_prompt, tokenize))
        if not self.template:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template "
                             "is not set")
        (message,) = messages
        return (f"<|begin_of_text|><|start_header_id|>{message['role']}<|end_header_id|>\n\n"
                f"{message['content']}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_wrap_context():
    q = "What is the capital of France?"
    assert wrap_context(q, "question-only") == WrappedPrompt(q, add_special_tokens=True)
    assert wrap_context(q, "qa_inst") == WrappedPrompt(
        "Please answer the question:\n\nQ: What is the capital of France?\nA:", True)
    tok = _ChatTokenizer()
    wrapped = wrap_context(q, "chat_temp", tok)
    assert tok.calls == [([{"role": "user", "content": q}], True, False)]
    assert wrapped.text.startswith("<|begin_of_text|>") and q in wrapped.text
    assert wrapped.add_special_tokens is False  # the template already holds the BOS


def test_wrap_context_errors():
    with pytest.raises(ValueError) as err:
        wrap_context("q", "chat")
    assert all(name in str(err.value) for name in CONTEXT_TYPES)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        wrap_context("q", "chat_temp")
    with pytest.raises(ValueError, match="no usable chat template"):
        wrap_context("q", "chat_temp", _ChatTokenizer(template=False))


@pytest.mark.parametrize("text, seed, improved", [
    ("\nParis.", "", "Paris"),  # a leading newline empties the seed's answer
    ("Paris.", "Paris", "Paris"),
    ("Paris. It is the capital.", "Paris", "Paris"),
    ("Robert C. Newton", "Robert C", "Robert C. Newton"),
    ("Robert C. Newton. He was", "Robert C", "Robert C. Newton"),
    ("24,303.04", "24,303", "24,303.04"),
    ("24,303.04 people.", "24,303", "24,303.04 people"),
    ("J. L. Ruiz Basadre.\nNext", "J", "J. L. Ruiz Basadre"),
    ("U.S.", "U", "U.S."),  # an abbreviation keeps its period
    ("the U.S. Army\nmore", "the U", "the U.S. Army"),
    ("Dr. Smith\n", "Dr", "Dr. Smith"),
    ("Washington, D.C.", "Washington, D", "Washington, D.C."),
    ("  \n\n Lyon \nMarseille", "  ", "Lyon"),
    ("Paris</s>", "Paris", "Paris"),
    ("Paris.</s>", "Paris", "Paris"),
    ("</s>Paris", "", ""),
    ("Paris<|eot_id|>", "Paris<|eot_id|>", "Paris"),  # seed knows only one EOS string
    ("Lyon\n", "Lyon", "Lyon"),
    ("Wilt Chamberlain *", "Wilt Chamberlain *", "Wilt Chamberlain *"),
    ("", "", ""),
])
def test_clean_answer(text, seed, improved):
    assert clean_answer(text, SEED) == seed
    assert clean_answer(text, IMPROVED) == improved


def test_seed_strip_order_is_period_newline_eos():
    assert clean_answer("Paris.\n</s>", SEED) == "Paris"  # cut at the first '.'
    # Uncut text (e.g. max_new_tokens reached): one of each, in the seed's order only.
    rule = StopRule.seed(("</s>",))
    assert clean_answer("Paris\n", rule) == "Paris"
    assert clean_answer("Paris ", rule) == "Paris "  # no whitespace trimming in the seed


@pytest.mark.parametrize("text, end", [
    ("", None), ("Par", None), ("\n", None), ("  \n ", None),
    ("Paris", None),
    ("Paris.", None),  # a final period may still be a decimal point or an initial
    ("Paris. ", 6), ("Paris.\n", 6), ("Paris\n", 6), ("\nParis\n", 7),
    ("Robert C.", None), ("Robert C. ", None), ("Robert C. Newton", None),
    ("Robert C. Newton. ", 17), ("24,303.", None), ("24,303.04", None),
    ("Paris</s>", 9), ("Paris.</s>", 6), ("</s>", 4),
])
def test_find_stop_improved_on_partial_text(text, end):
    assert find_stop(text, IMPROVED) == end


def test_find_stop_is_stable_as_text_grows():
    """The generation loop calls find_stop after every chunk: once stopped, stays stopped."""
    full = "\n Robert C. Newton, Jr. was born in 24,303.04 Main St. in the U.S. city. More\n"
    stops = [find_stop(full[:n], IMPROVED) for n in range(len(full) + 1)]
    first = next(n for n, s in enumerate(stops) if s is not None)
    assert all(s == stops[first] for s in stops[first:])
    end = stops[first]
    assert full[:end].endswith("city.")
    assert clean_answer(full[:end], IMPROVED) == clean_answer(full, IMPROVED) == (
        "Robert C. Newton, Jr. was born in 24,303.04 Main St. in the U.S. city")


def test_find_stop_seed():
    assert find_stop("\nParis.", SEED) == 1
    assert find_stop("Robert C. Newton", SEED) == 9
    assert find_stop("Paris</s>", SEED) == 9
    assert find_stop("Paris", SEED) is None


def test_stop_rule_validation():
    assert StopRule() == StopRule.improved()
    with pytest.raises(ValueError, match="seed, improved"):
        StopRule(kind="hf")
    with pytest.raises(TypeError):
        StopRule(eos_strings="</s>")
    with pytest.raises(ValueError):
        StopRule(eos_strings=("",))


@pytest.mark.parametrize("pred, gold, score", [
    ("Lyon", "Lyon", 1.0),
    ("lyon.", "Lyon", 1.0),
    ("The Eiffel Tower", "eiffel tower", 1.0),
    ("an apple a day", "apple day", 1.0),
    ("Robert C. Newton", "Robert C Newton", 1.0),
    ("24,303.04", "2430304", 1.0),
    ("  Wilt   Chamberlain *", "Wilt Chamberlain", 1.0),
    ("Theodore", "odore", 0.0),  # articles only as whole words
    ("Lyon, France", "Lyon", 0.0),  # no containment
    ("Malia and Sasha", "Sasha and Malia", 0.0),
    ("café", "cafe", 0.0),  # no unicode folding
    ("“Lyon”", "Lyon", 0.0),  # only ASCII punctuation is removed
])
def test_exact_match(pred, gold, score):
    assert exact_match(pred, gold) == score


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("A an THE") == ""
    assert normalize_answer("the\tanswer\nis 42.") == "answer is 42"


@pytest.mark.parametrize("rule", [SEED, IMPROVED], ids=["seed", "improved"])
def test_an_answer_ends_within_two_tokens_of_a_stop_character(rule):
    """The generation loop checks a row's text only when one of its last two tokens holds one of
    `rule.stop_chars` (or at the end of a chunk). That is exact only if `find_stop` can first fire
    there: checked over random token splits of texts with periods inside numbers, abbreviations,
    initials, newlines and EOS strings."""
    import random

    texts = ["Paris is the capital. It is big", "It was 24,303.04 dollars. Then", "Mr. Smith and Robert C. Newton.\nx",
             "The U.S.A. won in 1999. Yes", "He went to example.com today\nand", "It ends here</s>more",
             "A list: one, two, etc. and so on", "No.", "Lyon<|eot_id|> and", "3.5 is a number. So"]
    rng = random.Random(0)
    for text in texts:
        for _ in range(40):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            for n in range(1, len(pieces) + 1):
                if find_stop("".join(pieces[:n]), rule) is not None:
                    assert any(c in "".join(pieces[max(0, n - 2):n]) for c in rule.stop_chars), (text, pieces[:n])
                    break
