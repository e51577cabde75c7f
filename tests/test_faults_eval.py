"""Fault injection for evaluation: each test names the defect it catches in the code before this
change (commit c01417a), where it failed.

Classes: transient network faults from the judge; caches keyed by all that decides their content (verdicts by
judge endpoint and checkpoint, generations by checkpoint identity and inputs); sample-exact resume; context
limits; judge models checked before generation.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama, make_toy_tokenizer
from seqcpo.evaluation.generate import generate_continuations, parse_decoding, read_generations
from seqcpo.evaluation.config import JudgeConfig
from seqcpo.evaluation.judges import LocalJudge, OpenAIJudge, check_judge
from seqcpo.evaluation.metrics import gold_perplexity, model_features
from seqcpo.types import Example

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "The quick brown fox jumps",
    "Paris is the capital",
    "Machine learning models are trained on data to",
    "Wikipedia",
    "Instruction: summarise the text.",
    "The capital of France",
    "Volunteers write a free online encyclopedia",
]


def _save(path, make=make_tiny_llama, seed=0):
    tok = make_toy_tokenizer()
    make(seed, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return make_toy_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return [Example(tok(t)["input_ids"], tok(" and more.")["input_ids"], {"id": f"ex{i}", "category": None})
            for i, t in enumerate(TEXTS)]


# ----------------------------------------------------------------------------- judge: transient faults


class _Server:
    """A chat-completions server on 127.0.0.1 that cuts its first reply short (promised 200 bytes, sends 10),
    then answers ``answer``. Counts requests."""

    def __init__(self, answer: str = "A", truncate_first: bool = True):
        self.counts: Counter = Counter()
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    outer.counts["post"] += 1
                    n = outer.counts["post"]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if truncate_first and n == 1:
                    self.send_header("Content-Length", "200")
                    self.end_headers()
                    self.wfile.write(b'{"choices"')
                    self.close_connection = True
                    return
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _api_judge(url, cache):
    return OpenAIJudge(url, "same-model-name", api_key_env="SEQCPO_UNSET_TEST_KEY", cache_dir=cache, max_retries=2,
                       timeout=2.0, backoff_base=0.001, backoff_max=0.01)


def test_incomplete_read_is_retried(tmp_path):
    """Caught: a body cut short raised http.client.IncompleteRead, which the urllib client did not retry: the
    verdict failed ("unexpected IncompleteRead") after one request."""
    server = _Server("A")
    try:
        verdict = _api_judge(server.url, tmp_path).judge("p", "a", "b")
    finally:
        server.close()
    assert (verdict.winner, verdict.error, server.counts["post"]) == ("A", None, 2)


# ----------------------------------------------------------------------------- caches keyed by content


def test_verdict_cache_is_keyed_by_the_judge_server(tmp_path):
    """Caught: the cache key was (model name, template, texts), so a second server serving a model of the same
    name got none of the requests: its 'verdicts' were the first server's."""
    first, second = _Server("A", truncate_first=False), _Server("B", truncate_first=False)
    try:
        assert _api_judge(first.url, tmp_path).judge("p", "a", "b").winner == "A"
        again = _api_judge(first.url, tmp_path).judge("p", "a", "b")
        assert again.cached and again.winner == "A"  # same server: the cache serves it
        other = _api_judge(second.url, tmp_path).judge("p", "a", "b")
    finally:
        first.close()
        second.close()
    assert (other.winner, other.cached, second.counts["post"]) == ("B", False, 1)
    text = (tmp_path / "judge_cache.jsonl").read_text()
    assert first.url.split("//")[1].split("/")[0] in text  # entries say which server made them


def test_local_verdict_cache_is_keyed_by_checkpoint_content(tmp_path):
    """Caught: the local judge keyed verdicts by its model path: another model saved at the same path read the
    first model's verdicts."""
    path = tmp_path / "judge"
    _save(path, seed=0)
    triple = ("The quick brown fox", "jumps over the lazy dog.", "is a free online encyclopedia.")
    first = LocalJudge(str(path), cache_dir=tmp_path / "cache").judge(*triple)
    shutil.rmtree(path)
    _save(path, seed=1)
    second = LocalJudge(str(path), cache_dir=tmp_path / "cache").judge(*triple)
    assert not second.cached and second.raw != first.raw
    assert LocalJudge(str(path), cache_dir=tmp_path / "cache").judge(*triple).cached  # same model: cached


