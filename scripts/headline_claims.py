"""The README's claims table from a grid's results.json: an arm group against the baseline, seed by seed.

    .venv/bin/python scripts/headline_claims.py results/smollm2_grid_resolved/results.json --arm cpo

For every decoding and every metric the controls showed informative, each training seed's paired difference
(arm seed s minus baseline seed s, on the same 400 items, 95% paired bootstrap interval) and the verdict: a
claim only where every evaluated seed pair's interval excludes zero on the same side (the first line says how many
of the grid's seeds are in); "not resolved" where none does; "mixed" otherwise. Prints markdown.
"""

from __future__ import annotations

import argparse
import json

NAMES = {"rep_3": "3-gram repetition (lower: repeats less)", "rep_4": "4-gram repetition (lower: repeats less)",
         "distinct_2": "distinct-2 (higher: more diverse)", "rouge_l": "ROUGE-L to the gold",
         "similarity": "MiniLM cosine to the gold", "mauve": "MAUVE against the gold"}


def claims(results: dict, arm: str) -> str:
    grid = results["grid"]
    spread = grid["seed_spread_of_difference"].get(arm)
    pairs = spread["pairs"] if spread else [f"{arm} - {grid['paired'][arm]['vs']}"]
    arms = [p.split(" - ")[0] for p in pairs]
    seeds = [a for a in grid.get("arms", {arm: None}) if a == arm or a.startswith(f"{arm}.s")]
    missing = [a for a in seeds if a not in arms]
    lines = [f"Seeds evaluated: {len(arms)} of {len(seeds)}" + (f" ({', '.join(missing)} not yet)" if missing else ""),
             "", f"| decoding | metric | {' | '.join(arms)} | mean ± sd over seeds | claim |",
             "|---|---|" + "---|" * len(arms) + "---|---|"]
    for dec, informative in grid["informative"].items():
        for metric, name in NAMES.items():
            if not informative.get(metric):
                continue
            cells, sides = [], set()
            for a in arms:
                d = grid["paired"][a]["by_decoding"][dec][metric]
                cells.append(f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
                sides.add("+" if d["low"] > 0 else "-" if d["high"] < 0 else "0")
            s = spread.get(dec, {}).get(metric) if spread else None
            ms = f"{s['mean']:+.3f} ± {s['std']:.3f}" if s else "-"
            verdict = ("**lower**" if sides == {"-"} else "**higher**" if sides == {"+"} else
                       "not resolved" if sides == {"0"} else "mixed across seeds")
            lines.append(f"| `{dec}` | {name} | {' | '.join(cells)} | {ms} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--arm", default="cpo", help="the arm (seed 0) whose seed group is compared")
    args = ap.parse_args()
    with open(args.results, encoding="utf-8") as fh:
        print(claims(json.load(fh), args.arm))


if __name__ == "__main__":
    main()
