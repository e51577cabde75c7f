"""The judge prompt template: ``seqcpo/templates/judge_pairwise.txt`` by default, or any file with the
placeholders ``{prompt}``, ``{a}``, ``{b}``; it asks for one letter: ``A``, ``B``, or ``C`` for a tie. Its SHA-256
is part of every report and of every cache key."""

from __future__ import annotations

import hashlib
import os
import re
from importlib import resources
from pathlib import Path


def load_judge_prompt(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """Read a judge prompt template. Returns (text, SHA-256 hex of its UTF-8 bytes).

    ``None`` reads the packaged default ``seqcpo/templates/judge_pairwise.txt``.
    """
    if path is None:
        text = resources.files("seqcpo").joinpath("templates/judge_pairwise.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in text]
    if missing:
        raise ValueError(f"judge prompt {path or 'default'} lacks the placeholder(s) {', '.join(missing)}")
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_judge_prompt(template: str, prompt: str, a: str, b: str) -> str:
    """Fill the placeholders in one pass (not ``str.format``: texts may contain braces or placeholders)."""
    values = {"{prompt}": prompt, "{a}": a, "{b}": b}
    return re.sub(r"\{prompt\}|\{a\}|\{b\}", lambda m: values[m.group(0)], template)