def test_generations_of_another_checkpoint_under_the_same_label_are_not_reused(tmp_path, examples):
    """Caught: rows were keyed by (id, label, decoding) only, so `generate` with checkpoint B into B's label and
    A's --out returned A's generations (and the report named B beside A's metrics)."""
    a, b = _save(tmp_path / "a", seed=0), _save(tmp_path / "b", seed=1)
    cfg = [parse_decoding("greedy", max_new_tokens=5)]
    out = tmp_path / "out" / "generations.jsonl"
    rows_a = generate_continuations(a, examples, cfg, out, batch_size=4, model_label="m", progress=False)
    rows_b = generate_continuations(b, examples, cfg, out, batch_size=4, model_label="m", progress=False)
    fresh_b = generate_continuations(b, examples, cfg, tmp_path / "fresh.jsonl", batch_size=4, model_label="m",
                                     progress=False)
    gens = lambda rows: [r["generation"] for r in rows]  # noqa: E731
    assert gens(rows_b) == gens(fresh_b) and gens(rows_a) != gens(rows_b)
    assert {r["checkpoint"] for r in rows_a}.isdisjoint({r["checkpoint"] for r in rows_b})
    in_file = read_generations(out)
    assert len(in_file) == len(examples) and all(r["checkpoint"] == rows_b[0]["checkpoint"] for r in in_file)
    stale = read_generations(out.with_name("generations.stale.jsonl"))  # A's rows kept aside, not mixed
    assert {r["id"]: r["generation"] for r in stale} == {r["id"]: r["generation"] for r in rows_a}


def test_generations_of_other_inputs_under_the_same_ids_are_not_reused(tmp_path, examples, tok):
    """Caught: example ids are positions in the split, so another split or data file with the same ids reused
    the old rows for different prompts."""
    ckpt = _save(tmp_path / "a")
    cfg = [parse_decoding("greedy", max_new_tokens=5)]
    out = tmp_path / "generations.jsonl"
    generate_continuations(ckpt, examples, cfg, out, batch_size=4, model_label="m", progress=False)
    other = [Example(tok("Something else entirely " + t)["input_ids"], ex.continuation_ids, dict(ex.meta))
             for t, ex in zip(TEXTS, examples)]
    rows = generate_continuations(ckpt, other, cfg, out, batch_size=4, model_label="m", progress=False)
    fresh = generate_continuations(ckpt, other, cfg, tmp_path / "fresh.jsonl", batch_size=4, model_label="m",
                                   progress=False)
    assert [r["generation"] for r in rows] == [r["generation"] for r in fresh]
    assert [r["inputs_sha256"] for r in rows] == [r["inputs_sha256"] for r in fresh]


# ----------------------------------------------------------------------------- sample-exact resume


def test_torn_sampled_batch_resumes_to_the_uninterrupted_rows(tmp_path, examples):
    """Caught: sampling was seeded per batch from the ids in it, so after a torn write inside a batch the
    resumed batch held other ids and every later sample changed."""
    ckpt = _save(tmp_path / "a")
    cfg = [parse_decoding("sample:t=1.0", max_new_tokens=8)]
    whole = generate_continuations(ckpt, examples, cfg, tmp_path / "whole.jsonl", batch_size=3, model_label="m",
                                   progress=False)
    out = tmp_path / "torn.jsonl"
    generate_continuations(ckpt, examples, cfg, out, batch_size=3, model_label="m", progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]) + lines[4][:10])  # one batch of 3, then 1 row and a torn one of the next
    resumed = generate_continuations(ckpt, examples, cfg, out, batch_size=3, model_label="m", progress=False)
    assert [r["generation"] for r in resumed] == [r["generation"] for r in whole]
    assert len(read_generations(out)) == len(examples)
    # and a row does not depend on its batch at all
    single = generate_continuations(ckpt, examples, cfg, tmp_path / "single.jsonl", batch_size=1, model_label="m",
                                    progress=False)
    assert [r["generation"] for r in single] == [r["generation"] for r in whole]
    assert len({r["generation"] for r in whole}) > 1  # really sampled


# ----------------------------------------------------------------------------- context limits


