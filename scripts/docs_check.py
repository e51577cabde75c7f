#!/usr/bin/env python3
"""``make docs-check``: run every ```bash and ```python block of README.md, in order, as written, on the CPU at
small sizes, and fail naming the block (its line) and the command that failed.

    python scripts/docs_check.py [--readme README.md] [--model tiny|readme] [--keep] [--list] [--keep-going]
                                 [--workdir DIR --from-line N]

How a block runs:
- In one fresh temporary folder for the whole README (so later blocks read what earlier blocks wrote, as a reader
  who pastes them in order would): every top-level entry of the checkout is linked into it except ``runs/``,
  ``.venv/`` and ``.git/``, so outputs land in the temporary folder and never in the checkout. ``.venv/`` there is
  a stand-in for the one ``make setup`` makes (``bin/python`` runs this interpreter, ``bin/seqcpo`` runs the
  checkout's ``seqcpo.cli``, ``bin/activate`` puts ``bin/`` first on PATH, and a fresh ``.seqcpo-installed``
  stamp so ``make`` does not reinstall); ``.venv/bin`` is first on PATH for every command.
- Each command (a line, with its ``\\`` continuations) runs in its own ``bash -c``; a python block runs as one
  script.
- Small sizes: the overrides below are appended to ``seqcpo train`` / ``negatives`` / ``eval`` commands (the
  last value of a flag wins), and ``make demo`` gets the training ones through ``SEQCPO_DEMO_ARGS`` (read by
  ``seqcpo/demo.py``).
- ``--model tiny`` (the default): the embedded ``smollm2-135m`` is replaced by a tiny random-init Llama with the
  same tokenizer, built once in the temporary folder (a 135M model on 2 busy cores takes minutes per step).
  ``--model readme`` keeps the README's model.
- Files a command reads that no README command makes (``corpus.jsonl``) are written first (``FIXTURES``).
- Skips are explicit: a ``<!-- docs-check: skip (REASON) -->`` line right before a block skips all of it, and
  each rule of ``SKIP_RULES`` skips a matching command; both print the reason. Nothing is skipped silently.
- A command that changes or deletes a file another block wrote fails the check (blocks must not overwrite each
  other's outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NAME = "tiny-smollm2"

# (pattern searched in a command, reason it is not run here)
SKIP_RULES: list[tuple[str, str]] = [
    (r"^git clone\b", "clones the repository (network; docs-check runs inside the checkout)"),
    (r"^make setup\b", "installs from PyPI (network); docs-check runs in the environment it made"),
    (r"^make test\b", "the whole test suite: run by `make test` itself, not by docs-check"),
    (r"^pip install\b", "installs packages (network)"),
    (r"\baccelerate launch\b", "launches several processes (GPUs)"),
    (r"configs/(gpu_|wikidump_|paper_grid)", "a GPU config that reads its model and data from the Hugging Face Hub"),
    (r"\bdatabricks/databricks-dolly-15k\b", "reads a dataset from the Hugging Face Hub"),
    (r"--judge openai\b|OPENAI_API_KEY=", "needs a hosted judge and its API key"),
]

# appended to commands so they run at small sizes (dashes or underscores as each command accepts)
DATA_SMALL = ["--max_examples", "16", "--validation_size", "4", "--test_size", "4", "--prefix_tokens", "8",
              "--continuation_tokens", "16", "--an_max_new_tokens", "16"]
TRAIN_SMALL = DATA_SMALL + ["--max_steps", "2", "--logging_steps", "1", "--save_steps", "1000",
                            "--save_total_limit", "1"]
EVAL_SMALL = ["--num-examples", "4", "--max-new-tokens", "8", "--no-progress"]

CORPUS_WORDS = ("the river city north old stone bridge built century trade grew market people lived along "
                "valley school opened year later railway station museum church square known for its").split()


@dataclass
class Block:
    line: int                 # 1-based line of the opening fence
    lang: str                 # "bash" or "python"
    code: str
    skip: str | None = None   # reason from a <!-- docs-check: skip (...) --> comment
    commands: list[tuple[int, str]] = field(default_factory=list)  # (line, command) for bash blocks


def parse_blocks(text: str) -> list[Block]:
    """Every ```bash / ```python block (fences may be indented, as in a list item), in order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(bash|python)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        sm = re.match(r"^<!--\s*docs-check:\s*skip\s*\((.+)\)\s*-->$", prev)
        block = Block(start + 1, lang, "\n".join(body) + "\n", sm.group(1) if sm else None)
        if lang == "bash":
            block.commands = split_commands(body, start + 2)
        blocks.append(block)
        i += 1
    return blocks


def split_commands(body: list[str], first_line: int) -> list[tuple[int, str]]:
    """Lines joined over ``\\`` continuations; blank and comment-only lines dropped."""
    out, cur, cur_line = [], "", 0
    for n, raw in enumerate(body, first_line):
        if not cur and (not raw.strip() or raw.strip().startswith("#")):
            continue
        if not cur:
            cur_line = n
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            cur += stripped[:-1].strip() + " "
            continue
        out.append((cur_line, (cur + stripped.strip()).strip()))
        cur = ""
    if cur:
        out.append((cur_line, cur.strip()))
    return out


