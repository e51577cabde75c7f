"""OpenAIJudge against a real chat-completions server on 127.0.0.1 (started here, port 0).

The server reads a ``marker=NAME`` tag in the prompt and, per marker, answers with a script:
429 (Retry-After: 0) then success, 500s then success, a sleep past the client time-out, bad JSON,
no choices, an unparseable answer, or a 401 that echoes the key. It counts requests per marker.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from seqcpo.evaluation.judges import OpenAIJudge
from seqcpo.evaluation.judges.http import retry_after_seconds as _retry_after_seconds
from seqcpo.evaluation.winrate import summarize, win_rate_vs_gold

KEY = "sk-test-Zq8VvXz1-5eqcpo-distinctive-key"
KEY_ENV = "SEQCPO_TEST_JUDGE_KEY"
CLIENT_TIMEOUT = 0.8
SLOW_SLEEP = 1.5


def _chat(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.auth: list[str] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0


def _make_handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            text = body["messages"][0]["content"]
            found = re.search(r"marker=(\w+)", text)
            marker = found.group(1) if found else "plain"
            with state.lock:
                state.counts[marker] += 1
                n = state.counts[marker]
                state.auth.append(self.headers.get("Authorization", ""))
                state.bodies.append(body)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._answer(marker, n, text)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (time-out test)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _answer(self, marker: str, n: int, text: str):
            a_text = text.split("[Continuation A]")[1].split("[Continuation B]")[0]
            if marker in ("okA", "plain"):
                return self._send(200, _chat("A"))
            if marker == "okTie":
                return self._send(200, _chat("C"))
            if marker == "okTagged":
                return self._send(200, _chat("Both are fine but the second is clearer. Answer: B"))
            if marker == "good":  # prefers the continuation that contains GOOD
                time.sleep(0.02)
                return self._send(200, _chat("A" if "GOOD" in a_text else "B"))
            if marker == "r429":
                if n == 1:
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
                return self._send(200, _chat("A"))
            if marker == "r500":
                if n <= 2:
                    return self._send(500, b"oops")
                return self._send(200, _chat("B"))
            if marker == "slow":
                if n == 1:
                    time.sleep(SLOW_SLEEP)
                return self._send(200, _chat("A"))
            if marker == "badjson":
                if n == 1:
                    return self._send(200, b"{not json")
                return self._send(200, _chat("B"))
            if marker == "nochoices":
                return self._send(200, json.dumps({"choices": []}).encode())
            if marker == "unparseable":
                return self._send(200, _chat("I cannot decide between them."))
            if marker == "always500":
                return self._send(503, b"down")
            if marker == "truncated":  # promises 200 bytes, sends 10 and hangs up: IncompleteRead / RemoteProtocolError
                if n == 1:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "200")
                    self.end_headers()
                    self.wfile.write(b'{"choices"')
                    self.close_connection = True
                    return None
                return self._send(200, _chat("A"))
            if marker == "reset":  # the connection is reset (RST) before any reply
                if n == 1:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return None
                return self._send(200, _chat("B"))
            if marker == "unauthorized":  # some APIs echo part of the key; it must not leak
                return self._send(401, json.dumps({"error": f"Incorrect API key provided: {KEY}"}).encode())
            raise AssertionError(marker)

    return Handler


@pytest.fixture
def server():
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()


def _judge(url, cache_dir, **kw):
    return OpenAIJudge(url, "judge-test-model", api_key_env=KEY_ENV, cache_dir=cache_dir, max_concurrency=4,
                       max_retries=3, max_malformed=2, timeout=CLIENT_TIMEOUT, backoff_base=0.001, backoff_max=0.01, **kw)


def _triple(marker: str) -> tuple[str, str, str]:
    return (f"Some prompt marker={marker}", f"first continuation of {marker}", f"second continuation of {marker}")


MARKERS_OK = ["okA", "okTie", "okTagged", "r429", "r500", "slow", "badjson"]
MARKERS_FAIL = ["nochoices", "unparseable", "always500", "unauthorized"]


def test_openai_judge_retries_failures_cache_and_key(server, tmp_path, monkeypatch, caplog, capfd):
    url, state = server
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    judge = _judge(url, cache)
    triples = [_triple(m) for m in MARKERS_OK + MARKERS_FAIL]
    verdicts = dict(zip(MARKERS_OK + MARKERS_FAIL, judge.judge_many(triples, progress=False)))

    # verdicts parsed, through every recoverable fault
    assert {m: v.winner for m, v in verdicts.items() if m in MARKERS_OK} == {
        "okA": "A", "okTie": "tie", "okTagged": "B", "r429": "A", "r500": "B", "slow": "A", "badjson": "B"}
    # failures are failures (winner None, with a reason), not losses
    for m in MARKERS_FAIL:
        assert verdicts[m].winner is None and verdicts[m].error, m
    assert "malformed" in verdicts["nochoices"].error and "malformed" in verdicts["unparseable"].error
    assert "503" in verdicts["always500"].error and "401" in verdicts["unauthorized"].error

    # retries made, counted server-side: max_retries=3, max_malformed=2
    assert dict(state.counts) == {
        "okA": 1, "okTie": 1, "okTagged": 1,
        "r429": 2,          # 429 then success
        "r500": 3,          # two 500s then success
        "slow": 2,          # time-out then success
        "badjson": 2,       # bad JSON then success
        "nochoices": 3,     # 1 + max_malformed
        "unparseable": 3,   # 1 + max_malformed
        "always500": 4,     # 1 + max_retries
        "unauthorized": 1,  # 4xx other than 408/429: not retried
    }
    assert state.max_in_flight <= 4
    assert judge.stats["requests"] == sum(state.counts.values())
    assert judge.stats["failures"] == len(MARKERS_FAIL)
    # failed comparisons are said as a warning (campaign 3: every request failing was INFO lines only)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "comparisons failed" in r.getMessage()]
    assert len(said) == 1 and f"{len(MARKERS_FAIL)} of {len(MARKERS_OK + MARKERS_FAIL)} comparisons failed" in said[0]

    # the key reached the server, in the Authorization header of every request
    assert state.auth and all(a == f"Bearer {KEY}" for a in state.auth)
    assert all(b["model"] == "judge-test-model" and b["temperature"] == 0.0 for b in state.bodies)

    # a second run (new judge object, same cache folder) pays for nothing it already has
    before = sum(state.counts.values())
    judge2 = _judge(url, cache)
    again = judge2.judge_many([_triple(m) for m in MARKERS_OK], progress=False)
    assert [v.winner for v in again] == [verdicts[m].winner for m in MARKERS_OK]
    assert all(v.cached for v in again)
    assert sum(state.counts.values()) == before, "cached verdicts must not be requested again"
    # failures are not cached: a rerun retries them
    judge2.judge(*_triple("unauthorized"))
    assert state.counts["unauthorized"] == 2

    # the key is nowhere: files, captured logs, stdout/stderr, verdict texts, repr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in caplog.text
    out, err = capfd.readouterr()
    assert KEY not in out and KEY not in err
    for v in verdicts.values():
        assert KEY not in (v.raw or "") and KEY not in (v.error or "")
    assert KEY not in repr(judge) and KEY not in json.dumps(judge.describe())
    assert any("retry" in r.getMessage() for r in caplog.records)  # retries are logged (without the key)


def test_win_rate_counts_failures_apart_from_losses(server, tmp_path, monkeypatch):
    url, state = server
    monkeypatch.setenv(KEY_ENV, KEY)
    judge = _judge(url, tmp_path / "cache")
    rows = [
        {"id": "1", "model": "m", "decoding": "greedy", "category": "qa", "prompt": "p1 marker=good",
         "generation": "a GOOD answer", "reference": "the gold"},
        {"id": "2", "model": "m", "decoding": "greedy", "category": "qa", "prompt": "p2 marker=good",
         "generation": "a weak answer", "reference": "the GOOD gold"},
        {"id": "3", "model": "m", "decoding": "greedy", "category": "qa", "prompt": "p3 marker=unparseable",
         "generation": "whatever", "reference": "gold"},
    ]
    items = win_rate_vs_gold(judge, rows, order="both", progress=False)
    assert [i.outcome for i in items] == ["win", "loss", None]
    assert items[0].positions == ["A", "B"] and items[0].verdicts == ["A", "B"]
    wr = summarize(items)
    assert (wr.wins, wr.losses, wr.ties, wr.failed, wr.n, wr.rate) == (1, 1, 0, 1, 2, 0.5)


def test_no_key_means_no_authorization_header(server, tmp_path, monkeypatch):
    url, state = server
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = _judge(url, tmp_path / "cache")
    assert judge.judge(*_triple("okA")).winner == "A"
    assert state.auth == [""]


def test_truncated_body_and_reset_connection_are_retried(server, tmp_path, monkeypatch):
    """A reply cut short mid-body (the urllib client raised IncompleteRead and gave up) and a reset connection
    are transient: retried like a 5xx, then answered."""
    url, state = server
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = _judge(url, tmp_path / "cache")
    verdicts = judge.judge_many([_triple("truncated"), _triple("reset")], progress=False)
    assert [v.winner for v in verdicts] == ["A", "B"]
    assert state.counts["truncated"] == 2 and state.counts["reset"] == 2
    assert judge.stats["retries"] == 2 and judge.stats["failures"] == 0


def test_retry_after_parsing():
    assert _retry_after_seconds("0") == 0.0
    assert _retry_after_seconds("2.5") == 2.5
    assert _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert _retry_after_seconds(None) is None and _retry_after_seconds("soon") is None


def test_url_is_normalised_and_userinfo_not_reported(tmp_path):
    j = OpenAIJudge("https://user:pw@api.example.com/v1/", "m", api_key_env="SEQCPO_UNSET_ENV_X", cache_dir=tmp_path)
    assert j.urls.chat == "https://api.example.com/v1/chat/completions" and j.urls.auth == ("user", "pw")
    assert "pw" not in repr(j) and "pw" not in json.dumps(j.cache_identity())
    assert j.describe()["host"] == "api.example.com"
    with pytest.raises(ValueError):
        OpenAIJudge("ftp://x", "m", cache_dir=tmp_path)


def test_eval_cli_with_openai_judge_leaks_no_key(server, tmp_path, monkeypatch, caplog, capfd):
    """``seqcpo eval --judge openai`` end to end against the local server: the key is sent, and found in
    no file under --out, no log line and no console output."""
    import argparse

    import torch

    from conftest import make_tiny_llama, make_toy_tokenizer
    from seqcpo.evaluation import cli

    url, state = server
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU
    ckpt = tmp_path / "ckpt"
    tok = make_toy_tokenizer()
    make_tiny_llama(0, vocab_size=len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": "The quick brown fox.",
                                        "category": "qa"}) + "\n" for i in range(10)))
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "eval", "--models", str(ckpt), "--dataset", str(data), "--task", "instruction", "--test-size", "3",
        "--validation-size", "1", "--max-new-tokens", "4", "--judge", "openai", "--judge-url", url,
        "--judge-model", "judge-test-model", "--judge-api-key-env", KEY_ENV, "--mauve-features", "none",
        "--no-ppl", "--out", str(out), "--no-progress"])
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    wr = results["runs"][0]["win_rate_vs_gold"]
    assert (wr["ties"], wr["n"], wr["failed"]) == (3, 3, 0)  # the server always says "A": position bias -> ties
    assert results["judge"]["host"] == url.split("/")[2] and state.counts["plain"] == 6
    assert all(a == f"Bearer {KEY}" for a in state.auth)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"results.json", "report.md", "judgments.jsonl", "generations.jsonl",
                                       "judge_cache.jsonl", "winrate.png"}
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in caplog.text
    console = capfd.readouterr()
    assert KEY not in console.out and KEY not in console.err
