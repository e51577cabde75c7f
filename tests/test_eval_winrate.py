"""Win-rate and interval arithmetic on hand-made verdicts."""

from __future__ import annotations

import math

import pytest

from seqcpo.evaluation.judges import Verdict, parse_answer
from seqcpo.evaluation.winrate import (
    ItemResult,
    combine_orders,
    from_candidate_side,
    head_to_head,
    judge_pairs,
    summarize,
    summarize_by_category,
    wilson_interval,
)


def _items(outcomes, category=None):
    return [ItemResult(id=str(i), category=category, outcome=o) for i, o in enumerate(outcomes)]


def test_win_rate_and_wilson_interval_by_hand():
    """6 wins, 1 tie, 3 losses, 2 failed.

    n = 10 (failed items excluded), rate = (6 + 0.5 * 1) / 10 = 0.65.
    Wilson, z = 1.959964, z^2 = 3.841459:
      denom  = 1 + z^2/n = 1.3841459
      center = (0.65 + z^2/(2n)) / denom = (0.65 + 0.1920729) / 1.3841459 = 0.608370
      half   = z * sqrt(0.65 * 0.35 / 10 + z^2 / (4 n^2)) / denom
             = 1.959964 * sqrt(0.02275 + 0.0096036) / 1.3841459 = 1.959964 * 0.179871 / 1.3841459 = 0.254699
      CI     = [0.353671, 0.863069]
    """
    wr = summarize(_items(["win"] * 6 + ["tie"] + ["loss"] * 3 + [None] * 2))
    assert (wr.wins, wr.ties, wr.losses, wr.failed, wr.n) == (6, 1, 3, 2, 10)
    assert wr.rate == pytest.approx(0.65)
    assert wr.ci_low == pytest.approx(0.353671, abs=1e-6)
    assert wr.ci_high == pytest.approx(0.863069, abs=1e-6)


def test_wilson_edges():
    """All 5 wins: p = 1, z^2/n = 0.768292, center = (1 + 0.384146)/1.768292 = 0.782759,
    half = z * sqrt(0 + 3.841459/100)/1.768292 = 1.959964 * 0.195996 / 1.768292 = 0.217241 -> [0.565518, 1]."""
    low, high = wilson_interval(1.0, 5)
    assert low == pytest.approx(0.565518, abs=1e-6) and high == 1.0
    low, high = wilson_interval(0.0, 5)
    assert low == 0.0 and high == pytest.approx(1 - 0.565518, abs=1e-6)
    assert summarize(_items([None, None])).rate is None  # nothing judged: no rate, no interval
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_order_rule():
    """Candidate read as A then as B; disagreement (incl. win/tie) = tie; a failure fails the item."""
    assert from_candidate_side("A", "A") == "win" and from_candidate_side("A", "B") == "loss"
    assert from_candidate_side("tie", "B") == "tie" and from_candidate_side(None, "A") is None
    assert combine_orders("win", "win") == "win"
    assert combine_orders("loss", "loss") == "loss"
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("win", "loss") == "tie"
    assert combine_orders("win", "tie") == "tie"
    assert combine_orders("loss", "tie") == "tie"
    assert combine_orders("win", None) is None and combine_orders(None, "loss") is None