def test_prompt_longer_than_the_context_is_cut_not_a_traceback(tmp_path, tok, caplog):
    """Caught: a prompt past GPT-2's positions raised IndexError in generation, gold perplexity and MAUVE
    model features."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "short"
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=32, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    long_ids = (tok(" ".join(TEXTS))["input_ids"] * 2)[:40]
    exs = [Example(long_ids, tok(" and more.")["input_ids"], {"id": "long"}),
           Example(long_ids[:5], tok(" and more.")["input_ids"], {"id": "short"})]
    rows = generate_continuations(str(path), exs, [parse_decoding("greedy", max_new_tokens=8)], tmp_path / "g.jsonl",
                                  batch_size=2, progress=False)
    assert [r["prompt_tokens_cut"] for r in rows] == [40 - (32 - 8), 0]
    assert "did not fit the context" in caplog.text
    with pytest.raises(ValueError, match="leaves no room"):
        generate_continuations(str(path), exs, [parse_decoding("greedy", max_new_tokens=32)], tmp_path / "h.jsonl",
                               progress=False)
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    ppl = gold_perplexity(model, exs, progress=False)
    assert ppl["cut"] == 1 and ppl["tokens"] == 2 * len(exs[0].continuation_ids)
    feats = model_features(model, tok, [tok.decode(long_ids), "short"], progress=False)
    assert feats.shape == (2, 32)
    assert "1 of 2 text(s) longer than 32 tokens were cut" in caplog.text


# ----------------------------------------------------------------------------- judge checked early


def test_bad_local_judge_model_fails_before_generation(tmp_path, monkeypatch):
    """Caught: `seqcpo eval --judge local --judge-model BAD` generated every row first and only then failed,
    with a traceback."""
    import argparse

    import seqcpo.evaluation.generate as G
    from seqcpo.evaluation import cli

    with pytest.raises(ValueError, match="--judge-model"):
        check_judge(JudgeConfig(backend="local", model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--judge-model"):
        check_judge(JudgeConfig(backend="local", model=str(tmp_path / "empty")))
    check_judge(JudgeConfig(backend="local", model=_save(tmp_path / "good")))  # a real one passes

    def no_generation(*a, **k):
        raise AssertionError("generation started before the judge was checked")

    monkeypatch.setattr(G, "generate_continuations", no_generation)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": "The quick brown fox."}) + "\n"
                            for i in range(6)))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--models", str(tmp_path / "good"), "--dataset", str(data), "--task",
                              "instruction", "--judge", "local", "--judge-model", str(tmp_path / "missing"),
                              "--mauve-features", "none", "--no-ppl", "--out", str(tmp_path / "out"),
                              "--no-progress"])
    with pytest.raises(SystemExit, match="--judge-model"):
        args.func(args)


def test_api_judge_model_not_served_is_refused(tmp_path):
    """A server that lists its models and not the judge's is an error before generation (it was found only
    after generation, as 404s on every request)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "served-model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        check_judge(JudgeConfig(backend="openai", model="served-model", url=url))
        with pytest.raises(ValueError, match="does not serve it"):
            check_judge(JudgeConfig(backend="openai", model="other-model", url=url))
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(ValueError, match="cannot connect"):  # nothing listens on port 9
        check_judge(JudgeConfig(backend="openai", model="any", url="http://127.0.0.1:9/v1"), timeout=0.5)


def test_bad_checkpoint_and_junk_rows_give_one_line_errors_not_tracebacks(tmp_path, examples):
    """Caught: a missing --models folder raised a bare FileNotFoundError from deep in loading, and a generations
    file holding a JSON line that is not a row (``[1, 2]``) raised TypeError on resume."""
    from seqcpo.evaluation.checkpoints import CheckpointError, load_checkpoint

    cfg = [parse_decoding("greedy", max_new_tokens=4)]
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        generate_continuations(str(tmp_path / "missing"), examples, cfg, tmp_path / "g.jsonl", progress=False)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(str(tmp_path / "missing"))
    ckpt = _save(tmp_path / "a")
    out = tmp_path / "g.jsonl"
    out.write_text('[1, 2]\n"text"\n{"id": "x"}\n')
    rows = generate_continuations(ckpt, examples[:2], cfg, out, batch_size=2, model_label="m", progress=False)
    assert len(rows) == 2 and len(read_generations(out)) == 2


def test_non_finite_decoding_and_judge_settings_are_refused(tmp_path):
    """Caught: ``sample:t=nan`` and ``t=inf`` were accepted (every sampled token then came from NaN
    probabilities), ``n=1.5`` gave a bare int() message, and a NaN judge temperature was sent as invalid JSON."""
    for bad, match in [("sample:t=nan", "temperature must be a finite"), ("sample:t=inf", "temperature must be a finite"),
                       ("beam:n=1.5", "n='1.5'.*integer"), ("sample:t=x", "t='x'.*number")]:
        with pytest.raises(ValueError, match=match):
            parse_decoding(bad)
    with pytest.raises(ValueError, match="temperature"):
        OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="SEQCPO_UNSET_TEST_KEY", cache_dir=tmp_path,
                    temperature=float("nan"))
    with pytest.raises(ValueError, match="time-out"):
        OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="SEQCPO_UNSET_TEST_KEY", cache_dir=tmp_path, timeout=0)
