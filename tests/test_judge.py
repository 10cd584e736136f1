"""The LLM judge against a real OpenAI-compatible HTTP server on loopback."""

import http.server
import json
import logging
import re
import threading
import time

import pytest

from mirage_jax.evaluation.judge import (
    RUBRIC,
    ExactMatchJudge,
    JudgeError,
    JudgeItem,
    LLMJudge,
    make_judge,
    parse_verdict,
)

SECRET = "sk-test-DO-NOT-LEAK-1234567890"


class _FakeOpenAI(http.server.ThreadingHTTPServer):
    """Speaks /v1/chat/completions. `behave(n, body)` -> (status, reply text, delay seconds),
    where n is the 1-based number of this request."""

    daemon_threads = True

    def __init__(self, behave):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behave = behave
        self.requests = []  # (authorization header, request body)
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()  # wakes sleeping handlers at teardown

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append((self.headers.get("Authorization"), body))
            n = len(server.requests)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            status, reply, delay = server.behave(n, body)
            if delay:
                server.stop.wait(delay)
            if self.path != "/v1/chat/completions":
                status, reply = 404, None
            if status == 200:
                payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                           "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": reply}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                     "total_tokens": 2}}
            else:
                payload = {"error": {"message": "boom", "type": "server_error"}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            # Out of flight *before* the client can read the reply: counted after it, the client's next
            # request on the freed worker could arrive first and be counted as one more in flight.
            self._done()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            self._done()

    def _done(self):
        if not getattr(self, "_counted_out", False):
            self._counted_out = True
            with self.server.lock:
                self.server.in_flight -= 1


@pytest.fixture
def serve():
    servers = []

    def start(behave):
        server = _FakeOpenAI(behave)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def _answer_of(body):
    """The predicted answer the rubric was filled with."""
    return re.search(r"Predicted answer: (.*)", body["messages"][-1]["content"]).group(1)


def _judge(server, tmp_path, **options):
    options = {"timeout_s": 2.0, "max_retries": 0, "backoff_s": 0.01, **options}
    return LLMJudge(model="judge-test", base_url=server.base_url,
                    cache_path=tmp_path / "verdicts.jsonl", **options)


ITEM = JudgeItem("What is the capital of France?", "Lyon", "Lyon")


def test_verdict_parsing_over_http(serve, tmp_path):
    replies = {"a1": "A", "a2": "A.", "a3": " a", "a4": "A: CORRECT", "a5": "**A**",
               "b1": "B", "b2": "b.\nThe answer names another city.", "b3": "INCORRECT",
               "u1": "I am not sure.", "u2": "", "u3": "A: INCORRECT"}
    server = serve(lambda n, body: (200, replies[_answer_of(body)], 0))
    judge = _judge(server, tmp_path)
    items = [JudgeItem("q?", "gold", answer) for answer in replies]
    verdicts = judge.judge_many(items)
    expected = {"a": 1.0, "b": 0.0, "u": None}
    assert verdicts == [expected[answer[0]] for answer in replies]

    authorization, body = server.requests[0]
    assert authorization == f"Bearer {SECRET}"
    assert body["model"] == "judge-test" and body["temperature"] == 0
    system, message = body["messages"]  # the paper's chat: an empty system message, then the rubric
    assert system == {"role": "system", "content": ""}
    assert message["role"] == "user"
    assert message["content"] == RUBRIC.format(question="q?", gold="gold",
                                               answer=_answer_of(body))
    assert "Malia" in message["content"] and "Sasha" in message["content"]


def test_cache_prevents_second_request_and_survives_restart(serve, tmp_path):
    server = serve(lambda n, body: (200, "A" if _answer_of(body) == "Lyon" else "B", 0))
    judge = _judge(server, tmp_path)
    items = [ITEM, JudgeItem(ITEM.question, "Lyon", "Paris"), ITEM]  # a duplicate
    assert judge.judge_many(items) == [1.0, 0.0, 1.0]
    assert len(server.requests) == 2  # the duplicate is asked once
    assert judge.judge_many(items) == [1.0, 0.0, 1.0]
    assert len(server.requests) == 2

    resumed = _judge(server, tmp_path)  # a new run reading the same cache file
    assert resumed.judge_many(items[:2]) == [1.0, 0.0]
    assert len(server.requests) == 2
    other_model = LLMJudge(model="other", base_url=server.base_url,
                           cache_path=tmp_path / "verdicts.jsonl", max_retries=0)
    assert other_model.judge_many([ITEM]) == [1.0]
    assert len(server.requests) == 3  # the key includes the judge model

    cache_text = (tmp_path / "verdicts.jsonl").read_text()
    assert SECRET not in cache_text and "Bearer" not in cache_text
    lines = [json.loads(line) for line in cache_text.splitlines()]
    assert len(lines) == 3 and {line["answer"] for line in lines} == {"Lyon", "Paris"}


def test_cache_ignores_a_torn_last_line(serve, tmp_path, caplog):
    server = serve(lambda n, body: (200, "A", 0))
    _judge(server, tmp_path).judge_many([ITEM])
    with open(tmp_path / "verdicts.jsonl", "a") as f:
        f.write('{"key": "abc", "verd')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        judge = _judge(server, tmp_path)
    assert "unreadable line 2" in caplog.text
    assert judge.judge_many([ITEM]) == [1.0] and len(server.requests) == 1


def test_retries_after_server_errors(serve, tmp_path):
    server = serve(lambda n, body: (500, None, 0) if n <= 2 else (200, "A", 0))
    judge = _judge(server, tmp_path, max_retries=3)
    assert judge.judge_many([ITEM]) == [1.0]
    assert len(server.requests) == 3


def test_rate_limit_is_retried_but_bad_request_is_not(serve, tmp_path):
    server = serve(lambda n, body: (429, None, 0) if n == 1 else (200, "B", 0))
    assert _judge(server, tmp_path, max_retries=2).judge_many([ITEM]) == [0.0]
    assert len(server.requests) == 2
    server = serve(lambda n, body: (400, None, 0))
    assert _judge(server, tmp_path / "x", max_retries=2).judge_many([ITEM]) == [None]
    assert len(server.requests) == 1


def test_unreachable_judge_leaves_items_unjudged(serve, tmp_path, caplog):
    server = serve(lambda n, body: (500, None, 0))
    judge = _judge(server, tmp_path, max_retries=2)
    with caplog.at_level(logging.WARNING):
        # The answer equals the gold: exact match would say 1.0, the judge must not.
        assert judge.judge_many([ITEM]) == [None]
    assert len(server.requests) == 3
    assert "unjudged" in caplog.text and SECRET not in caplog.text
    assert not (tmp_path / "verdicts.jsonl").exists()  # nothing cached: asked again next run


def test_timeout_leaves_items_unjudged(serve, tmp_path):
    server = serve(lambda n, body: (200, "A", 5.0))
    judge = _judge(server, tmp_path, timeout_s=0.3, max_retries=1)
    start = time.monotonic()
    assert judge.judge_many([ITEM]) == [None]
    assert time.monotonic() - start < 3.0
    assert len(server.requests) == 2


def test_no_server_at_all_leaves_items_unjudged(tmp_path):
    judge = LLMJudge(base_url="http://127.0.0.1:9/v1", timeout_s=0.5, max_retries=1,
                     backoff_s=0.01)
    assert judge.judge_many([ITEM, ITEM]) == [None, None]


def test_concurrency_is_bounded(serve, tmp_path):
    server = serve(lambda n, body: (200, "A", 0.1))
    judge = _judge(server, tmp_path, max_workers=3)
    items = [JudgeItem("q", "g", f"answer {i}") for i in range(9)]
    assert judge.judge_many(items) == [1.0] * 9
    assert 2 <= server.max_in_flight <= 3
    assert len((tmp_path / "verdicts.jsonl").read_text().splitlines()) == 9


def test_key_only_from_environment(serve, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        LLMJudge()
    server = serve(lambda n, body: (200, "A", 0))
    assert _judge(server, tmp_path).judge_many([ITEM]) == [1.0]
    assert server.requests[0][0] == "Bearer EMPTY"  # local server, no key set
    with pytest.raises(TypeError):
        LLMJudge(api_key="x", base_url=server.base_url)


def test_make_judge_and_exact_match(tmp_path, serve):
    em = make_judge("exact_match")
    assert isinstance(em, ExactMatchJudge) and em.name == "exact_match"
    assert em.judge_many([ITEM, JudgeItem("q", "Lyon", "the lyon."),
                          JudgeItem("q", "Lyon", "Paris")]) == [1.0, 1.0, 0.0]
    server = serve(lambda n, body: (200, "A", 0))
    llm = make_judge("llm", "judge-test", server.base_url, tmp_path / "c.jsonl", max_retries=0)
    assert isinstance(llm, LLMJudge) and llm.name == "llm:judge-test"
    with pytest.raises(JudgeError) as err:
        make_judge("gpt4", "m", None, None)
    assert "exact_match" in str(err.value) and "llm" in str(err.value)


@pytest.mark.parametrize("reply, verdict", [
    ("A", 1.0), ("A.", 1.0), (" a", 1.0), ("A: CORRECT", 1.0), ("**A**", 1.0), ('"A"', 1.0),
    ("(B)", 0.0), ("B: INCORRECT", 0.0), ("Answer: B", 0.0), ("CORRECT", 1.0),
    ("A: INCORRECT", None), ("Both are fine", None), ("I think A", None), ("C", None),
    ("", None), (None, None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


# --- the paper's prompt and the local judge ---------------------------------------------------------

# The paper's grader prompt as its code sends it (Revisit-Editing-Evaluation, easyeditor/evaluate/
# evaluate_utils.py `llm_judge`, commit 6dcc555: a triple-quoted string, then `.strip()`), copied here
# independently of judge.RUBRIC, with the paper's own placeholder names.
PAPER_PROMPT = (
    'Your job is to look at a question, a gold target, and a predicted answer, and then assign a grade of either '
    '["CORRECT", "INCORRECT"].\n\nThe following are examples of CORRECT predicted answers.\n```\n'
    "Question: What are the names of Barack Obama's children?\nGold target: Malia Obama and Sasha Obama\n"
    "Predicted answer 1: sasha and malia obama\n"
    "Predicted answer 2: Malia and Sasha Obama are the names of Barack Obama's children.\n```\n"
    "These predicted answers are all CORRECT because:\n"
    "    - They fully contain the important information in the gold target.\n"
    "    - They do not contain any information that contradicts the gold target.\n\n"
    "The following are examples of INCORRECT predicted answers.\n```\n"
    "Question: What are the names of Barack Obama's children?\nGold target: Malia and Sasha\n"
    "Predicted answer 1: Malia.\nPredicted answer 2: Malia, Sasha, and Susan.\n"
    "Predicted answer 3: Malia and Sasha, Malia and Sasha, Malia and Sasha, Malia and Sasha (repeated answer)\n```\n"
    "These predicted answers are all INCORRECT because:\n"
    "    - A factual statement in the answer contradicts the gold target or contain repeated answer.\n\n\n"
    "Here is a sample. Simply reply with either CORRECT or INCORRECT.\n\n```\n"
    "Question: {question}\nGold target: {target}\nPredicted answer: {predicted_answer}\n```\n\n"
    "According to the gold target, please grade the predicted answer of this question as one of:\n"
    'A: CORRECT\nB: INCORRECT\n\nJust return the letters "A" or "B", with no text around it.'
)
# What spec 3.4a says the prompt holds (it paraphrases; these are its quoted parts).
SPEC_FRAGMENTS = ("What are the names of Barack Obama's children?", "Malia Obama and Sasha Obama",
                  "sasha and malia obama", "Malia and Sasha", "Malia.", "Malia, Sasha, and Susan",
                  "Question: ", "Gold target: ", "Predicted answer: ", "A: CORRECT", "B: INCORRECT", '"A" or "B"')


def test_rubric_is_the_papers_grader_prompt_word_for_word():
    from mirage_jax.evaluation.judge import RUBRIC_VERSION, judge_messages

    q, g, a = "Who wrote {x}?", "W. Shakespeare", "Shakespeare, {obviously}"
    filled = RUBRIC.format(question=q, gold=g, answer=a)
    assert filled == PAPER_PROMPT.format(question=q, target=g, predicted_answer=a)
    for fragment in SPEC_FRAGMENTS:
        assert fragment in filled, fragment
    assert judge_messages(filled) == [{"role": "system", "content": ""}, {"role": "user", "content": filled}]
    assert RUBRIC_VERSION == "2"  # verdicts cached under our old paraphrase (version 1) are not reused


_TEMPLATE = ("{% for m in messages %}t2 {{ m['role'] }} {{ m['content'] }} t3\n{% endfor %}"
             "{% if add_generation_prompt %}t2 assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_judge_model(tmp_path_factory):
    """The tiny llama with a word-level tokenizer whose last two ids are "A" and "B" and a chat
    template: every rubric word is the unknown id, the "tN" words of the cases are themselves."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mirage_jax.model import load_model
    from tiny import save_tiny

    d = save_tiny("llama", tmp_path_factory.mktemp("judge") / "ckpt", seed=3, attn_gain=5.0)
    vocab = {f"t{i}": i for i in range(126)} | {"A": 126, "B": 127}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word = lambda t: AddedToken(t, single_word=True, special=True)  # noqa: E731
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token=word("t0"), pad_token=word("t0"),
                                  eos_token=word("t1"))
    tok.chat_template = _TEMPLATE
    tok.save_pretrained(str(d))
    return load_model(d)


# Answers of 1..31 words: the rows after the shared prefix fall in two length buckets (64, 128);
# in batches of 4 the second batch has a filler row.
LOCAL_CASES = [JudgeItem(f"t{10 + i} t{11 + i} t5", f"t{40 + i}", " ".join(f"t{20 + j}" for j in range(1 + 5 * i)))
               for i in range(7)]


def _slow_margin(model, item):
    """The reference: the paper's messages through the template, one unpadded row, the full forward."""
    import jax.numpy as jnp

    from mirage_jax.model.transformer import forward

    text = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": ""},
         {"role": "user", "content": PAPER_PROMPT.format(question=item.question, target=item.gold,
                                                         predicted_answer=item.answer)}],
        add_generation_prompt=True, tokenize=False)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = forward(model.params, model.cfg, jnp.asarray([ids])).logits[0, -1]
    return float(logits[126] - logits[127])


def test_local_judge_equals_a_slow_per_item_reference(tiny_judge_model, tmp_path):
    """Batched (4 per forward), left-padded, prefix-cached verdicts and margins equal one full
    forward per item; a departure from the shared prefix is handled the same way."""
    from mirage_jax.evaluation.judge import LocalJudge

    cases = LOCAL_CASES[::2] + LOCAL_CASES[1::2]  # not in length order: batches are sorted, results must not be
    judge = LocalJudge(tiny_judge_model, tmp_path / "v.jsonl", batch_size=4)
    got = judge.judge_with_margins(cases)
    want = [_slow_margin(tiny_judge_model, item) for item in cases]
    assert judge.forwards == 2 and judge._letters == ((126,), (127,))
    assert [m for _, m in got] == pytest.approx(want, abs=1e-4)
    assert [v for v, _ in got] == [float(m > 0) for m in want]
    # (this random model says B to everything; the default-model test sees both verdicts)
    # A shared prefix one token longer than what the rows really share: each row keeps only
    # the tokens it has in common and runs the rest, with the same result.
    import jax.numpy as jnp

    from mirage_jax.evaluation.judge import _prefix_cache

    judge._prefix_ids = judge._prefix_ids + [99]
    judge._prefix = _prefix_cache(tiny_judge_model.params, tiny_judge_model.cfg, jnp.asarray([judge._prefix_ids]))
    assert judge.margins(cases) == pytest.approx(want, abs=1e-4)


def test_local_judge_cache_hit_issues_no_forward_and_compiles_once_per_bucket(tiny_judge_model, tmp_path):
    from mirage_jax.evaluation.judge import LocalJudge, _letter_logits

    _letter_logits.clear_cache()  # count this test's compilations only
    first = LocalJudge(tiny_judge_model, tmp_path / "v.jsonl", batch_size=4)
    verdicts = first.judge_many(LOCAL_CASES + LOCAL_CASES[:2])  # repeats are judged once
    assert first.forwards == 2
    assert _letter_logits._cache_size() == 2  # rows after the shared prefix: 4 in bucket 64, 3 in bucket 128
    other = [JudgeItem(c.question, c.gold, c.answer + " t9") for c in LOCAL_CASES]  # same buckets, new items
    first.judge_many(other)
    assert _letter_logits._cache_size() == 2 and first.forwards == 4
    entries = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert len(entries) == 14 and all(e["reply"] == "AB"[e["verdict"] == 0.0] for e in entries)
    assert all((e["margin"] > 0) == (e["verdict"] == 1.0) for e in entries)

    again = LocalJudge("never/loaded", tmp_path / "v.jsonl")  # a second run: verdicts from the cache
    again.name = first.name
    assert again.judge_with_margins(LOCAL_CASES) == first.judge_with_margins(LOCAL_CASES)
    assert again.judge_many(LOCAL_CASES + LOCAL_CASES[:2]) == verdicts
    assert again.forwards == 0 and again._model is None  # no forward, the model never even loaded


def test_local_judge_default_model_letters_template_and_reference(default_model):
    """SmolLM2 starts its reply after "<|im_start|>assistant\\n" with "A"; " A" is a token too and is
    pooled. The empty system message replaces the template's default system prompt."""
    from mirage_jax.evaluation.judge import LocalJudge, judge_chat_prompt

    tok = default_model.tokenizer
    judge = LocalJudge(default_model)
    items = [JudgeItem("Who wrote Hamlet?", "William Shakespeare", "Shakespeare"),
             JudgeItem("Capital of France?", "Paris",
                       "Lyon, a city in France, is the capital of France and the biggest city")]
    margins = judge.margins(items)
    assert judge.judge_many(items) == [1.0, 0.0]  # margins +0.08 and -0.04: sensible here, rarely so (BUILD_NOTES)
    letters = tuple(tuple(tok.convert_ids_to_tokens(list(ids))) for ids in judge._letters)
    assert letters == (("A", "ĠA"), ("B", "ĠB"))
    prompt = judge_chat_prompt(tok, items[0])
    assert prompt.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nYour job is")
    assert prompt.endswith('with no text around it.<|im_end|>\n<|im_start|>assistant\n')

    import jax.numpy as jnp
    import numpy as np

    from mirage_jax.model.transformer import forward

    (a, a_space), (b, b_space) = judge._letters
    for item, margin in zip(items, margins):
        ids = tok(judge_chat_prompt(tok, item), add_special_tokens=False)["input_ids"]
        logits = np.asarray(forward(default_model.params, default_model.cfg, jnp.asarray([ids])).logits[0, -1],
                            np.float64)
        want = np.logaddexp(logits[a], logits[a_space]) - np.logaddexp(logits[b], logits[b_space])
        assert margin == pytest.approx(want, abs=1e-3)


def test_make_local_judge_and_bad_settings(tmp_path):
    from mirage_jax.evaluation.judge import LocalJudge

    judge = make_judge("local", None, None, tmp_path / "c.jsonl", batch_size=8)
    assert isinstance(judge, LocalJudge) and judge.name == "local:default" and judge.batch_size == 8
    assert make_judge("llm", None, "http://127.0.0.1:9/v1").name == "llm:gpt-4o-mini"
    with pytest.raises(JudgeError, match="judge_base_url"):
        make_judge("local", "default", "http://127.0.0.1:9/v1")
    with pytest.raises(JudgeError) as err:
        make_judge("gpt4")
    assert "local" in str(err.value)
