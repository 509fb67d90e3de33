"""`--rm-url`: rewards from a real HTTP server on 127.0.0.1 started by the test (rewards/remote.py)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vime_spmd.batch import Sample
from vime_spmd.config import check_config, parse_config
from vime_spmd.rewards import score_batch
from vime_spmd.rewards.remote import parse_reply
from vime_spmd.rollout.generate import Scorer

SLOW_S = 3.0


class Judge(BaseHTTPRequestHandler):
    """Replies by the response text: "number", "dict", "flaky" (503 on its first request), "slow" (past the
    deadline), "words" (not a number), "error" (always 500), "sleepy" (0.3 s, then 1)."""

    seen: list[dict] = []
    flaky_hits = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append(payload)
        kind = payload["response"]
        if kind == "flaky":
            Judge.flaky_hits += 1
            if Judge.flaky_hits == 1:
                return self.reply(503, b"busy")
        if kind == "slow":
            time.sleep(SLOW_S)
        if kind == "sleepy":
            time.sleep(0.3)
        body = {"number": b"1.5", "dict": b'{"reward": 0.5}', "flaky": b"2", "slow": b"1", "words": b'"great"',
                "sleepy": b"1"}.get(kind)
        self.reply(500, b"boom") if body is None else self.reply(200, body)

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default backlog of 5 delays the rest of a burst by a SYN retry (1 s)

    def handle_error(self, request, client_address) -> None:
        pass  # the slow reply's client is gone by then: a broken pipe, expected


@pytest.fixture
def judge_url():
    server = Server(("127.0.0.1", 0), Judge)
    server.daemon_threads = True
    Judge.seen, Judge.flaky_hits = [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def test_numbers_objects_retries_timeouts_and_errors(judge_url):
    kinds = ["number", "dict", "flaky", "slow", "words", "error"]
    start = time.monotonic()
    rewards, failures = score_batch(kinds, ["L"] * 6, "remote", metadata=[{"i": i} for i in range(6)], timeout_s=1.0,
                                    url=judge_url, prompts=[f"P{i}" for i in range(6)])
    assert rewards == [1.5, 0.5, 2.0, 0.0, 0.0, 0.0]
    assert failures == 3  # slow (past 1 s), words (not a number), error (500 on every retry)
    assert time.monotonic() - start < SLOW_S  # the slow one was given up at its deadline
    first = next(p for p in Judge.seen if p["response"] == "number")
    assert first == {"prompt": "P0", "response": "number", "label": "L", "metadata": {"i": 0}}
    assert sum(p["response"] == "flaky" for p in Judge.seen) == 2  # a 503, then the retry that scored
    assert sum(p["response"] == "error" for p in Judge.seen) >= 2  # retried until the deadline or the last attempt


def test_requests_are_in_flight_together(judge_url):
    start = time.monotonic()
    rewards, failures = score_batch(["sleepy"] * 8, ["L"] * 8, "remote", timeout_s=5.0, url=judge_url)
    assert (rewards, failures) == ([1.0] * 8, 0)
    assert time.monotonic() - start < 8 * 0.3 / 2  # one after another would take 2.4 s


def test_a_refused_connection_is_a_failure_not_an_error():
    rewards, failures = score_batch(["x"], ["L"], "remote", timeout_s=0.5, url="http://127.0.0.1:9/none")
    assert (rewards, failures) == ([0.0], 1)


def test_the_scorer_sends_the_decoded_prompt(judge_url):
    class Tokenizer:
        def decode(self, ids):
            return " ".join(map(str, ids))

    cfg = parse_config(["--hf-checkpoint", "m", "--prompt-data", "p", "--rm-url", judge_url])
    assert cfg.data.rm_type == "remote"
    samples = [Sample([1, 2], [3], [0.0], label="L", response_text="dict", metadata={"k": 1})]
    assert Scorer.of(cfg.data, Tokenizer()).score(samples) == 0
    assert samples[0].raw_reward == 0.5 and Judge.seen[0]["prompt"] == "1 2"


def test_reply_bodies():
    assert parse_reply(b"3") == 3.0 and parse_reply(b'{"reward": -1}') == -1.0
    for body in (b"true", b'{"score": 1}', b"[1]", b"nope"):
        with pytest.raises(ValueError):
            parse_reply(body)


@pytest.mark.parametrize("flags,expected", [
    (["--rm-url", "http://x", "--rm-type", "math"], "--rm-type math and --rm-url both name a reward"),
    (["--rm-url", "ftp://x"], "must start with http:// or https://"),
    (["--rm-type", "remote"], "--rm-type remote needs --rm-url"),
])
def test_flags(flags, expected):
    with pytest.raises(ValueError, match=expected):
        check_config(parse_config(["--hf-checkpoint", "m", "--prompt-data", "p", *flags]), 1)
