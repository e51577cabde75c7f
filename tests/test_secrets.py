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

import pytest
import torch

from conftest import make_tiny_llama, make_toy_tokenizer

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
    tok = make_toy_tokenizer()
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
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
