"""Degraded controls: a metric supports a claim only where it scores a deliberately worse model clearly worse.

A control is an arm made from another arm's outputs or weights, built to be worse:

- ``shuffle``: the source arm's continuations moved to other items (each item gets the next item's continuation,
  in id order: no item keeps its own). Per-item closeness to the gold (ROUGE-L, embedding similarity) must fall;
  repetition, distinct-n and MAUVE see the same set of texts and cannot move, by construction.
- ``loop``: the source arm's continuations, each cut to its first half (in words) and said twice, as a model stuck
  in a loop writes. Repetition must rise and distinct-n fall: the controls above cannot show that repetition
  discriminates (shuffling keeps every text; a hot model repeats less, not more). The length in words is kept,
  and so is the row's token count (the source's).
- ``temperature``: the source arm's weights sampled at a high temperature (default 2.0, no top-p) under every
  decoding of the grid. Fluency breaks down, so MAUVE and closeness to the gold must fall.

The control is paired with its source arm on the same items. A metric is *informative* on a decoding when at least
one control moves it in the worse direction with a 95% paired interval that excludes zero (distinct-n counts in
either direction: a broken model can be "more diverse"). The report lists each metric's verdict and makes no claim
from a metric that no control could move.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

CONTROL_KINDS = ("shuffle", "loop", "temperature")
REWRITTEN_KINDS = ("shuffle", "loop")  # made from the source's generations, without a model
# +1: higher is worse, -1: lower is worse, 0: a significant move either way shows the metric discriminates
WORSE_DIRECTION = {"rouge_l": -1, "similarity": -1, "mauve": -1, "rep_3": +1, "rep_4": +1,
                   "distinct_1": 0, "distinct_2": 0, "distinct_3": 0}


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """One ``controls:`` entry of a grid file (read by :func:`seqcpo.config_loader.resolve`: the kinds and the
    temperature's range are the fields' metadata)."""

    name: str
    of: str
    kind: str = dataclasses.field(metadata={"allowed": CONTROL_KINDS})
    temperature: float = dataclasses.field(default=2.0, metadata={"check": ">0"})


def parse_controls(where: str, specs: Any, arm_names: Sequence[str]) -> list[ControlSpec]:
    """The ``controls:`` list, checked (names, kinds, the source arm, the temperature); a bad entry raises a
    one-line ValueError (:class:`~seqcpo.config_loader.ConfigError`) naming the file and the key."""
    from seqcpo.config_loader import resolve

    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ValueError(f"{where}: controls: expected a list of {{name, of, kind[, temperature]}}")
    out = []
    for i, spec in enumerate(specs):
        w = f"{where}: controls[{i}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{w}: expected a mapping with name, of, kind")
        values = resolve(ControlSpec, [(w, spec)])
        if "kind" not in values:
            raise ValueError(f"{w}.kind: choose one of {', '.join(CONTROL_KINDS)}")
        if values.get("of") not in arm_names:
            raise ValueError(f"{w}.of: {values.get('of')!r} is not an arm ({', '.join(arm_names)})")
        values.setdefault("name", f"{values['of']}.{values['kind']}")
        if values["name"] in arm_names:
            raise ValueError(f"{w}.name: {values['name']!r} is already an arm")
        out.append(ControlSpec(**values))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: controls: names must be unique, got {', '.join(names)}")
    return out


def shuffled_rows(rows: Sequence[dict], label: str) -> list[dict]:
    """Each item gets the next item's continuation (ids sorted within each decoding), relabelled ``label``.

    >>> rows = [{"id": i, "decoding": "greedy", "generation": g, "num_tokens": n}
    ...         for i, g, n in (("a", "x", 1), ("b", "y y", 2), ("c", "z", 1))]
    >>> [(r["id"], r["generation"], r["num_tokens"]) for r in shuffled_rows(rows, "ctl")]
    [('a', 'y y', 2), ('b', 'z', 1), ('c', 'x', 1)]
    """
    moved = ("generation", "num_tokens", "generated_ids", "finish_reason")
    out: list[dict] = []
    for dec in dict.fromkeys(r["decoding"] for r in rows):
        part = sorted((r for r in rows if r["decoding"] == dec), key=lambda r: str(r["id"]))
        for k, row in enumerate(part):
            donor = part[(k + 1) % len(part)]
            out.append({**row, **{f: donor[f] for f in moved if f in donor}, "model": label})
    return out


def looped_rows(rows: Sequence[dict], label: str) -> list[dict]:
    """Each continuation cut to its first half (whitespace words, the odd word kept) and said twice, as long in
    words as it was, relabelled ``label``.

    >>> [r["generation"] for r in looped_rows([{"id": "a", "generation": "one two three four five"}], "ctl")]
    ['one two three one two']
    """
    out: list[dict] = []
    for row in rows:
        words = row["generation"].split()
        half = words[: (len(words) + 1) // 2]
        out.append({**row, "generation": " ".join((half + half)[: len(words)]), "model": label})
    return out


def rewritten_rows(kind: str, rows: Sequence[dict], label: str) -> list[dict]:
    """The rows of a control of kind ``shuffle`` or ``loop``, from its source's generations."""
    return {"shuffle": shuffled_rows, "loop": looped_rows}[kind](rows, label)


