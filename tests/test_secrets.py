"""No token or key reaches a file a training run writes.

A tiny run gets canary secrets on the command line (``--hub_token``) and in the environment (HF_TOKEN and
``*_API_KEY``), logs to TensorBoard and saves a checkpoint every step; then every file under ``output_dir`` is
searched for the canaries: raw bytes, gzip members, zip members (``torch.save`` archives) and unpickled objects.
Before ``SeqCPOConfig.__getstate__``, ``training_args.bin`` of every checkpoint held ``--hub_token`` in plain text.
"""

import gzip
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama

CANARIES = {
    "hub_token": "CANARYhubtoken7f3a9c",
    "HF_TOKEN": "CANARYhfenv51d2e8",
    "OPENAI_API_KEY": "CANARYopenai0b4c6d",
    "SEQCPO_JUDGE_API_KEY": "CANARYjudge93e1f0",
}


def _payloads(data: bytes, depth: int = 0):
    """The bytes of a file and of everything packed inside it (gzip, zip archives)."""
    yield data
    if depth > 3:
        return
    if data[:2] == b"\x1f\x8b":
        try:
            yield from _payloads(gzip.decompress(data), depth + 1)
        except (OSError, EOFError):
            pass
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                yield from _payloads(zf.read(name), depth + 1)


def _leaks(root) -> list[str]:
    found = []
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        for blob in _payloads(path.read_bytes()):
            for name, canary in CANARIES.items():
                for form in (canary.encode(), canary.encode("utf-16-le")):
                    if form in blob:
                        found.append(f"{path.relative_to(root)}: {name}")
    return found


