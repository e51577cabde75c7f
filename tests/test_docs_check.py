"""scripts/docs_check.py (``make docs-check``): block extraction, skip rules, small-size overrides and the
overwrite guard on a synthetic markdown, and every README block either run or skipped with a reason.

The full check (it trains) is ``make docs-check``, not part of this suite.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("docs_check", os.path.join(ROOT, "scripts", "docs_check.py"))
dc = importlib.util.module_from_spec(_spec)
sys.modules["docs_check"] = dc
_spec.loader.exec_module(dc)

SYNTHETIC = """# title

```bash
make demo   # a comment
seqcpo train --config configs/demo.yaml --output_dir runs/a   # trailing comment
# a comment line

seqcpo eval --models smollm2-135m runs/a/final --labels base a \\
    --num-examples 32 --out runs/a_eval
```

text

<!-- docs-check: skip (needs a GPU) -->
```bash
seqcpo train --config configs/big.yaml
```

- a list item:

  ```bash
  seqcpo ensemble --from runs/a/final --to runs/b/final --out runs/ens
  ```

```python
print("hi")
```

```text
not a command
```
"""


def test_blocks_extracted_in_order_with_lines_and_skip_comments():
    blocks = dc.parse_blocks(SYNTHETIC)
    assert [(b.line, b.lang) for b in blocks] == [(3, "bash"), (15, "bash"), (21, "bash"), (25, "python")]
    first = blocks[0]
    assert first.skip is None
    assert [line for line, _ in first.commands] == [4, 5, 8]
    # the continuation line is joined into one command
    assert first.commands[2][1] == ("seqcpo eval --models smollm2-135m runs/a/final --labels base a "
                                    "--num-examples 32 --out runs/a_eval")
    assert blocks[1].skip == "needs a GPU"
    # an indented fence (inside a list item) is found and its indent removed
    assert blocks[2].commands == [(22, "seqcpo ensemble --from runs/a/final --to runs/b/final --out runs/ens")]
    assert blocks[3].code == 'print("hi")\n'


@pytest.mark.parametrize("command, reason_part", [
    ("accelerate launch --num_processes 8 -m seqcpo.cli train --config configs/demo.yaml", "several processes"),
    ("seqcpo train --config configs/gpu_gpt2xl_dolly.yaml", "GPU"),
    ("seqcpo train --config configs/wikidump_gpt2xl.yaml", "Hub"),
    ("export OPENAI_API_KEY=...", "API key"),
    ("seqcpo eval --models a --dataset databricks/databricks-dolly-15k --out x", "Hub"),
    ("make test   # comment", "test suite"),
    ("git clone <this repository> && cd seqcpo", "clones"),
])
def test_skip_rules_give_a_reason(command, reason_part):
    assert reason_part in dc.skip_reason(command)


@pytest.mark.parametrize("command", [
    "seqcpo train --config configs/demo.yaml --output_dir runs/cpo",
    "seqcpo eval --models smollm2-135m runs/demo/final --judge local --judge-model smollm2-135m --out x",
    "seqcpo ensemble --from runs/mle/final --to runs/cpo/final --alphas 0,1 --out runs/ensemble",
    "make demo",
])
def test_runnable_commands_are_not_skipped(command):
    assert dc.skip_reason(command) is None


def _flag(words, name):
    """The value argparse / the config loader would take: the last occurrence wins."""
    return [words[i + 1] for i, w in enumerate(words) if w == name][-1]


def test_train_overrides_are_appended_after_the_comment_is_dropped():
    run, env = dc.small_command("seqcpo train --config configs/demo.yaml --max_steps 20000 --output_dir runs/a  # c",
                                "/tmp/tiny")
    words = shlex.split(run)
    assert "#" not in run and env == {}
    assert _flag(words, "--max_steps") == "2"            # the README's 20000 is overridden (last wins)
    assert _flag(words, "--output_dir") == "runs/a"      # the README's folder is kept
    assert _flag(words, "--model_name_or_path") == "/tmp/tiny"
    assert _flag(words, "--max_examples") == "16"


def test_negatives_get_the_same_data_settings_as_training():
    neg, _ = dc.small_command("seqcpo negatives --config configs/demo.yaml --negatives an --out runs/n", None)
    train, _ = dc.small_command("seqcpo train --config configs/demo.yaml --negatives_path runs/n", None)
    neg_w, train_w = shlex.split(neg), shlex.split(train)
    for flag in dc.DATA_SMALL[::2]:
        assert _flag(neg_w, flag) == _flag(train_w, flag)
    assert "--max_steps" not in neg_w and "--model_name_or_path" not in neg_w


def test_eval_model_names_replaced_only_in_tiny_mode():
    cmd = "seqcpo eval --models smollm2-135m runs/demo/final --judge-model smollm2-135m --num-examples 32 --out x"
    tiny = shlex.split(dc.small_command(cmd, "/tmp/tiny")[0])
    assert "smollm2-135m" not in tiny and tiny.count("/tmp/tiny") == 2
    assert _flag(tiny, "--num-examples") == "4"
    readme = shlex.split(dc.small_command(cmd, None)[0])
    assert readme.count("smollm2-135m") == 2


def test_make_demo_gets_its_overrides_through_the_environment():
    run, env = dc.small_command("make demo   # comment", "/tmp/tiny")
    assert run == "make demo   # comment"
    extra = shlex.split(env["SEQCPO_DEMO_ARGS"])
    assert _flag(extra, "--max_steps") == "2" and _flag(extra, "--model_name_or_path") == "/tmp/tiny"


def test_demo_reads_the_environment_overrides(monkeypatch):
    """seqcpo/demo.py puts SEQCPO_DEMO_ARGS before the command line's overrides."""
    import seqcpo.cli
    from seqcpo import demo

    seen = []
    monkeypatch.setattr(seqcpo.cli, "main", lambda argv: seen.append(argv) or 7)
    monkeypatch.setenv("SEQCPO_DEMO_ARGS", "--max_steps 2 --output_dir 'runs/x y'")
    assert demo.main(["--max_steps", "5"]) == 7
    assert seen == [["train", "--config", "configs/demo.yaml", "--max_steps", "2", "--output_dir", "runs/x y",
                     "--max_steps", "5"]]


