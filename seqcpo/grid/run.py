"""``seqcpo reproduce GRID.yaml``: the order of a grid's stages, its plan (``--dry-run``) and its entry point.

Arms run in the file's order: each trained (or untrained) arm is trained, generated and evaluated; each control
right after its source (it decides which metrics count); each ensemble as soon as every arm of its two endpoints'
seed groups is trained; an arm is evaluated as soon as the baseline it meets head to head is. What is left is
evaluated last, the baseline first; then the paired bootstrap against the baseline and the report.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Sequence

from seqcpo.evaluation.config import check_judge
from seqcpo.grid.cache import read_done
from seqcpo.grid.evaluate import evaluate
from seqcpo.grid.generate import generate
from seqcpo.grid.inputs import check_inputs
from seqcpo.grid.report import arm_summary, write_grid_report
from seqcpo.grid.spec import ArmSpec, EnsembleSpec, GridError, load_grid
from seqcpo.grid.state import GridRun
from seqcpo.grid.train import interpolate, train, weights

logger = logging.getLogger("seqcpo")


def run_grid(grid_path: str | os.PathLike, only: Sequence[str] | None = None, dry_run: bool = False,
             weights: bool = False) -> str:
    """Run (or resume) a grid: train, generate and evaluate each arm, then write the report.

    Args:
        grid_path: the grid YAML (see :mod:`seqcpo.grid` and ``configs/*_grid.yaml``).
        only: run the stages of these arms only (arm names, an ensemble name for all its alphas, or a
            ``seeds:`` arm for all its seeds); the report still lists every arm evaluated so far.
        dry_run: print the plan (arms, what each trains, which stages are done) and run nothing.
        weights: also make the weights of trained arms whose stages are finished but whose checkpoint is not on
            this machine (retrained: the same weights on CPU), as an ensemble would; so two workers can each
            prepare one of an ensemble's endpoints (``--only mle --weights``, ``--only cpo --weights``). With
            ``only``, just the arms it names exactly: ``cpo`` is the first seed of a ``seeds:`` arm (its other
            seeds are selected but not retrained; name them, ``cpo.s1``, to make theirs); without, every trained arm.

    Returns:
        The path of ``report.md`` (not written by a dry run).
    """
    grid = load_grid(grid_path)
    names = [a.name for a in grid.arms]
    groups = {e.name for e in grid.ensembles} | {a.seed_group for a in grid.arms if a.seed_group}
    if only is not None and not only:
        raise GridError("--only: name at least one arm (without --only every arm runs)")
    unknown = [n for n in only or () if n not in names and n not in groups]
    if unknown:
        raise GridError(f"--only: {', '.join(unknown)} not in the grid (arms: {', '.join(names)})")
    selected = {a.name for a in grid.arms
                if not only or a.name in only or a.ensemble in only or a.seed_group in only}
    run = GridRun(grid, selected)
    command = " ".join(shlex.quote(c) for c in ["seqcpo", "reproduce", str(grid_path), *(["--only", *only] if only else [])])
    check_inputs(grid, write=not dry_run)  # a data file or model folder changed under a finished stage: refused
    if dry_run:
        print(plan(run, command))
        return str(grid.out_dir / "report.md")
    try:  # a judge that cannot work fails now, before any training
        check_judge(grid.eval.judge)
    except ValueError as e:
        raise GridError(f"{grid.path}: eval.judge: {e}") from None
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make = {a.name for a in grid.arms if a.kind == "train" and (not only or a.name in only)} if weights else set()
    _run_stages(run, command, make)
    path = write_grid_report(run, command)  # the paired bootstrap against the baseline (cached per arm), the report
    logger.info("grid %s: done in %.0f s; report %s", grid.name, time.perf_counter() - t0, path)
    return path


def _run_stages(run: GridRun, command: str, make_weights: set[str] = frozenset()) -> None:
    """Negatives (where fixed), train, generate and evaluate, arm by arm in the file's order; each control right
    after its source, each ensemble right after its endpoints; then every evaluation left, the baseline first."""
    grid, selected = run.grid, run.selected
    pending = list(grid.ensembles)
    for arm in grid.arms:
        if arm.kind not in ("train", "model"):
            continue
        if arm.name in selected:
            train(run, arm)
            if arm.name in make_weights:
                weights(run, arm)
            generate(run, arm)
            _evaluate_when_ready(run, arm, command)
        # a selected control runs even when its source is not selected (a control added to a finished grid, run
        # with --only): it uses the source's finished generations, or its weights (trained again if missing)
        for ctl in (a for a in grid.arms if a.kind == "control" and a.control.of == arm.name):
            if ctl.name in selected:
                generate(run, ctl)
                _evaluate_when_ready(run, ctl, command)
        _ensembles_when_ready(run, pending, command)
    _ensembles_when_ready(run, pending, command)
    for arm in sorted((a for a in grid.arms if a.name in selected), key=lambda a: a.name != grid.eval.baseline):
        evaluate(run, arm)  # finished evaluations are skipped


def _evaluate_when_ready(run: GridRun, arm: ArmSpec, command: str) -> None:
    """Evaluate now (and rewrite the report: a long grid has a current one) once the baseline, which the arm meets
    head to head, is evaluated; otherwise the last loop of :func:`_run_stages` does it."""
    base = run.baseline_for(arm)
    if base is None or read_done(run.arm_dir(base) / "evaluate") is not None:
        evaluate(run, arm)
        write_grid_report(run, command)


def _ensembles_when_ready(run: GridRun, pending: list[EnsembleSpec], command: str) -> None:
    """Interpolate, generate and evaluate each ensemble as soon as every arm of its two endpoints' seed groups is
    trained (the headline part of a grid finishes before the arms after it start)."""
    grid = run.grid
    for ens in list(pending):
        groups = {g for e in (ens.from_arm, ens.to_arm) for g in (e, grid.arm(e).seed_group) if g}
        ends = [a for a in grid.arms if a.kind == "train" and (a.name in groups or a.seed_group in groups)]
        if all(a.name not in run.selected or run.train_done(a) is not None for a in ends):
            pending.remove(ens)
            arms = [a for a in grid.arms if a.ensemble == ens.name and a.name in run.selected]
            if arms:
                interpolate(run, ens)
                for arm in arms:
                    generate(run, arm)
                    _evaluate_when_ready(run, arm, command)


def _status(run: GridRun, arm: ArmSpec) -> str:
    def state(fp, folder):
        d = read_done(folder)
        return "todo" if d is None else ("done" if d["fingerprint"] == fp(arm) else "redo")

    try:
        tr = "done" if run.train_done(arm) is not None else "todo"
    except GridError:
        tr = "CONFLICT"
    neg = f"negatives {state(run.train_fp, run.negatives_dir(arm))}, " if arm.offline_negatives else ""
    return (f"{neg}train {tr}, generate {state(run.generate_fp, run.arm_dir(arm) / 'generate')}, "
            f"evaluate {state(run.evaluate_fp, run.arm_dir(arm) / 'evaluate')}")


def plan(run: GridRun, command: str) -> str:
    """The dry run's text: every arm, what it trains, and the state of each of its stages."""
    g, ev = run.grid, run.grid.eval
    lines = [f"grid {g.name!r} from {g.path} -> {g.out_dir}/ (report {g.out_dir / 'report.md'})",
             f"command: {command}", "arms:"]
    for arm in g.arms:
        if arm.kind == "train":
            changed = {k: v for k, v in arm.overrides.items() if g.base.get(k, object()) != v}
            what = "train " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "(base config)")
        elif arm.kind == "model":
            what = f"no training: {arm.config.model_name_or_path}"
        elif arm.kind == "control":
            what = arm_summary(arm)
        else:
            ens = run.ensemble(arm)
            what = f"(1 - {arm.alpha:g}) * {ens.from_arm} + {arm.alpha:g} * {ens.to_arm}"
        mark = " " if arm.name in run.selected else "-"
        lines.append(f" {mark} {arm.name:24s} {what}\n     [{_status(run, arm)}]")
    lines.append(f"eval: {ev.split} split, {ev.num_examples or 'all'} examples, decoding {', '.join(ev.decoding)}, "
                 f"judge {ev.judge.backend}{' ' + ev.judge.model if ev.judge.model else ''}, MAUVE {ev.mauve}, "
                 f"baseline {ev.baseline}")
    if g.judge_arms is not None:
        lines.append(f"judged arms: {', '.join(g.judge_arms)} (and the baseline)")
    p = g.paired
    lines.append(f"paired bootstrap against {ev.baseline}: {p.resamples} resamples ({p.mauve_resamples} for "
                 f"MAUVE), {100 * p.confidence:g}% intervals")
    if run.selected != {a.name for a in g.arms}:
        lines.append("('-' = not selected by --only)")
    return "\n".join(lines)
