"""`accelerate launch` with 2 CPU processes (gloo DDP) gives the first-step loss of 1 process on the same
global batch, through the CLI with fixed negatives. (The step divides by the tokens and examples of all
processes, so this holds for any lengths: tests/test_split_invariance.py checks unequal ones and online
negatives.)"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_llama, make_toy_tokenizer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, env):
    # a new process group, so that a hang kills the launcher's workers too, not only the launcher
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=int(os.environ.get("SEQCPO_DDP_TEST_TIMEOUT", "600")))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out (a hang between processes?): {cmd}\n{out[-2000:]}{err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return proc


def test_two_process_ddp_matches_one_process(tmp_path):
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = "the river market bridge city wool salt square bread books fog".split()
    (tmp_path / "docs.txt").write_text(
        "".join(" ".join(words[(i * j + j) % len(words)] for j in range(30)) + ".\n\n" for i in range(40))
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ndataset: {tmp_path / 'docs.txt'}\ntask: continuation\n"
        "prefix_tokens: 8\ncontinuation_tokens: 8\nvalidation_size: 2\ntest_size: 2\nobjective: cpo\n"
        "num_negatives: 2\nnegatives: tn:1,mn:1\nmax_steps: 1\nlogging_steps: 1\nsave_strategy: 'no'\n"
        "report_to: none\nlearning_rate: 1.0e-3\nseed: 0\nuse_cpu: true\ndisable_tqdm: true\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cli = [sys.executable, "-m", "seqcpo.cli"]
    _run(cli + ["negatives", "--config", str(cfg), "--out", str(tmp_path / "neg"),
                "--per_device_train_batch_size", "2"], env)
    common = ["train", "--config", str(cfg), "--negatives_path", str(tmp_path / "neg")]
    _run(cli + common + ["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")], env)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
         "-m", "seqcpo.cli"] + common + ["--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")],
        env,
    )

    def first(run):
        info = json.load(open(tmp_path / run / "run_info.json"))
        hist = json.load(open(tmp_path / run / "log_history.json"))
        return info, next(h for h in hist if "loss" in h)

    info1, h1 = first("one")
    info2, h2 = first("two")
    assert info1["world_size"] == 1 and info2["world_size"] == 2
    assert "MULTI_CPU" in info2["distributed_type"]
    for key in ("loss", "loss/mle", "loss/cpo", "logps/chosen", "grad_norm"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-4), key

    # MN drawn from the policy's own gold pass: two forwards of the DDP-wrapped model before one backward
    _run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
         "-m", "seqcpo.cli", "train", "--config", str(cfg), "--negatives", "mn", "--negatives_model", "policy",
         "--max_steps", "2", "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "policy_mn")],
        env,
    )
    hist = [h for h in json.load(open(tmp_path / "policy_mn" / "log_history.json")) if "loss" in h]
    assert len(hist) == 2 and all(h["grad_norm"] > 0 and h["loss"] == h["loss"] for h in hist)


@pytest.mark.integration
def test_two_processes_agree_on_the_auto_layout(tmp_path):
    """`logps_layout: auto` decides per batch; two processes whose batches call for different layouts (two-pass
    for one, one pass for the other) used to wait on each other forever (a DDP forward is a collective)."""
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"id": str(i), "instruction": f"Describe {i}.", "response": f"It is {i} and {i + 1}."}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
         "-m", "seqcpo.cli", "train", "--model_name_or_path", str(tmp_path / "model"),
         "--dataset", str(tmp_path / "data.jsonl"), "--task", "instruction", "--prompt_template", "plain",
         "--validation_size", "2", "--test_size", "2", "--per_device_train_batch_size", "2",
         "--negatives", "tn:1,bn:1", "--num_negatives", "2", "--logps_layout", "auto", "--save_strategy", "no",
         "--max_steps", "4", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
         "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out")],
        env,
    )
    hist = [h for h in json.load(open(tmp_path / "out" / "log_history.json")) if "loss" in h]
    assert len(hist) == 4 and all(h["loss"] == h["loss"] for h in hist)


def _same_step(got, ref, where):
    rel = float((got["update"] - ref["update"]).norm() / ref["update"].norm())
    assert rel < 1e-5, f"{where}: parameter update differs by {rel:.2e} (relative norm)"
    for key in ("loss", "loss/mle", "loss/cpo", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert got["log"][key] == pytest.approx(ref["log"][key], rel=1e-4, abs=1e-6), f"{where}: {key}"
    assert got["negatives"].keys() <= ref["negatives"].keys()
    assert all(got["negatives"][a] == ref["negatives"][a] for a in got["negatives"]), where


def test_two_process_ddp_on_document_rows_matches_one_process(tmp_path):
    """Document rows, CPO at anchors: one SGD step of 2 processes x 1 row equals 1 process x 2 rows and 1 process x
    1 row x accumulation 2 with TN + MN negatives, and 1 process x 1 x accumulation 2 with TN + BN (BN draws from
    the micro-batch's other anchors, so it depends on the micro-batches by design): the same parameter update
    (within 1e-5 relative, as the windows' split test), the same logged losses, the same negatives at every
    anchor. The rows have 39 and 5 predicted tokens and 3 and 2 anchors, so a process that divided by its own
    tokens or anchors would move the update by far more (190% when the counts are not pooled)."""
    from split_step import DOCUMENT, DOCUMENT_BN, document_examples, one_step

    model_dir = str(tmp_path / "model")
    make_tiny_llama().save_pretrained(model_dir)
    step = lambda name, b, a, over: one_step(model_dir, str(tmp_path / "one" / name), "cpo", batch=b,  # noqa: E731
                                              accumulation=a, examples=document_examples(), **over)
    one, acc, acc_bn = step("2x1", 2, 1, DOCUMENT), step("1x2", 1, 2, DOCUMENT), step("bn", 1, 2, DOCUMENT_BN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
          os.path.join(ROOT, "tests", "split_step.py"), model_dir, str(tmp_path), "documents"], env)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(one["negatives"]) == len(acc_bn["negatives"]) == 5  # 3 + 2 anchors, each with its negatives
    assert one["update"].norm() > 1e-3 and acc_bn["update"].norm() > 1e-3
    _same_step(acc, one, "1 process x 1 x accumulation 2")
    for r, rank in enumerate(ranks):
        _same_step(rank["results"]["documents"], one, f"2 processes x 1 (rank {r})")
        _same_step(rank["results"]["documents_bn"], acc_bn, f"2 processes x 1 with BN (rank {r})")
    for name, ref in (("documents", one), ("documents_bn", acc_bn)):  # each process made its own row's anchors'
        negs = [rank["results"][name]["negatives"] for rank in ranks]
        assert sorted(len(n) for n in negs) == [2, 3] and {**negs[0], **negs[1]} == ref["negatives"], name
