"""Fault injection on ``seqcpo ensemble`` and the command line (the second fault campaign).

Each test names the defect it guards against; each failed on the code before the fix: two tokenizers mixed
silently, a SIGTERM'd ensemble's temp folder left forever (and 0700 outputs), safetensors' traceback for a cut-short
weights file, a Ctrl-C traceback, and ``--alphas -0.5,1.5`` read as a flag.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo import cli
from seqcpo.ensemble import EnsembleError, interpolate_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(path, seed, tok):
    make_tiny_llama(seed=seed, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A and B (one tokenizer), B with two token ids swapped, B with another EOS, B cut short, B zeroed."""
    root = tmp_path_factory.mktemp("faults_ens")
    tok = make_toy_tokenizer()
    out = {"root": root, "a": _save(root / "a", 0, tok), "b": _save(root / "b", 1, tok)}

    out["perm"] = _copy(out["b"], root / "perm")  # same shapes and config, ids 10 and 11 swapped
    spec = json.loads((root / "perm" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    t10, t11 = (next(t for t, i in vocab.items() if i == n) for n in (10, 11))
    vocab[t10], vocab[t11] = 11, 10
    (root / "perm" / "tokenizer.json").write_text(json.dumps(spec))

    out["eos"] = _copy(out["b"], root / "eos")  # same vocabulary, another EOS token
    cfg = json.loads((root / "eos" / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<s>"
    (root / "eos" / "tokenizer_config.json").write_text(json.dumps(cfg))

    out["trunc"] = _copy(out["b"], root / "trunc")
    with open(root / "trunc" / "model.safetensors", "r+b") as fh:
        fh.truncate(5000)
    out["zeroed"] = _copy(out["b"], root / "zeroed")
    with open(root / "zeroed" / "model.safetensors", "r+b") as fh:
        fh.write(b"\0" * 16)
    return out


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 5. tokenizers are compared


def test_ensemble_refuses_two_vocabularies(ck, tmp_path):
    """Defect: two token ids swapped in B's tokenizer.json were interpolated silently under A's tokenizer."""
    with pytest.raises(EnsembleError, match=r"tokenizers differ between A .*/a and B .*/perm: .*first at id 10"):
        interpolate_checkpoints(ck["a"], ck["perm"], [0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ensemble_refuses_other_special_tokens(ck, tmp_path):
    """Defect: the same vocabulary with another EOS token was interpolated silently."""
    with pytest.raises(EnsembleError, match=r"special tokens differ \(eos_token_id is 2 in A, 1 in B\)"):
        interpolate_checkpoints(ck["a"], ck["eos"], [0.5], tmp_path / "out")


def test_cli_names_both_folders_in_one_line(ck, tmp_path, capsys):
    rc = cli.main(["ensemble", "--from", ck["a"], "--to", ck["perm"], "--alphas", "0.5", "--out", str(tmp_path / "e")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and ck["a"] in line and ck["perm"] in line and "tokenizers differ" in line


# -- 6. SIGTERM, stale temp folders, permissions

_KILLED_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import seqcpo.ensemble as ens

    mix = ens._interpolate_tensor
    def killed(*args):  # SIGTERM while the temp folder is half written
        os.kill(os.getpid(), signal.SIGTERM)
        return mix(*args)
    ens._interpolate_tensor = killed

    from seqcpo.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_removes_the_temp_folder(ck, tmp_path):
    """Defect: SIGTERM mid-write left OUT/.alpha-0.5.XXXX.tmp/ (the model's size) behind for good."""
    out = tmp_path / "ens"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, "ensemble", "--from", ck["a"], "--to", ck["b"], "--alphas", "0.5",
         "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "terminated (SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert out.is_dir() and list(out.iterdir()) == [], list(out.iterdir())


def test_stale_temp_folders_of_a_killed_run_are_removed(ck, tmp_path):
    """Defect: a run killed outright (SIGKILL) left its temp folder, and the next run into the folder kept it."""
    out = tmp_path / "ens"
    stale = [out / ".alpha-0.5.ll0_2tmt.tmp", out / ".alpha-1.old.abcd1234.tmp", out / ".alpha-0.25.zz9_zz9z.tmp"]
    kept = [out / ".alpha-notes", out / ".other.abcd1234.tmp", out / "alpha-0.75"]
    for d in stale + kept:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    interpolate_checkpoints(ck["a"], ck["b"], [0.5], out)
    assert not any(d.exists() for d in stale)
    assert all(d.exists() for d in kept)


def test_alpha_folders_get_the_umask_mode(ck, tmp_path):
    """Defect: every alpha-* folder was drwx------ (tempfile.mkdtemp), unlike other outputs."""
    (path,) = interpolate_checkpoints(ck["a"], ck["b"], [0.5], tmp_path / "ens")
    os.mkdir(tmp_path / "plain")
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777


# -- 7. damaged weights, Ctrl-C


@pytest.mark.parametrize("which", ["trunc", "zeroed"])
def test_ensemble_names_a_damaged_weights_file(ck, tmp_path, capsys, which):
    """Defect: safetensors' SafetensorError traceback from seqcpo/ensemble.py for a cut-short or zeroed file."""
    with pytest.raises(ValueError, match=rf"checkpoint .*/{which}: model.safetensors is truncated or damaged"):
        interpolate_checkpoints(ck["a"], ck[which], [0.5], tmp_path / "out")
    rc = cli.main(["ensemble", "--from", ck["a"], "--to", ck[which], "--alphas", "0.5", "--out", str(tmp_path / "e")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"{ck[which]}: model.safetensors is truncated or damaged" in line


def test_generate_names_a_damaged_weights_file(ck, tmp_path, capsys):
    """Defect: `seqcpo generate --models TRUNC` ended in SafetensorError from transformers' modeling_utils."""
    from seqcpo.models import load_model

    with pytest.raises(ValueError, match=r"checkpoint .*/trunc: model.safetensors is truncated or damaged"):
        load_model(ck["trunc"])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Say {i}.", "context": "",
                                        "response": "The fox."}) + "\n" for i in range(12)))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"data:\n  dataset: {data}\n  task: instruction\n  validation_size: 2\n  test_size: 4\n")
    rc = cli.main(["generate", "--models", ck["trunc"], "--data-config", str(cfg), "--split", "test",
                   "--num-examples", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "g")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"{ck['trunc']}: model.safetensors is truncated or damaged" in line


@pytest.mark.parametrize("command, hint", [
    ("train", "rerun the same command with --resume_from_checkpoint true"),
    ("negatives", "rerun the same command to resume"),
])
def test_ctrl_c_ends_in_one_line(monkeypatch, capsys, command, hint):
    """Defect: Ctrl-C in `seqcpo train` / `seqcpo negatives` printed a full KeyboardInterrupt traceback."""
    def interrupted(args, extra):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command}", interrupted)
    argv = [command, "--config", "x.yaml"] + (["--out", "negs"] if command == "negatives" else [])
    try:
        rc = cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped seqcpo.cli.main: the user sees a traceback")
    line = _one_line(capsys.readouterr().err)
    assert rc == 130 and f"seqcpo {command}: interrupted; {hint}" in line


def test_unknown_errors_keep_their_traceback(monkeypatch):
    """A real bug must still show its traceback: only known errors and interrupts become one line."""
    def bug(args, extra):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_train", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "--config", "x.yaml"])


# -- 10. negative alphas


@pytest.mark.parametrize("alphas", [["-0.5,1.5"], ["1.5", "-0.5,0"], ["-0.5", "1.5"], ["--alphas=-0.5,1.5"]])
def test_negative_alphas_on_the_command_line(ck, tmp_path, capsys, alphas):
    """Defect: `--alphas -0.5,1.5` failed with "argument --alphas: expected at least one argument"."""
    out = tmp_path / "e"
    flag = [] if alphas[0].startswith("--alphas=") else ["--alphas"]
    rc = cli.main(["ensemble", "--from", ck["a"], "--to", ck["b"], *flag, *alphas, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    wa, wb = load_file(f"{ck['a']}/model.safetensors"), load_file(f"{ck['b']}/model.safetensors")
    w = load_file(f"{out}/alpha--0.5/model.safetensors")
    for k in wa:
        torch.testing.assert_close(w[k], 1.5 * wa[k] - 0.5 * wb[k], rtol=0, atol=1e-6)
    assert (out / "alpha-1.5").is_dir()