def test_overwrite_guard_names_the_file_and_its_block():
    owner = {}
    assert dc.overwritten({}, {"runs/a/final/x": (1, 1)}, owner, line=10) == []
    assert owner == {"runs/a/final/x": 10}
    # the same block may rewrite its own files; a later block may add files
    assert dc.overwritten({"runs/a/final/x": (1, 1)}, {"runs/a/final/x": (2, 2), "runs/b/y": (1, 1)}, owner, 10) == []
    bad = dc.overwritten({"runs/a/final/x": (2, 2)}, {"runs/a/final/x": (3, 3)}, owner, line=20)
    assert bad == ["runs/a/final/x (written by the block at line 10)"]
    deleted = dc.overwritten({"runs/a/final/x": (2, 2)}, {}, owner, line=20)
    assert deleted == ["runs/a/final/x (written by the block at line 10)"]


def test_run_block_fails_naming_line_and_command(tmp_path, capsys):
    text = "```bash\ntrue\nfalse   # breaks\necho never\n```\n"
    block = dc.parse_blocks(text)[0]
    ctx = {"work": str(tmp_path), "python": sys.executable, "env": dict(os.environ), "tiny": None, "owner": {},
           "failed": [], "ran": 0}
    assert dc.run_block(block, ctx) is False
    assert ctx["ran"] == 1
    assert ctx["failed"] == ["README.md:1 line 3: `false   # breaks` exited 1"]
    assert "echo never" not in capsys.readouterr().out


