"""Token-level similarity used to rank negatives (docs/method.md, "Negatives": ANR and BNR rank by ROUGE-L F).

ROUGE-L F1 on token ids, our own implementation (no ``rouge-score`` dependency, no tokenisation step):

    P = LCS(a, b) / len(a),   R = LCS(a, b) / len(b),   F = 2 P R / (P + R) = 2 LCS / (len(a) + len(b))

It is symmetric in its arguments. The longest common subsequence is computed with the bit-parallel
algorithm of Hyyrö (2004), one big-int update per token of ``a``: 256 x 256 tokens take microseconds.
"""

from __future__ import annotations

from typing import Sequence


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token-id sequences."""
    if not a or not b:
        return 0
    # Bit j of match[token] is set when b[j] == token.
    match: dict[int, int] = {}
    for j, tok in enumerate(b):
        match[tok] = match.get(tok, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full  # zero bits of v count the LCS so far (Hyyro's row-wise DP in one integer)
    for tok in a:
        m = match.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l_f(a: Sequence[int], b: Sequence[int]) -> float:
    """ROUGE-L F1 between two token-id sequences, in [0, 1]; 0.0 when either is empty (as rouge-score)."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def sort_best_first(
    ids: list[list[int]], valid: list[bool], scores: list[float]
) -> tuple[list[list[int]], list[bool], list[float]]:
    """Reorder one example's K negatives by score, highest first (stable: ties keep their drawn order).

    The ranked objective reads column order as the ranking, so every generator returns ranked rows
    through this one function.
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [ids[i] for i in order], [valid[i] for i in order], [float(scores[i]) for i in order]
