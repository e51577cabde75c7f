"""The grid's scoring stages: evaluate (judge, metrics, head to head with the baseline, MiniLM features;
:func:`seqcpo.evaluation.evaluate.evaluate_model`) and paired (every paired difference against the arm's paired
baseline; :func:`seqcpo.evaluation.paired.compare_to_baseline`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from seqcpo.grid.cache import cached_stage, read_done, write_done
from seqcpo.grid.spec import ArmSpec, GridError, decoding_configs
from seqcpo.grid.state import GridRun
from seqcpo.io import atomic_write_json, atomic_write_jsonl

logger = logging.getLogger("seqcpo")


def evaluate(run: GridRun, arm: ArmSpec) -> dict:
    """``arms/NAME/evaluate/``: results.json (runs with per-item scores, head-to-head), judgments.jsonl,
    features.npz (MiniLM features of gold and generations, when MAUVE is on), done.json."""
    folder, fp = run.arm_dir(arm) / "evaluate", run.evaluate_fp(arm)
    return cached_stage(folder, fp, lambda: _evaluate(run, arm, folder, fp), f"{arm.name}: evaluate")


def _baseline_rows(run: GridRun, arm: ArmSpec):
    """``(name, rows by decoding, its judgments vs gold)`` of the arm's baseline, or None."""
    from seqcpo.evaluation.evaluate import rows_by_decoding

    base = run.baseline_for(arm)
    if base is not None and read_done(run.arm_dir(base) / "generate") is not None:
        judged = run.arm_dir(base) / "evaluate" / "judgments.jsonl"
        vs_gold = [json.loads(x) for x in judged.read_text("utf-8").splitlines()] if judged.is_file() else []
        return base.name, rows_by_decoding(run.arm_dir(base) / "generate" / "generations.jsonl"), vs_gold
    if base is not None:
        logger.warning("grid: %s: baseline %s has no generations yet; head-to-head left for a rerun",
                       arm.name, base.name)
    return None


def _evaluate(run: GridRun, arm: ArmSpec, folder: Path, fp: str) -> dict:
    from seqcpo.evaluation.evaluate import TextFeatures, evaluate_model, rows_by_decoding

    gen_folder = run.arm_dir(arm) / "generate"
    if read_done(gen_folder) is None:
        raise GridError(f"{run.grid.path}: arm {arm.name!r} has no finished generations to evaluate")
    logger.info("grid: %s: evaluating", arm.name)
    t0 = time.perf_counter()
    ev = run.grid.eval
    rows = rows_by_decoding(gen_folder / "generations.jsonl")
    features = TextFeatures(progress=ev.progress) if ev.mauve == "minilm" else None
    part, judgments = evaluate_model(
        arm.name, rows, [c for c in decoding_configs(ev, 1) if c.name in rows],
        json.loads((gen_folder / "gold_ppl.json").read_text("utf-8")), run.judge() if run.judged(arm) else None,
        ev, alpha=arm.alpha, baseline=_baseline_rows(run, arm), text_features=features)
    if features is not None:  # the MiniLM features of each item, for the paired MAUVE bootstrap
        save_features(folder / "features.npz", {
            f"{dec}/{side}": features([r[key] for r in rs])
            for dec, rs in rows.items() for side, key in (("gold", "reference"), ("model", "generation"))})
    atomic_write_json(folder / "results.json", part)
    atomic_write_jsonl(folder / "judgments.jsonl", judgments)
    return write_done(folder, "evaluate", fp, {"seconds": round(time.perf_counter() - t0, 1),
                                               "judged_items": len(judgments)})


def paired(run: GridRun, arm: ArmSpec) -> dict | None:
    """``{"vs": arm, "by_decoding": {decoding: {metric: PairedDifference dict}}}`` of ``arm`` minus its
    :meth:`~seqcpo.grid.state.GridRun.paired_baseline`, cached in ``arms/NAME/paired/``; None for the baseline
    itself or while either side is not evaluated. MAUVE resampling costs minutes, the rest seconds."""
    base = run.paired_baseline(arm)
    if base is None:
        return None
    if read_done(run.arm_dir(arm) / "evaluate") is None or read_done(run.arm_dir(base) / "evaluate") is None:
        return None
    folder = run.arm_dir(arm) / "paired"
    fp = run.paired_fp(arm, base)
    cached_stage(folder, fp, lambda: _paired(run, arm, base, folder, fp), f"{arm.name}: paired")
    return json.loads((folder / "paired.json").read_text("utf-8"))


def _paired(run: GridRun, arm: ArmSpec, base: ArmSpec, folder: Path, fp: str) -> dict:
    from seqcpo.evaluation.paired import compare_to_baseline

    logger.info("grid: %s: paired bootstrap against %s", arm.name, base.name)
    t0 = time.perf_counter()
    sides = {x.name: _scored(run, x) for x in (arm, base)}
    p = run.grid.paired
    out = {"vs": base.name, "by_decoding": {
        dec: compare_to_baseline(sides[arm.name][dec], sides[base.name][dec], p.resamples, p.mauve_resamples,
                                 p.seed, p.confidence)
        for dec in sides[arm.name] if dec in sides[base.name]}}
    atomic_write_json(folder / "paired.json", out)
    return write_done(folder, "paired", fp, {"seconds": round(time.perf_counter() - t0, 1)})


def _scored(run: GridRun, arm: ArmSpec) -> dict[str, dict]:
    """Per decoding: the arm's per-item scores, texts and (MAUVE) features, rows in per-item order."""
    from seqcpo.evaluation.evaluate import rows_by_decoding

    ev = run.arm_dir(arm) / "evaluate"
    runs = json.loads((ev / "results.json").read_text("utf-8"))["runs"]
    rows = rows_by_decoding(run.arm_dir(arm) / "generate" / "generations.jsonl")
    feats = load_features(ev / "features.npz")
    out = {}
    for r in runs:
        if "per_item" not in r:
            raise GridError(f"{ev / 'results.json'}: no per-item scores (made by an older seqcpo); delete "
                            f"{ev} to score {arm.name!r} again")
        dec = r["decoding"]
        out[dec] = {"per_item": r["per_item"], "texts": [x["generation"] for x in rows[dec]],
                    "gold_features": feats.get(f"{dec}/gold"), "features": feats.get(f"{dec}/model")}
    return out


def save_features(path: Path, arrays: dict) -> None:
    """``{name: array}`` as float32 arrays in one ``.npz``, written atomically."""
    import io

    import numpy as np

    from seqcpo.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_features(path: Path) -> dict:
    import numpy as np

    if not path.is_file():
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