def temperature_configs(configs, temperature: float):
    """Each decoding of the grid replaced by plain sampling at ``temperature`` (same name, length and seed), so
    the control's rows pair with every other arm's rows of that decoding."""
    from seqcpo.decoding import DecodingConfig

    return [DecodingConfig(strategy="sample", temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=c.max_new_tokens, seed=c.seed, name=c.name) for c in configs]


def discrimination(paired_by_decoding: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """``{decoding: {metric: {difference, low, high, clearly_worse}}}`` of a control against its source.

    >>> d = discrimination({"greedy": {"rouge_l": {"difference": -0.2, "low": -0.25, "high": -0.15}}})
    >>> d["greedy"]["rouge_l"]["clearly_worse"]
    True
    """
    out: dict[str, dict[str, dict]] = {}
    for dec, metrics in paired_by_decoding.items():
        for metric, d in metrics.items():
            if metric not in WORSE_DIRECTION:
                continue
            sign = WORSE_DIRECTION[metric]
            worse = (d["low"] > 0 or d["high"] < 0) if sign == 0 else (d["low"] > 0 if sign > 0 else d["high"] < 0)
            out.setdefault(dec, {})[metric] = {"difference": d["difference"], "low": d["low"], "high": d["high"],
                                               "clearly_worse": bool(worse)}
    return out


def informative(by_control: dict[str, dict[str, dict[str, dict]]]) -> dict[str, dict[str, bool]]:
    """``{decoding: {metric: True when some control is clearly worse on it}}``."""
    out: dict[str, dict[str, bool]] = {}
    for per_dec in by_control.values():
        for dec, metrics in per_dec.items():
            for metric, d in metrics.items():
                out.setdefault(dec, {})[metric] = out.get(dec, {}).get(metric, False) or d["clearly_worse"]
    return out


def controls_markdown(by_control: dict[str, dict], sources: dict[str, str]) -> list[str]:
    """The report's section: each control's paired difference against its source, and each metric's verdict."""
    if not by_control:
        return []
    lines = ["## Can each metric tell a worse model here? (degraded controls)", "",
             "Each control is paired with the arm it degrades, on the same items (95% paired intervals). A metric is "
             "used for claims only where some control scores clearly worse on it; rows marked *not informative* "
             "make no claim in this report.", ""]
    verdict = informative(by_control)
    for dec in verdict:
        metrics = [m for m in WORSE_DIRECTION if m in verdict[dec]]
        lines += [f"**{dec}**", "", "| control | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for name, per_dec in by_control.items():
            cells = []
            for m in metrics:
                d = per_dec.get(dec, {}).get(m)
                cells.append("" if d is None else f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                             + (" worse" if d["clearly_worse"] else ""))
            lines.append(f"| {name} (vs {sources[name]}) | " + " | ".join(cells) + " |")
        lines.append("| **verdict** | " + " | ".join("informative" if verdict[dec][m] else "*not informative*"
                                                      for m in metrics) + " |")
        lines.append("")
    return lines
