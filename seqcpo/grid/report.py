"""The grid's report: every evaluated arm's results in one results dict (the header of
:func:`seqcpo.evaluation.evaluate.results_header`, the arms' runs and head-to-heads, the grid's compute, paired
differences, seed spreads, controls and training curves), written by :func:`seqcpo.evaluation.report.write_report`,
then the grid's own sections (controls, quality over steps)."""

from __future__ import annotations

import dataclasses
import json

from seqcpo.grid.cache import read_done
from seqcpo.grid.controls import discrimination, informative
from seqcpo.grid.evaluate import paired
from seqcpo.grid.spec import ArmSpec, GridConfig
from seqcpo.grid.state import GridRun

CURVE_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/gold_top1")
SPREAD_METRICS = ("rep_3", "rep_4", "distinct_2", "rouge_l", "similarity", "mauve")


def arm_summary(arm: ArmSpec) -> str:
    """One line on what the arm is, its values read from its built config (no default declared here)."""
    c = arm.config
    if arm.kind == "control":
        ctl = arm.control
        how = {"shuffle": "continuations moved across items", "loop": "continuations cut in half and looped"}.get(
            ctl.kind, f"sampled at temperature {ctl.temperature:g}")
        return f"control: {ctl.of}'s {how}"
    if arm.kind != "train":
        return "no training" if arm.kind == "model" else f"weight-space ensemble, alpha {arm.alpha:g}"
    if c.objective in ("cpo", "cpo_ranked", "dpo"):
        how = ", fixed (made once)" if arm.offline_negatives else ""
        if c.negatives_model == "policy":
            how = f", from the policy (refresh every {c.negatives_refresh_steps})"
        seed = f", seed {c.seed}" if arm.seed_group else ""
        return f"{c.objective}, negatives {c.negatives}, K={c.num_negatives}{how}{seed}"
    if arm.seed_group:
        return f"{c.objective}, seed {c.seed}"
    if c.objective == "pss":
        return f"pss, p_gold {c.pss_p_gold}, passes {c.pss_passes}"
    return c.objective


def compute(run: GridRun, arm: ArmSpec) -> dict:
    """What the arm is and what each of its stages cost (the report's arms table)."""
    tr = run.train_done(arm) or {}
    gen = read_done(run.arm_dir(arm) / "generate") or {}
    neg = read_done(run.negatives_dir(arm)) or {} if arm.offline_negatives else {}
    ens = arm.kind in ("ensemble", "control")  # neither trains
    return {"kind": arm.kind, "summary": arm_summary(arm), "checkpoint": run.checkpoint(arm),
            "train_seconds": None if ens else tr.get("seconds"), "train_steps": None if ens else tr.get("steps"),
            "train_untimed_before_step": None if ens else tr.get("seconds_untimed_before_step"),
            "negatives_seconds": neg.get("seconds"),
            "ensemble_seconds": tr.get("seconds") if ens else None, "generate_seconds": gen.get("seconds"),
            "generations_copied_from": gen.get("reused_from"), "generated_tokens": gen.get("generated_tokens"),
            "evaluate_seconds": (read_done(run.arm_dir(arm) / "evaluate") or {}).get("seconds"),
            "paired_seconds": (read_done(run.arm_dir(arm) / "paired") or {}).get("seconds"),
            "seed_group": arm.seed_group, "seed": arm.config.seed if arm.seed_group else None}


