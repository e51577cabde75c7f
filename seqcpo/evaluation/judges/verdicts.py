"""What a pairwise judge returns, and how a reply becomes a verdict.

A judge returns a :class:`Verdict` with ``winner`` "A", "B", "tie", or ``None`` when it failed (HTTP errors past
the retry budget, replies that never parsed). A failure is reported as a failure and never counted as a loss
(see :mod:`seqcpo.evaluation.winrate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

WINNERS = ("A", "B", "tie")


@dataclass
class Verdict:
    """One pairwise judgement.

    Attributes:
        winner: "A", "B", "tie", or None when the judge failed.
        raw: the judge's reply text (API backend) or its answer log-probs as JSON (local backend).
        error: why it failed (None on success).
        cached: True when read from the verdict cache.
        logp: local backend: the answer log-probs ``{"A", "B", "tie"}`` (what the debiased win rate reads).
    """

    winner: str | None
    raw: str = ""
    error: str | None = None
    cached: bool = False
    logp: dict[str, float] | None = None

    @property
    def failed(self) -> bool:
        return self.winner is None


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything with ``judge(prompt, a, b) -> Verdict`` and ``describe() -> dict`` (backend, model, host,
    prompt_sha256). ``judge_many`` is optional; :func:`judge_all` falls back to a loop."""

    def judge(self, prompt: str, a: str, b: str) -> Verdict:
        ...

    def describe(self) -> dict:
        ...


def judge_all(judge: PairwiseJudge, triples: Sequence[tuple[str, str, str]], progress: bool = True) -> list[Verdict]:
    """Judge many (prompt, a, b) triples, concurrently when the judge supports it."""
    many = getattr(judge, "judge_many", None)
    if many is not None:
        return many(triples, progress=progress)
    return [judge.judge(*t) for t in triples]


_BARE = re.compile(r"^[\s\"'*\[\(]*(A|B|C|tie)[\s\"'*\]\)\.]*$", re.IGNORECASE)
_TAGGED = re.compile(  # the letter is case-sensitive here: "Answer: a tie" must not read as A
    r"(?i:answer|verdict|winner)\s*(?:is)?\s*[:\-]?\s*[\"'*\[\(]*\s*(A|B|C|[Tt]ie|TIE)\b(?![\w'])"
)
_BRACKETED = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)


def parse_answer(text: str | None) -> str | None:
    """Map a judge reply to "A", "B", "tie" or None (unparseable).

    Accepted: a bare letter (``A``, ``"B".``, ``**C**``), ``tie``, ``[[A]]``, or ``Answer: B`` anywhere
    (the last such tag wins). ``C`` means tie, as the default template asks.

    >>> [parse_answer(s) for s in ["A", " b.", "C", "Tie", "Answer: B", "[[A]]", "I think so"]]
    ['A', 'B', 'tie', 'tie', 'B', 'A', None]
    """
    if not text:
        return None
    text = text.strip()
    m = _BARE.match(text)
    if m is None:
        tags = _BRACKETED.findall(text) or _TAGGED.findall(text)
        if not tags:
            return None
        letter = tags[-1]
    else:
        letter = m.group(1)
    letter = letter.upper()
    return {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}[letter]