def test_run_block_fails_when_a_block_overwrites_another_blocks_output(tmp_path):
    first, second = dc.parse_blocks("```bash\nmkdir -p runs/a && echo 1 > runs/a/f\n```\n\n"
                                    "```bash\necho 2 > runs/a/f\n```\n")
    ctx = {"work": str(tmp_path), "python": sys.executable, "env": dict(os.environ), "tiny": None, "owner": {},
           "failed": [], "ran": 0}
    assert dc.run_block(first, ctx) is True
    assert dc.run_block(second, ctx) is False
    assert "runs/a/f (written by the block at line 1)" in ctx["failed"][0]


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = dc.parse_blocks(f.read())
    assert any(b.lang == "python" for b in blocks)
    run = []
    for b in blocks:
        assert b.lang == "python" or b.commands, f"README.md:{b.line}: a bash block with no command"
        for line, cmd in b.commands:
            reason = b.skip or dc.skip_reason(cmd)
            if not reason:
                run.append(cmd)
    # the quick-start commands, the ensemble and the local-judge evaluation really run
    assert any(c.startswith("make demo") for c in run)
    assert any("seqcpo ensemble" in c for c in run) and any(c.startswith("seqcpo eval") for c in run)
    # --list prints one line per command, each RUN or SKIP with its reason
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "docs_check.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == sum(len(b.commands) or 1 for b in blocks)
    assert all(": RUN: " in line or ": SKIP (" in line for line in out)


def test_readme_blocks_do_not_share_output_folders():
    """Every README command that writes a folder (--output_dir / --out, or its config's output_dir, such as
    configs/demo.yaml's runs/demo, which `make demo` writes) writes its own, and the ensemble's inputs come from earlier commands."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = dc.parse_blocks(f.read())
    written: dict[str, int] = {}
    for b in blocks:
        for line, cmd in b.commands:
            if dc.skip_reason(cmd) or b.skip:
                continue
            words = shlex.split(cmd, comments=True)
            outs = [words[i + 1] for i, w in enumerate(words) if w in ("--output_dir", "--out")]
            if words[:2] == ["make", "demo"]:
                outs = ["runs/demo"]
            elif words[:2] == ["seqcpo", "train"] and not outs:  # the config file's own output_dir
                with open(os.path.join(ROOT, words[words.index("--config") + 1])) as f:
                    outs = [yaml.safe_load(f)["output_dir"]]
            if words[:2] == ["seqcpo", "ensemble"]:
                for src in (words[words.index("--from") + 1], words[words.index("--to") + 1]):
                    assert os.path.dirname(src) in written, f"README.md:{line}: {src} is made by no earlier command"
            for out in outs:
                assert out not in written, f"README.md:{line}: {out} already written at line {written[out]}"
                written[out] = line


@pytest.mark.parametrize("flag", [["--streaming", "true"], ["--streaming=yes"], ["--streaming"]])
def test_streaming_training_gets_no_example_cap(flag):
    """A stream refuses max_examples (max_steps bounds it); the other overrides still apply."""
    run, _ = dc.small_command(shlex.join(["seqcpo", "train", "--dataset", "c.jsonl", *flag, "--max_steps", "9"]), None)
    words = shlex.split(run)
    assert "--max_examples" not in words
    assert _flag(words, "--max_steps") == "2" and _flag(words, "--test_size") == "4"
    plain = shlex.split(dc.small_command("seqcpo train --dataset c.jsonl --streaming false", None)[0])
    assert _flag(plain, "--max_examples") == "16"


def test_resume_in_a_kept_folder_counts_its_files_as_earlier_blocks(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "f").write_text("1")
    owner = {path: 0 for path in dc.snapshot(str(tmp_path))}
    assert owner == {os.path.join("runs", "a", "f"): 0}
    bad = dc.overwritten(dc.snapshot(str(tmp_path)), {}, owner, line=30)
    assert bad == [os.path.join("runs", "a", "f") + " (written by an earlier run (--workdir))"]