class ScriptedJudge:
    """Returns scripted winners per (a, b); records calls."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def judge(self, prompt, a, b):
        self.calls.append((prompt, a, b))
        return Verdict(self.script.get((a, b)))

    def describe(self):
        return {"backend": "scripted", "model": "s", "host": None, "prompt_sha256": "0" * 64}


def test_judge_pairs_both_orders_with_position_bias():
    """Item 1: judge always says A (pure position bias) -> win as A, loss as B -> tie.
    Item 2: prefers the candidate in both orders -> win. Item 3: second verdict fails -> failed.
    Win rate = (1 + 0.5) / 2 = 0.75 with 1 failed."""
    script = {("c1", "g1"): "A", ("g1", "c1"): "A",
              ("c2", "g2"): "A", ("g2", "c2"): "B",
              ("c3", "g3"): "A", ("g3", "c3"): None}
    pairs = [{"key": f"k{i}", "id": str(i), "category": "x", "prompt": "p", "candidate": f"c{i}", "baseline": f"g{i}"}
             for i in (1, 2, 3)]
    judge = ScriptedJudge(script)
    items = judge_pairs(judge, pairs, order="both")
    assert [i.outcome for i in items] == ["tie", "win", None]
    assert len(judge.calls) == 6
    wr = summarize(items)
    assert (wr.wins, wr.ties, wr.losses, wr.failed, wr.n, wr.rate) == (1, 1, 0, 1, 2, 0.75)


def test_random_order_is_seeded_and_recorded():
    pairs = [{"key": f"k{i}", "id": str(i), "category": None, "prompt": "p", "candidate": "c", "baseline": "g"}
             for i in range(40)]
    judge = ScriptedJudge({("c", "g"): "A", ("g", "c"): "A"})  # always A: win iff candidate drawn as A
    items = judge_pairs(judge, pairs, order="random", seed=7)
    positions = [i.positions[0] for i in items]
    assert len(judge.calls) == 40 and set(positions) == {"A", "B"}
    assert [i.outcome for i in items] == ["win" if p == "A" else "loss" for p in positions]
    again = judge_pairs(judge, list(reversed(pairs)), order="random", seed=7)  # order-independent draw
    assert [i.positions[0] for i in reversed(again)] == positions
    other = judge_pairs(judge, pairs, order="random", seed=8)
    assert [i.positions[0] for i in other] != positions
    with pytest.raises(ValueError):
        judge_pairs(judge, pairs, order="sometimes")


def test_per_category_rows():
    """open_qa: 2 wins, 1 loss -> 2/3; summarization: 1 tie, 1 failed -> 0.5 (n=1)."""
    items = _items(["win", "win", "loss"], "open_qa") + _items(["tie", None], "summarization") + _items(["win"], None)
    cats = summarize_by_category(items)
    assert set(cats) == {"open_qa", "summarization"}
    assert cats["open_qa"].rate == pytest.approx(2 / 3) and cats["open_qa"].n == 3
    assert cats["summarization"].rate == 0.5 and cats["summarization"].failed == 1
    assert math.isclose(summarize(items).rate, (3 + 0.5) / 5)


def test_head_to_head_matches_on_id_and_decoding():
    rows_x = [{"id": "1", "model": "X", "decoding": "greedy", "prompt": "p", "generation": "x1", "category": None},
              {"id": "2", "model": "X", "decoding": "greedy", "prompt": "p", "generation": "x2", "category": None}]
    rows_y = [{"id": "1", "model": "Y", "decoding": "greedy", "prompt": "p", "generation": "y1", "category": None}]
    judge = ScriptedJudge({("x1", "y1"): "B", ("y1", "x1"): "A"})  # Y preferred in both orders
    items = head_to_head(judge, rows_x, rows_y)
    assert [i.outcome for i in items] == ["loss"]


def test_parse_answer_variants():
    assert parse_answer("A") == "A" and parse_answer("**B**") == "B" and parse_answer("C.") == "tie"
    assert parse_answer("tie") == "tie" and parse_answer("Final verdict: [[B]]") == "B"
    assert parse_answer("Answer: A") == "A" and parse_answer("Reasoning... Answer: C") == "tie"
    assert parse_answer("My answer: a tie") is None and parse_answer("Verdict: tie") == "tie"
    assert parse_answer("") is None and parse_answer("Both are good") is None and parse_answer(None) is None


def test_debiased_local_judge_cancels_position_bias():
    """A judge that always prefers position A by 3 nats but slightly prefers the candidate's text.

    Candidate as A: logp(A) - logp(B) = 3 + 0.5; candidate as B: logp(B) - logp(A) = -3 + 0.5.
    Summed: +1.0 > 0 -> win. Arg-max verdicts would say A both times: win then loss -> tie.
    """
    from seqcpo.evaluation.judges import Verdict
    from seqcpo.evaluation.winrate import combine_orders, debiased_outcome, from_candidate_side, judge_pairs

    class BiasedJudge:
        debias = True
        tie_margin = 0.0

        def judge(self, prompt, a, b):
            bonus = 0.5 if a == "cand" else -0.5
            return Verdict("A", logp={"A": -0.1, "B": -0.1 - 3.0 - bonus, "tie": -9.0})

        def describe(self):
            return {}

    pairs = [{"key": "k", "id": "1", "category": None, "prompt": "p", "candidate": "cand", "baseline": "gold"}]
    [item] = judge_pairs(BiasedJudge(), pairs, order="both", progress=False, debias=True,
                         tie_margin=BiasedJudge.tie_margin)
    assert item.outcome == "win"
    assert combine_orders(from_candidate_side("A", "A"), from_candidate_side("A", "B")) == "tie"
    BiasedJudge.tie_margin = 1.5
    [item] = judge_pairs(BiasedJudge(), pairs, order="both", progress=False, debias=True,
                         tie_margin=BiasedJudge.tie_margin)
    assert item.outcome == "tie"
    assert debiased_outcome([Verdict(None), Verdict("A", raw="{}")], ["A", "B"]) is None