def skip_reason(command: str) -> str | None:
    for pattern, reason in SKIP_RULES:
        if re.search(pattern, command):
            return reason
    return None


def small_command(command: str, tiny_model: str | None) -> tuple[str, dict]:
    """The command as run (overrides appended, trailing comment dropped) and extra environment."""
    words = shlex.split(command, comments=True)
    env: dict[str, str] = {}
    if words[:2] == ["make", "demo"]:
        extra = TRAIN_SMALL + (["--model_name_or_path", tiny_model] if tiny_model else [])
        env["SEQCPO_DEMO_ARGS"] = shlex.join(extra)
        return command, env
    if words[:1] != ["seqcpo"] or len(words) < 2:
        return command, env
    sub = words[1]
    if sub in ("train", "negatives"):
        small = TRAIN_SMALL if sub == "train" else DATA_SMALL
        if _streaming(words):  # a stream has no example cap: max_steps bounds the run
            small = [w for i, w in enumerate(small) if "--max_examples" not in small[max(i - 1, 0):i + 1]]
        words += small
        if _config_says(words, "--task", r"task:\s*document\b", ("document",)):
            words += DOCUMENT_SMALL  # rows that fit the tiny model's context, few anchors
        if tiny_model:
            words += ["--model_name_or_path", tiny_model]
    elif sub in ("eval", "generate"):
        if tiny_model:
            words = [tiny_model if w == "smollm2-135m" else w for w in words]
        words += EVAL_SMALL
    return shlex.join(words), env


DOCUMENT_SMALL = ["--max_length", "96", "--anchors_per_row", "2"]


def _config_says(words: list[str], flag: str, pattern: str, values: tuple[str, ...]) -> bool:
    """Whether the command sets ``flag`` to one of ``values``, or its ``--config`` file matches ``pattern``."""
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words) and words[i + 1].lower() in values:
            return True
        if w.startswith(flag + "=") and w.split("=", 1)[1].lower() in values:
            return True
    if "--config" in words and words.index("--config") + 1 < len(words):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            words[words.index("--config") + 1])
        try:
            with open(path, encoding="utf-8") as f:
                return bool(re.search("^" + pattern, f.read(), re.M | re.I))
        except OSError:
            return False
    return False


def _streaming(words: list[str]) -> bool:
    """Whether the command streams: ``--streaming`` (bare or true), or its config file says so."""
    for i, w in enumerate(words):
        if w == "--streaming" and (i + 1 == len(words) or words[i + 1].startswith("--")):
            return True
    return _config_says(words, "--streaming", r"streaming:\s*(true|yes|on)\b", ("true", "yes", "on", "1"))


def make_workdir(root: str, python: str) -> str:
    """A temporary folder with the checkout's entries linked in and a stand-in ``.venv``."""
    work = tempfile.mkdtemp(prefix="seqcpo-docs-check-")
    for name in os.listdir(root):
        if name not in ("runs", ".venv", ".git", "__pycache__", ".pytest_cache"):
            os.symlink(os.path.join(root, name), os.path.join(work, name))
    bin_dir = os.path.join(work, ".venv", "bin")
    os.makedirs(bin_dir)
    scripts = {
        "python": f'#!/bin/sh\nexec {shlex.quote(python)} "$@"\n',
        "seqcpo": f'#!/bin/sh\nexec {shlex.quote(python)} -m seqcpo.cli "$@"\n',
        "activate": f'export PATH={shlex.quote(bin_dir)}:"$PATH"\n',
    }
    for name, body in scripts.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(body)
        os.chmod(path, 0o755)
    open(os.path.join(work, ".venv", ".seqcpo-installed"), "w").close()
    return work


def build_tiny_model(work: str, python: str, env: dict) -> str:
    """A 2-layer random-init Llama with the embedded model's tokenizer, saved to ``work/tiny-smollm2``."""
    target = os.path.join(work, TINY_NAME)
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from seqcpo.models import load_tokenizer
tok = load_tokenizer("smollm2-135m")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained({target!r})
tok.save_pretrained({target!r})
"""
    subprocess.run([python, "-c", code], cwd=work, env=env, check=True)
    return target


def write_fixtures(work: str, command: str) -> None:
    """``corpus.jsonl`` (the streaming example's corpus), 64 short documents, when a command names it."""
    path = os.path.join(work, "corpus.jsonl")
    if "corpus.jsonl" in command and not os.path.exists(path):
        with open(path, "w") as f:
            for i in range(64):
                words = [CORPUS_WORDS[(i * 7 + j * 3) % len(CORPUS_WORDS)] for j in range(60)]
                f.write(json.dumps({"id": f"doc-{i}", "text": " ".join(words).capitalize() + "."}) + "\n")


def snapshot(work: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file written under ``work`` (linked checkout entries not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(work):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)) and d != ".venv"]
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                st = os.stat(p)
                out[os.path.relpath(p, work)] = (st.st_size, st.st_mtime_ns)
    return out


