"""``report.md``, ``results.json`` and PNG plots from an evaluation's results dict.

The results dict (written verbatim to ``results.json``)::

    {"seqcpo_version", "created_utc", "data": {...}, "judge": {backend, model, host, prompt_sha256, debias, tie_margin, combine, note} | None,
     "judge_stats": {...}, "order": "both" | "random", "order_seed": int,
     "runs": [{"label", "model", "alpha", "decoding", "num_items", "win_rate_vs_gold": WinRate | None,
               "win_rate_by_category": {category: WinRate}, "mauve": MauveResult | None, "rouge_l",
               "distinct_1", "distinct_2", "distinct_3", "rep_4", "mean_tokens", "gold_ppl": {...} | None}],
     "head_to_head": [{"a", "b", "decoding", "win_rate": WinRate, "by_category": {...},
                       "paired_vs_gold": paired difference dict | None}],
     optional: "title", "command" (how to regenerate), "mauve" (the features setting),
     "grid": {"file", "out_dir", "eval", "compute": {arm: {...}}, "not_evaluated": [...]} (a grid's report)}

Every write is atomic (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from seqcpo.evaluation.plots import PLOT_ALPHA, PLOT_MAUVE, PLOT_SEPARATION, PLOT_WINRATE, write_plots  # noqa: F401
from seqcpo.io import atomic_write_bytes, atomic_write_text, redact  # noqa: F401  (re-exported for the CLI)

# the paired metrics of a grid's claims table, in order, with how each is read
CLAIM_METRICS = (
    ("rep_3", "3-gram repetition (per text)", "lower repeats less"),
    ("rep_4", "4-gram repetition (per text)", "lower repeats less"),
    ("distinct_2", "distinct-2 (set)", "higher is more diverse"),
    ("rouge_l", "ROUGE-L to gold (per item)", "higher is closer"),
    ("similarity", "MiniLM cosine to gold (per item)", "higher is closer"),
    ("mauve", "MAUVE vs gold (set, resampled)", "higher is closer"),
)


def judge_label(judge: dict | None) -> str:
    """One-line judge description: backend, model, host (API), first 12 hex of the prompt hash."""
    if not judge:
        return "no judge"
    where = f" @ {judge['host']}" if judge.get("host") else ""
    return f"{judge['backend']}: {judge['model']}{where}, prompt sha256 {judge['prompt_sha256'][:12]}"


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _cell(text) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_win_rate(wr: dict | None) -> str:
    """``"62.5 [40.1, 80.3]"``: a win rate and its interval in percent, "-" when there is none."""
    if not wr or wr.get("rate") is None:
        return "-"
    return f"{100 * wr['rate']:.1f} [{100 * wr['ci_low']:.1f}, {100 * wr['ci_high']:.1f}]"


def fmt_paired(p: dict | None) -> str:
    """``"+12.5 [-3.1, +28.1]"``: a paired difference of win rates and its interval in points."""
    if not p or p.get("difference") is None:
        return "-"
    if p.get("low") is None:
        return f"{100 * p['difference']:+.1f}"
    return f"{100 * p['difference']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]"


def _fmt_mauve(mv: dict | None) -> str:
    return "-" if not mv else f"{mv['score']:.3f} ({mv['n_p']}/{mv['n_q']}){' (!)' if mv.get('warning') else ''}"


def _header(results: dict, judge: str) -> list[str]:
    grid = results.get("grid")
    lines = [f"# {results.get('title') or 'seqcpo evaluation'}", ""]
    if results.get("command"):
        lines += [f"Regenerate this report (finished stages are skipped): `{results['command']}`", ""]
    lines.append(f"- created: {results.get('created_utc', '-')}, seqcpo {results.get('seqcpo_version', '-')}")
    if grid:
        lines.append(f"- grid file: `{grid['file']}`, output: `{grid['out_dir']}`")
    data = results.get("data") or {}
    if data:
        lines.append("- data: " + ", ".join(f"{k}={v}" for k, v in data.items()))
    if grid:
        lines.append(f"- decoding: {', '.join(map(str, grid['eval']['decoding']))}")
    lines.append(f"- judge: {judge}")
    j = results.get("judge")
    if j:
        if j.get("backend") == "local":
            lines.append("- **the local judge is weak**: a small LM choosing A/B/C by next-token log-probabilities "
                         "agrees with people far less than GPT-3.5 did in the paper; read its win rates as a smoke "
                         "test of the pipeline, not as evidence for or against a method")
        if j.get("note"):
            lines.append(f"- judge note: {j['note']}")
        lines.append(f"- judge prompt: {j.get('prompt_path') or 'default (seqcpo/templates/judge_pairwise.txt)'}, "
                     f"sha256 `{j['prompt_sha256']}`")
        order = results.get("order", "both")
        if order == "both" and j.get("debias"):
            rule = (f"both orders per item, the judge's answer log-odds summed over the two orders, tie within "
                    f"{j.get('tie_margin', 0.0):g} (position bias cancels)")
        elif order == "both":
            rule = "both orders per item; disagreeing verdicts count as a tie"
        else:
            rule = f"one random order per item (seed {results.get('order_seed')})"
        lines.append(f"- win rate = (wins + 0.5 ties) / n over items the judge did not fail; {rule}; "
                     "95% Wilson score interval")
    if results.get("judge_stats"):
        lines.append("- judge calls: " + ", ".join(f"{k}={v}" for k, v in sorted(results["judge_stats"].items())))
    if results.get("mauve") == "none":
        lines.append("- MAUVE: off")
    if grid and grid.get("not_evaluated"):
        lines.append(f"- not evaluated yet: {', '.join(grid['not_evaluated'])}")
    return lines + [""]


def fmt_difference(d: dict | None, digits: int = 3) -> str:
    """``"-0.044 [-0.068, -0.022]"``: a paired bootstrap difference (:mod:`seqcpo.evaluation.paired`)."""
    if not d:
        return "-"
    return f"{d['difference']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _claims_table(results: dict) -> list[str]:
    """Every arm minus the baseline, per decoding and metric, with its paired 95% interval and a verdict."""
    grid = results["grid"]
    paired, base = grid.get("paired") or {}, grid["eval"].get("baseline")
    if not paired:
        return []
    ps = grid.get("paired_settings") or {}
    lines = ["## Claims: every difference against " + f"`{base}` with its interval", "",
             f"Paired bootstrap over the same test items (both models continued the same prefixes): "
             f"{ps.get('resamples', '?')} resamples, {ps.get('mauve_resamples', '?')} for MAUVE; difference = arm "
             f"minus `vs` ({base}, or for a seeded arm {base}'s arm of the same training seed); **significant at {100 * ps.get('confidence', 0.95):g}%** when the interval excludes "
             "0, else **not resolved**. Per-text repetition and per-item ROUGE-L / similarity are paired item by "
             "item; distinct-n and MAUVE are recomputed on each resample.", "",
             "| arm | vs | decoding | metric | arm | vs | difference [95% CI] | n | claim |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, p in paired.items():
        for dec, diffs in p["by_decoding"].items():
            for key, name, reading in CLAIM_METRICS:
                d = diffs.get(key)
                if d is None:
                    continue
                verdict = ("significant at 95%" if d["significant"] else "not resolved") if \
                    abs(d["confidence"] - 0.95) < 1e-9 else ("significant" if d["significant"] else "not resolved")
                lines.append(f"| {_cell(arm)} | {_cell(p['vs'])} | `{dec}` | {name} ({reading}) | {_fmt(d['a'])} | "
                             f"{_fmt(d['b'])} | "
                             f"{fmt_difference(d)} | {d['n']} | {verdict} |")
    return lines + [""]


def _seed_table(results: dict) -> list[str]:
    spreads = (results.get("grid") or {}).get("seed_spread") or {}
    if not spreads:
        return []
    keys = [k for k, _, _ in CLAIM_METRICS]
    diffs = (results.get("grid") or {}).get("seed_spread_of_difference") or {}
    lines = ["## Seed spread", "", "Mean and sample standard deviation over training seeds (the arms listed); "
             "a difference smaller than the seeds' spread is not a property of the method.", "",
             "| arm (seeds) | decoding | n | " + " | ".join(f"{k} mean ± sd" for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for group, by_dec in spreads.items():
        for dec, m in by_dec.items():
            first = next(iter(m.values()))
            cells = [f"{_fmt(m[k]['mean'])} ± {_fmt(m[k]['std'])}" if m.get(k, {}).get("n") else "-" for k in keys]
            lines.append(f"| {_cell(group)} ({', '.join(first['arms'])}) | `{dec}` | {first['n']} | "
                         + " | ".join(cells) + " |")
    for group, d in diffs.items():
        for dec, m in d.items():
            if dec in ("vs", "pairs"):
                continue
            n = max((v.get("n") or 0) for v in m.values())
            cells = [f"{m[k]['mean']:+.3f} ± {_fmt(m[k]['std'])}" if m.get(k, {}).get("n") else "-" for k in keys]
            lines.append(f"| {_cell(group)} - {_cell(d['vs'])} per seed pair ({', '.join(d['pairs'])}) | `{dec}` | "
                         f"{n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _separation_table(results: dict) -> list[str]:
    training = (results.get("grid") or {}).get("training") or {}
    rows = [(a, t) for a, t in training.items() if t["curves"].get("rewards/accuracies")]
    if not rows:
        return []
    t0 = rows[0][1]
    lines = ["## When the negatives stopped teaching", "",
             f"Separated at step = first step of the earliest {t0['window']} consecutive logged steps with "
             f"`rewards/accuracies` >= {t0['threshold']:g} (every negative ranked below the gold); from there the "
             f"CPO term only widens margins. Curves: {PLOT_SEPARATION}.", "",
             "| arm | separated at step | last accuracy | last margin | last gold top-1 | logged steps |",
             "|---|---|---|---|---|---|"]
    for arm, t in rows:
        c = t["curves"]

        def last(k):
            return c[k][-1][1] if c.get(k) else None
        lines.append(f"| {_cell(arm)} | {t['separated_at_step'] if t['separated_at_step'] is not None else 'never'} "
                     f"| {_fmt(last('rewards/accuracies'))} | {_fmt(last('rewards/margins'))} | "
                     f"{_fmt(last('rewards/gold_top1'))} | {len(c['rewards/accuracies'])} |")
    return lines + [""]


def _arms_table(results: dict) -> list[str]:
    """A grid's one-row-per-arm summary: what each arm is, its headline numbers and what it cost. The judge's
    columns (win rate against the gold and head to head) appear only when the grid has a judge."""
    grid = results["grid"]
    baseline = grid["eval"].get("baseline")
    training = grid.get("training") or {}
    judged = results.get("judge") is not None
    head = ["arm", "what", "decoding"]
    if judged:
        head += ["win vs gold % [95% CI]", "n", f"vs {baseline or '-'} % [95% CI]", "n"]
    head += ["MAUVE (n gold/model)", "ROUGE-L", "MiniLM cos", "rep-3", "separated at step", "negatives s", "train s",
             "steps", "gen s", "eval s"]
    lines = ["## Arms", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    h2h_by = {(h["a"], h["decoding"]): h["win_rate"] for h in results.get("head_to_head") or []}
    for r in results.get("runs", []):
        c = grid["compute"][r["label"]]
        train_s = c["train_seconds"] if c["kind"] != "ensemble" else f"({c['ensemble_seconds']} interp.)"
        if c.get("train_untimed_before_step") is not None:
            train_s = f"{train_s} (steps {c['train_untimed_before_step']}+ only)"
        gen_s = c["generate_seconds"] if not c["generations_copied_from"] else f"(= {c['generations_copied_from']})"
        sep = training.get(r["label"])
        sep = "-" if sep is None or not sep["curves"].get("rewards/accuracies") else (
            sep["separated_at_step"] if sep["separated_at_step"] is not None else "never")
        cells = [_cell(r["label"]), _cell(c["summary"]), f"`{r['decoding']}`"]
        if judged:
            wr, hw = r.get("win_rate_vs_gold"), h2h_by.get((r["label"], r["decoding"]))
            cells += [fmt_win_rate(wr), wr["n"] if wr else "-", fmt_win_rate(hw), hw["n"] if hw else "-"]
        cells += [_fmt_mauve(r.get("mauve")), _fmt(r.get("rouge_l")), _fmt(r.get("similarity")),
                  _fmt(r.get("rep_3")), sep, _fmt(c.get("negatives_seconds"), 1),
                  train_s if train_s is not None else "-", c["train_steps"] if c["train_steps"] is not None else "-",
                  gen_s, _fmt(c.get("evaluate_seconds"), 1)]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    notes = ("Win rate = (wins + 0.5 ties) / n with a 95% Wilson interval; n = judged items. " if judged else
             "No judge in this grid: the claims rest on the reference-based metrics and MAUVE. ")
    lines += ["", notes + "MAUVE marked (!) comes from too few samples to discriminate. MiniLM cos = mean cosine "
              "similarity of continuation and gold embeddings. train s includes model loading and adds up every "
              "resumed part of a run (\"steps N+ only\": the part before step N was not timed); ensemble arms cost an "
              "interpolation on top of their two endpoints' training; alpha 0 and 1 are bit for bit their endpoints, "
              "so their generations are copied (gen s \"(= arm)\").", ""]
    return lines


def render_markdown(results: dict) -> str:
    """The report of a results dict (``seqcpo eval``'s, or a grid's with its ``grid`` and ``command`` keys)."""
    judge = judge_label(results.get("judge"))
    lines = _header(results, judge)
    if results.get("grid"):
        lines += _arms_table(results) + _claims_table(results) + _seed_table(results) + _separation_table(results)

    lines += ["## Models x decoding", "",
              "| model | alpha | decoding | win rate vs gold % [95% CI] | n | failed | judge | MAUVE (n gold/model) "
              "| ROUGE-L | distinct-1/2/3 | rep-4 | mean tokens | gold ppl |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("runs", []):
        wr = r.get("win_rate_vs_gold")
        ppl = (r.get("gold_ppl") or {}).get("ppl")
        lines.append(
            f"| {_cell(r['label'])} | {_fmt(r.get('alpha'), 2)} | `{r['decoding']}` | {fmt_win_rate(wr)} | "
            f"{wr['n'] if wr else '-'} | {wr['failed'] if wr else '-'} | {judge if wr else '-'} | "
            f"{_fmt_mauve(r.get('mauve'))} | "
            f"{_fmt(r.get('rouge_l'))} | {_fmt(r.get('distinct_1'))}/{_fmt(r.get('distinct_2'))}/"
            f"{_fmt(r.get('distinct_3'))} | {_fmt(r.get('rep_4'))} | {_fmt(r.get('mean_tokens'), 1)} | {_fmt(ppl, 2)} |"
        )
    warns = [f"{r['label']} / `{r['decoding']}`: {r['mauve']['warning']}" for r in results.get("runs", [])
             if r.get("mauve") and r["mauve"].get("warning")]
    errs = [f"{r['label']} / `{r['decoding']}`: {r['mauve_error']}" for r in results.get("runs", []) if r.get("mauve_error")]
    if warns or errs:
        lines += ["", "MAUVE notes (features: " + ", ".join(sorted({r['mauve']['featurizer'] for r in results['runs'] if r.get('mauve')})) + "):", ""]
        lines += [f"- (!) {w}" for w in warns] + [f"- {e}" for e in errs]

    cat_rows = [(r, cat, wr) for r in results.get("runs", []) for cat, wr in (r.get("win_rate_by_category") or {}).items()]
    if cat_rows:
        lines += ["", "## Win rate vs gold by category", "", f"Judge: {judge}", "",
                  "| model | decoding | category | win rate % [95% CI] | n | W/T/L | failed |", "|---|---|---|---|---|---|---|"]
        for r, cat, wr in cat_rows:
            lines.append(f"| {_cell(r['label'])} | `{r['decoding']}` | {_cell(cat)} | {fmt_win_rate(wr)} | {wr['n']} | "
                         f"{wr['wins']}/{wr['ties']}/{wr['losses']} | {wr['failed']} |")

    h2h = results.get("head_to_head") or []
    if h2h:
        lines += ["", "## Head to head", "", f"Judge: {judge}. Win rate of the first model over the second, with its "
                  "Wilson interval; beside it the paired difference of the two models' win rates against the gold "
                  "(per item, both models' verdicts on the same item; points, 95% paired-difference interval).", "",
                  "| model | vs | decoding | win rate % [95% CI] | n | W/T/L | failed | paired diff vs gold, points "
                  "[95% CI] | paired n | judge |", "|---|---|---|---|---|---|---|---|---|---|"]
        for h in h2h:
            wr = h["win_rate"]
            p = h.get("paired_vs_gold")
            lines.append(f"| {_cell(h['a'])} | {_cell(h['b'])} | `{h['decoding']}` | {fmt_win_rate(wr)} | {wr['n']} | "
                         f"{wr['wins']}/{wr['ties']}/{wr['losses']} | {wr['failed']} | {fmt_paired(p)} | "
                         f"{p['n'] if p else '-'} | {judge} |")

    plots = results.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | os.PathLike) -> dict:
    """Write plots, ``results.json``, ``report.md`` and (when the results carry ``judgments``)
    ``judgments.jsonl`` into ``out_dir``; the one report writer of ``seqcpo eval`` and ``seqcpo reproduce``.
    Every secret is redacted first (:func:`seqcpo.io.redact`: secret fields, URL credentials, the values of
    secret environment variables). Returns the results with ``plots`` (and without ``judgments``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = redact(dict(results))
    judgments = results.pop("judgments", None)
    if judgments:
        atomic_write_text(out_dir / "judgments.jsonl",
                          "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments))
    results["plots"] = write_plots(results, out_dir, judge_label(results.get("judge"))) if results.get("runs") else []
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(results))
    return results