def training_curves(run: GridRun, arm: ArmSpec) -> dict | None:
    """The arm's logged pairwise signal over steps and when its negatives became separated
    (:func:`seqcpo.training.separation.separation_onset`), and its quality curves; None without a log."""
    from seqcpo.grid.curves import curves_summary, quality_curves
    from seqcpo.training.separation import separation_onset

    if arm.kind != "train":
        return None
    try:
        history = json.loads((run.arm_dir(arm) / "log_history.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    curves = {k: [(int(r["step"]), float(r[k])) for r in history if isinstance(r.get(k), (int, float))]
              for k in CURVE_KEYS}
    quality = quality_curves(history)
    if not any(curves.values()) and not quality:
        return None
    return {"curves": curves, **separation_onset(history).as_dict(), "quality": quality,
            "quality_best_step": curves_summary(quality)}


def write_grid_report(run: GridRun, command: str) -> str:
    """Collect every evaluated arm's results into one results dict and write report.md, results.json and the
    plots into ``out_dir``; returns the report's path."""
    from seqcpo.evaluation.evaluate import results_header
    from seqcpo.evaluation.report import write_report

    grid = run.grid
    parts = {a.name: json.loads((run.arm_dir(a) / "evaluate" / "results.json").read_text("utf-8"))
             for a in grid.arms if read_done(run.arm_dir(a) / "evaluate") is not None}
    judge_stats: dict[str, int] = {}
    for part in parts.values():
        for k, v in (part.get("judge_stats") or {}).items():
            judge_stats[k] = judge_stats.get(k, 0) + v
    first = next((a for a in grid.arms if a.name in parts), grid.arms[0])
    pairs = {a.name: p for a in grid.arms if a.name in parts and (p := paired(run, a)) is not None}
    controls = {a.name: discrimination(pairs[a.name]["by_decoding"]) for a in grid.arms
                if a.kind == "control" and a.name in pairs}
    results = {
        "title": f"Grid `{grid.name}`", "command": command,
        **results_header(run.source(first).describe(), None, grid.eval),
        "judge": next((p["judge"] for p in parts.values() if p.get("judge")), None), "judge_stats": judge_stats,
        "runs": [r for p in parts.values() for r in p["runs"]],
        "head_to_head": [h for p in parts.values() for h in p["head_to_head"]],
        "grid": {"name": grid.name, "file": grid.path, "command": command, "out_dir": str(run.out),
                 "base": grid.base, "arms": {a.name: {"kind": a.kind, "overrides": a.overrides} for a in grid.arms},
                 "ensembles": [dataclasses.asdict(e) for e in grid.ensembles], "eval": dataclasses.asdict(grid.eval),
                 "compute": {a.name: compute(run, a) for a in grid.arms if a.name in parts},
                 "not_evaluated": [a.name for a in grid.arms if a.name not in parts], "paired": pairs,
                 "paired_settings": dataclasses.asdict(grid.paired), "seed_spread": seed_spreads(grid, parts),
                 "seed_spread_of_difference": difference_spreads(grid, pairs),
                 "training": {a.name: c for a in grid.arms if (c := training_curves(run, a)) is not None},
                 "controls": controls, "informative": informative(controls)},
    }
    results = write_report(results, run.out)
    _append_grid_sections(run, results, controls)
    return str(run.out / "report.md")


def _append_grid_sections(run: GridRun, results: dict, controls: dict) -> None:
    """The grid's own report sections after the common report: which metrics the controls show to be
    informative here, and quality over training steps (with ``quality.png``)."""
    from seqcpo.grid.controls import controls_markdown
    from seqcpo.grid.curves import curves_markdown, plot_quality
    from seqcpo.io import atomic_write_text

    training = results["grid"]["training"]
    lines = controls_markdown(controls, {a.name: a.control.of for a in run.grid.arms if a.kind == "control"})
    lines += curves_markdown(training)
    plot = plot_quality(training, run.out)
    if plot:
        lines += [f"![quality over steps]({plot})", ""]
    if lines:
        path = run.out / "report.md"
        atomic_write_text(path, path.read_text("utf-8").rstrip("\n") + "\n\n" + "\n".join(lines))


def seed_spreads(grid: GridConfig, parts: dict[str, dict]) -> dict[str, dict]:
    """``{group: {decoding: {metric: seed_spread}}}`` over the evaluated seeds of each ``seeds:`` arm."""
    from seqcpo.evaluation.paired import seed_spread

    out: dict[str, dict] = {}
    for group in dict.fromkeys(a.seed_group for a in grid.arms if a.seed_group):
        runs = [r for a in grid.arms if a.seed_group == group and a.name in parts for r in parts[a.name]["runs"]]
        for dec in dict.fromkeys(r["decoding"] for r in runs):
            rs = [r for r in runs if r["decoding"] == dec]
            out.setdefault(group, {})[dec] = {
                m: {**seed_spread([(r.get(m) or {}).get("score") if m == "mauve" else r.get(m) for r in rs]),
                    "arms": [r["label"] for r in rs]} for m in SPREAD_METRICS}
    return out


def difference_spreads(grid: GridConfig, pairs: dict[str, dict]) -> dict[str, dict]:
    """``{group: {"vs": baseline group, decoding: {metric: seed_spread}}}``: the paired difference of each
    seed of a ``seeds:`` arm against the baseline's arm of the same seed, spread over the seed pairs."""
    from seqcpo.evaluation.paired import seed_spread

    base = grid.arm(grid.eval.baseline) if grid.eval.baseline else None
    out: dict[str, dict] = {}
    if base is None or not base.seed_group:
        return out
    for group in dict.fromkeys(a.seed_group for a in grid.arms if a.seed_group and a.seed_group != base.seed_group):
        ps = [(a.name, pairs[a.name]) for a in grid.arms if a.seed_group == group and a.name in pairs]
        ps = [(n, p) for n, p in ps if grid.arm(p["vs"]).seed_group == base.seed_group]
        for dec in dict.fromkeys(d for _, p in ps for d in p["by_decoding"]):
            rows = [p["by_decoding"][dec] for _, p in ps if dec in p["by_decoding"]]
            out.setdefault(group, {"vs": base.seed_group, "pairs": [f"{n} - {p['vs']}" for n, p in ps]})[dec] = {
                m: seed_spread([r[m]["difference"] for r in rows if m in r]) for m in SPREAD_METRICS}
    return out