def overwritten(before: dict, after: dict, owner: dict, line: int) -> list[str]:
    """Files another block wrote that this one changed or deleted; records this block's new files in owner."""
    bad = []
    for path, stat in before.items():
        if owner.get(path, line) != line and after.get(path) != stat:
            by = f"the block at line {owner[path]}" if owner[path] else "an earlier run (--workdir)"
            bad.append(f"{path} (written by {by})")
    for path in after:
        if path not in before:
            owner[path] = line
    return bad


def run_block(block: Block, ctx: dict) -> bool:
    """Run one block; print what ran or was skipped. False on the first failure."""
    print(f"\n=== README.md:{block.line} ```{block.lang}", flush=True)
    if block.skip:
        print(f"  SKIP (block): {block.skip}")
        return True
    items = block.commands if block.lang == "bash" else [(block.line + 1, None)]
    for line, command in items:
        reason = skip_reason(command) if command else None
        if reason:
            print(f"  SKIP line {line}: {command}\n       reason: {reason}")
            continue
        before, t0 = snapshot(ctx["work"]), time.time()
        if command is None:
            print(f"  RUN  python block (lines {block.line + 1}-{block.line + block.code.count(chr(10))})", flush=True)
            proc = subprocess.run([ctx["python"], "-"], input=block.code, text=True, cwd=ctx["work"], env=ctx["env"])
        else:
            write_fixtures(ctx["work"], command)
            run, extra = small_command(command, ctx["tiny"])
            print(f"  RUN  line {line}: {command}" + (f"\n       as:   {run}" if run != command else "")
                  + "".join(f"\n       env:  {k}={v}" for k, v in extra.items()), flush=True)
            proc = subprocess.run(["bash", "-c", run], cwd=ctx["work"], env={**ctx["env"], **extra})
        bad = overwritten(before, snapshot(ctx["work"]), ctx["owner"], block.line)
        what = command or "python block"
        if proc.returncode != 0:
            ctx["failed"].append(f"README.md:{block.line} line {line}: `{what}` exited {proc.returncode}")
            return False
        if bad:
            ctx["failed"].append(f"README.md:{block.line} line {line}: `{what}` overwrote " + "; ".join(bad[:5]))
            return False
        print(f"  ok   ({time.time() - t0:.0f} s)", flush=True)
        ctx["ran"] += 1
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--model", choices=["tiny", "readme"], default="tiny")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed at the end)")
    p.add_argument("--keep-going", action="store_true", help="run the later blocks after a failure")
    p.add_argument("--list", action="store_true", help="print each command and what would happen, run nothing")
    p.add_argument("--workdir", help="continue in the folder of an earlier --keep run (its files count as written "
                                     "by earlier blocks) instead of a fresh one")
    p.add_argument("--from-line", type=int, default=0, help="with --workdir: start at the block on this line")
    args = p.parse_args(argv)
    with open(args.readme) as f:
        blocks = parse_blocks(f.read())
    if args.list:
        for b in blocks:
            for line, cmd in b.commands or [(b.line + 1, "python block")]:
                why = b.skip or (skip_reason(cmd) if b.lang == "bash" else None)
                print(f"README.md:{line}: {'SKIP (' + why + ')' if why else 'RUN'}: {cmd}")
        return 0
    python = sys.executable
    if args.workdir:
        work = os.path.abspath(args.workdir)
        if not os.path.isdir(os.path.join(work, ".venv", "bin")):
            p.error(f"--workdir {args.workdir}: not a folder made by docs-check --keep")
    else:
        work = make_workdir(os.path.dirname(os.path.abspath(args.readme)), python)
    env = {**os.environ, "PATH": os.path.join(work, ".venv", "bin") + os.pathsep + os.environ.get("PATH", "")}
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(k, "1")
    env.pop("VIRTUAL_ENV", None)
    t0 = time.time()
    tiny = None
    if args.model == "tiny":
        tiny = os.path.join(work, TINY_NAME)
        if not os.path.isdir(tiny):
            build_tiny_model(work, python, env)
    owner = {path: 0 for path in snapshot(work)} if args.workdir else {}
    ctx = {"work": work, "python": python, "env": env, "tiny": tiny, "owner": owner, "failed": [], "ran": 0}
    print(f"docs-check: {len(blocks)} blocks of {args.readme} in {work}" + (f" (model {tiny})" if tiny else ""))
    for block in blocks:
        if block.line < args.from_line:
            print(f"\n=== README.md:{block.line} ```{block.lang}  (before --from-line {args.from_line}: not run now)")
            continue
        if not run_block(block, ctx) and not args.keep_going:
            break
    print(f"\ndocs-check: {ctx['ran']} commands ran in {time.time() - t0:.0f} s; "
          f"{len(ctx['failed'])} failed" + (f"; kept {work}" if args.keep else ""))
    for msg in ctx["failed"]:
        print(f"  FAILED {msg}")
    if not args.keep:
        subprocess.run(["rm", "-rf", work])
    return 1 if ctx["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
