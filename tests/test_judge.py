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
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            with server.lock:
                server.in_flight -= 1


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
    return re.search(r"Predicted answer: (.*)", body["messages"][0]["content"]).group(1)


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
    (message,) = body["messages"]
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