@pytest.fixture
def tiny_run_args(tmp_path):
    save_tiny_llama(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        json.dumps({"id": f"r{i}", "instruction": f"Name {i}.", "context": "", "response": f"It is {i}."}) + "\n"
        for i in range(12)
    ))
    return dict(
        model_name_or_path=str(tmp_path / "m"), dataset=str(data), task="instruction", prompt_template="plain",
        validation_size=0, test_size=0, output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=1, report_to="tensorboard",
        objective="cpo", num_negatives=2, negatives="tn:1,bn:1", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def test_no_canary_secret_in_any_file_or_log_of_a_training_run(tiny_run_args, tmp_path, monkeypatch, capsys, caplog):
    from seqcpo.cli import main

    for name, value in CANARIES.items():
        if name.isupper():
            monkeypatch.setenv(name, value)
    argv = ["train", "--hub_token", CANARIES["hub_token"]]
    for k, v in tiny_run_args.items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 0
    run = tmp_path / "run"
    written = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    # the files the search must cover are really there
    assert {"checkpoint-1/training_args.bin", "final/training_args.bin", "seqcpo_config.yaml", "run_info.json",
            "log_history.json", "final/README.md"} <= written, written
    assert any("events.out.tfevents" in f for f in written), written
    assert _leaks(run) == []
    out = capsys.readouterr()
    logged = out.out + out.err + caplog.text
    assert not [n for n, c in CANARIES.items() if c in logged]
    # the saved arguments still load, without the token
    args = torch.load(run / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.learning_rate == 1e-3


def test_config_copies_and_pickles_drop_secrets_but_the_live_config_keeps_them(tiny_run_args):
    import copy

    from seqcpo.training.config import load_config

    cfg = load_config(None, dict(tiny_run_args, hub_token=CANARIES["hub_token"], report_to="none"))
    assert cfg.hub_token == CANARIES["hub_token"]  # the process itself can still push to the Hub
    blob = pickle.dumps(cfg)
    assert CANARIES["hub_token"].encode() not in blob
    assert pickle.loads(blob).hub_token is None
    assert copy.deepcopy(cfg).hub_token is None
    assert CANARIES["hub_token"] not in (repr(cfg) + json.dumps(cfg.to_public_dict()) + cfg.to_json_string())


# ----------------------------------------------------------------------------- evaluation: judge URLs and reports

EVAL_CANARIES = {"key": "CANARYevalkey4d1e9a", "query": "CANARYqueryb83f20", "password": "CANARYurlpw6c0d17",
                 "hub_token": "CANARYgridhub2a7e55"}


def _eval_leaks(root, text: str = "") -> list[str]:
    found = [f"text: {n}" for n, c in EVAL_CANARIES.items() if c in text]
    for path in (p for p in root.rglob("*") if p.is_file()) if root.name else ():
        data = path.read_bytes()
        found += [f"{path.name}: {n}" for n, c in EVAL_CANARIES.items() if c.encode() in data]
    return found


def test_judge_request_urls_keep_the_query_after_the_path():
    """Defect: with ``http://user:pw@host/v1?api_key=K`` the pre-flight request went to ``...?api_key=K/models``
    (``/models`` after the query string), and ``user:pw@`` replaced the Bearer key, which was never sent."""
    from seqcpo.evaluation.judges.http import judge_urls

    u = judge_urls(f"http://judge:{EVAL_CANARIES['password']}@h:8000/v1/?api_key=K&x=1", has_key=False)
    assert u.models == "http://h:8000/v1/models?api_key=K&x=1" and u.chat == "http://h:8000/v1/chat/completions?api_key=K&x=1"
    assert u.auth == ("judge", EVAL_CANARIES["password"]) and u.endpoint_id == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError) as e:  # both want the Authorization header: refused, and nothing echoed
        judge_urls(f"http://judge:{EVAL_CANARIES['password']}@h/v1?api_key={EVAL_CANARIES['query']}", has_key=True)
    assert "Authorization" in str(e.value) and _eval_leaks(Path(), str(e.value)) == []


def _judge_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: dict):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("Authorization", "")))
            self._send({"object": "list", "data": [{"id": "judge-m"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(("POST", self.path, self.headers.get("Authorization", "")))
            self._send({"choices": [{"message": {"content": "A"}}]})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, seen


def test_no_canary_from_a_judge_url_reaches_a_file_or_log_of_an_eval(tmp_path, monkeypatch, capsys, caplog):
    """Defect: credentials in the judge URL (``user:pw@``, ``?api_key=``) were printed by httpx's INFO line of
    the pre-flight request. Now every request keeps its query after the path, the key goes as Bearer, ``user:pw@``
    as basic auth (no key set) or is refused (a key set), and no canary is in any file, log line or console."""
    import base64
    import logging

    from seqcpo.cli import main

    save_tiny_llama(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": "It is."}) + "\n" for i in range(8)))
    httpd, seen = _judge_server()
    port = httpd.server_address[1]
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore"):  # the loudest setting a user may choose
        monkeypatch.setattr(logging.getLogger(name), "level", logging.DEBUG)
    monkeypatch.setenv("SEQCPO_JUDGE_KEY", EVAL_CANARIES["key"])
    base = ["eval", "--models", str(tmp_path / "m"), "--dataset", str(data), "--task", "instruction",
            "--prompt-template", "plain", "--validation-size", "1", "--test-size", "2", "--max-new-tokens", "2",
            "--mauve-features", "none", "--no-ppl", "--no-progress", "--judge", "openai", "--judge-model", "judge-m"]
    try:
        url = f"http://127.0.0.1:{port}/v1?api_key={EVAL_CANARIES['query']}"
        assert main([*base, "--judge-url", url, "--judge-api-key-env", "SEQCPO_JUDGE_KEY", "--out", str(tmp_path / "o1")]) == 0
        q = f"?api_key={EVAL_CANARIES['query']}"
        assert ("GET", "/v1/models" + q, f"Bearer {EVAL_CANARIES['key']}") in seen
        assert ("POST", "/v1/chat/completions" + q, f"Bearer {EVAL_CANARIES['key']}") in seen
        seen.clear()
        url = f"http://judge:{EVAL_CANARIES['password']}@127.0.0.1:{port}/v1"
        assert main([*base, "--judge-url", url, "--judge-api-key-env", "SEQCPO_UNSET_KEY", "--judge-cache",
                     str(tmp_path / "c2"), "--out", str(tmp_path / "o2")]) == 0
        basic = "Basic " + base64.b64encode(f"judge:{EVAL_CANARIES['password']}".encode()).decode()
        assert seen and all(auth == basic for _, _, auth in seen)
        assert main([*base, "--judge-url", url, "--judge-api-key-env", "SEQCPO_JUDGE_KEY", "--out", str(tmp_path / "o3")]) == 2
    finally:
        httpd.shutdown()
        httpd.server_close()
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("seqcpo: error")]
    assert len(errors) == 1 and "--judge-url" in errors[0] and "Authorization header" in errors[0]
    assert _eval_leaks(tmp_path / "o1", out.out + out.err + caplog.text) == []
    assert _eval_leaks(tmp_path / "o2") == [] and _eval_leaks(tmp_path / "c2") == []


def test_report_writer_redacts_every_secret_field(tmp_path, monkeypatch):
    """Defect: a grid whose ``base:`` set ``hub_token`` wrote it in plain text into ``results.json``; the report
    writer now redacts secret fields, URL credentials and secret environment values wherever they sit."""
    from seqcpo.evaluation.report import write_report

    monkeypatch.setenv("SEQCPO_SOME_API_KEY", EVAL_CANARIES["key"])
    results = {"grid": {"file": "g.yaml", "out_dir": str(tmp_path), "eval": {"decoding": ["greedy"]},
                        "base": {"hub_token": EVAL_CANARIES["hub_token"], "beta": 0.1}},
               "judge": {"backend": "openai", "model": "m", "host": "h", "prompt_sha256": "0" * 64,
                         "url": f"http://u:{EVAL_CANARIES['password']}@h/v1?token={EVAL_CANARIES['query']}"},
               "note": f"echoed {EVAL_CANARIES['key']}", "runs": [],
               "judgments": [{"raw": f"Bearer {EVAL_CANARIES['key']}"}]}
    written = write_report(results, tmp_path / "r")
    assert _eval_leaks(tmp_path / "r") == []
    assert written["grid"]["base"] == {"hub_token": None, "beta": 0.1}  # the rest is kept
    assert written["judge"]["url"] == "http://***@h/v1?token=***"


@pytest.mark.parametrize("name", ["key", "api_key", "apikey", "subscription-key", "code", "auth", "access_token",
                                  "sig", "session", "pwd"])
def test_every_query_parameter_that_may_carry_a_credential_is_hidden(name):
    """Defect (campaign 3): a judge URL's ``?key=`` (Gemini), ``?code=`` (Azure Functions) or ``?auth=`` was written
    into the grid's results.json as it was: only names with api_key/token/secret/password/sig were hidden."""
    from seqcpo.io import redact_text

    url = f"https://judge.example/v1beta/models/m:generate?api-version=2024-06-01&{name}=CANARY-VALUE-1234#frag"
    assert redact_text(url, secrets=()) == f"https://judge.example/v1beta/models/m:generate?api-version=2024-06-01&{name}=***#frag"


def test_no_canary_from_a_grid_base_reaches_its_results(tiny_run_args, tmp_path, monkeypatch, capsys, caplog):
    """Defect: a grid whose ``base:`` set ``hub_token`` wrote it in plain text into ``results.json`` (the grid's
    record of its arms' fields). Every file a grid writes, and its console, are searched for the canary."""
    import yaml

    from seqcpo.grid import run_grid

    monkeypatch.setenv("HF_TOKEN", CANARIES["HF_TOKEN"])
    base = {k: v for k, v in tiny_run_args.items() if k not in ("output_dir", "report_to", "save_strategy",
                                                                "save_steps")}
    base.update(validation_size=0, test_size=4, save_strategy="no", report_to="none", max_steps=1,
                hub_token=CANARIES["hub_token"])
    grid = {"name": "canary", "out_dir": str(tmp_path / "grid"), "base": base,
            "arms": {"base": {"train": False}, "mle": {"objective": "mle"}},
            "eval": {"num_examples": 4, "decoding": ["greedy"], "max_new_tokens": 4, "batch_size": 4,
                     "judge": {"backend": "none"}, "mauve": "none", "baseline": "mle"}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    run_grid(str(path))
    assert (tmp_path / "grid" / "results.json").is_file()
    assert _leaks(tmp_path / "grid") == []
    out = capsys.readouterr()
    assert not any(c in out.out + out.err + caplog.text for c in CANARIES.values())
