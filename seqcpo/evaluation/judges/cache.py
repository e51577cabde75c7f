"""The verdict cache: ``<cache_dir>/judge_cache.jsonl``, keyed by SHA-256 of everything that decides a verdict.

The key covers the judge's identity (API: endpoint URL without credentials or query, model, temperature,
max_tokens; local: the checkpoint's content identity and prompt rendering), the template text, and the prompt and
both texts. Another server, model or template never reads a verdict it did not make. Failures are not cached, so a
rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from seqcpo.evaluation.judges.verdicts import Verdict

DEFAULT_CACHE_DIR = Path(os.environ.get("SEQCPO_CACHE", Path.home() / ".cache" / "seqcpo")) / "judge"


class VerdictCache:
    """Append-only JSONL cache of successful verdicts, safe for threads and for concurrent processes
    appending to the same file (each entry is one ``os.write`` on an O_APPEND descriptor; a torn line
    is skipped on load)."""

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.path = Path(cache_dir or DEFAULT_CACHE_DIR) / "judge_cache.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(judge_identity: dict, template: str, prompt: str, a: str, b: str) -> str:
        """SHA-256 of everything that decides a verdict: the judge's identity (endpoint URL, model and sampling
        settings for an API; the checkpoint's content identity for a local model), the template and the texts."""
        blob = json.dumps([judge_identity, template, prompt, a, b], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Verdict | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        return Verdict(winner=entry["winner"], raw=entry.get("raw", ""), cached=True, logp=entry.get("logp"))

    def put(self, key: str, verdict: Verdict, judge_identity: dict) -> None:
        if verdict.winner is None:
            return
        entry = {"key": key, "winner": verdict.winner, "raw": verdict.raw, "judge": judge_identity,
                 "logp": verdict.logp}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._entries[key] = entry
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def __len__(self) -> int:
        return len(self._entries)
