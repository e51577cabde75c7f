"""The grid's generate stage: an arm's continuations of the evaluation prompts under every decoding
(:func:`seqcpo.evaluation.evaluate.generate_model`), copied where the weights are an endpoint's, moved across
items for a shuffle control, looped for a loop control, sampled hot for a temperature control."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from seqcpo.grid.cache import cached_stage, is_current, read_done, write_done
from seqcpo.grid.controls import REWRITTEN_KINDS
from seqcpo.grid.spec import ArmSpec, GridError, decoding_configs
from seqcpo.grid.state import GridRun
from seqcpo.grid.train import weights
from seqcpo.io import atomic_write_json, atomic_write_jsonl

logger = logging.getLogger("seqcpo")


def generate(run: GridRun, arm: ArmSpec) -> dict:
    """``arms/NAME/generate/``: generations.jsonl, gold_ppl.json, done.json."""
    folder, fp = run.arm_dir(arm) / "generate", run.generate_fp(arm)
    return cached_stage(folder, fp, lambda: _generate(run, arm, folder, fp), f"{arm.name}: generate")


def _generate(run: GridRun, arm: ArmSpec, folder: Path, fp: str) -> dict:
    from seqcpo.evaluation.evaluate import generate_model

    end = identical_endpoint(run, arm)
    if end is not None:
        ckpt = run.checkpoint(arm)
        return _reuse(run, arm, end, folder, fp, lambda rows: [dict(r, model=arm.name, model_path=ckpt) for r in rows],
                      ckpt)
    if arm.kind == "control" and arm.control.kind in REWRITTEN_KINDS:
        return _rewritten(run, arm, folder, fp)
    ckpt = weights(run, arm)
    logger.info("grid: %s: generating from %s", arm.name, ckpt)
    source = run.source(arm)
    configs = decoding_configs(run.grid.eval, source.default_max_new_tokens())
    if arm.kind == "control":  # temperature: the source's weights, sampled hot under every decoding's name
        from seqcpo.grid.controls import temperature_configs

        configs = temperature_configs(configs, arm.control.temperature)
    t0 = time.perf_counter()
    try:
        g = generate_model(ckpt, arm.name, source, configs, folder / "generations.jsonl",
                           dataclasses.replace(run.grid.eval, mauve="none"))
    except ValueError as e:
        raise GridError(f"{run.grid.path}: arm {arm.name!r}: {e}") from None
    rows = [r for rs in g.rows.values() for r in rs]
    atomic_write_json(folder / "gold_ppl.json", g.ppl)
    return write_done(folder, "generate", fp, {
        "checkpoint": ckpt, "rows": len(rows), "examples": g.examples, "decoding": [c.name for c in configs],
        "seconds": round(time.perf_counter() - t0, 1), "generated_tokens": sum(r["num_tokens"] for r in rows)})


def identical_endpoint(run: GridRun, arm: ArmSpec) -> ArmSpec | None:
    """Alpha 0 and 1 are bit for bit the endpoint models: the endpoint, when its generations are current."""
    if arm.kind != "ensemble" or arm.alpha not in (0.0, 1.0):
        return None
    ens = run.ensemble(arm)
    end = run.grid.arm(ens.from_arm if arm.alpha == 0.0 else ens.to_arm)
    return end if is_current(run.arm_dir(end) / "generate", run.generate_fp(end)) else None


def _rewritten(run: GridRun, arm: ArmSpec, folder: Path, fp: str) -> dict:
    """A shuffle or loop control: its source's generations, moved to the next item or looped
    (seqcpo.grid.controls)."""
    from seqcpo.grid.controls import rewritten_rows

    src, kind = run.grid.arm(arm.control.of), arm.control.kind
    src_done = read_done(run.arm_dir(src) / "generate")
    if src_done is None or not is_current(run.arm_dir(src) / "generate", run.generate_fp(src)):
        # never built from stale rows: the control's fingerprint does not cover its source's generations
        state = "generated first" if src_done is None else "generated again (its generations are out of date)"
        raise GridError(f"{run.grid.path}: control {arm.name!r} needs arm {src.name!r} {state}: "
                        f"run with --only {src.name} {arm.name}")
    done = _reuse(run, arm, src, folder, fp, lambda rows: rewritten_rows(kind, rows, arm.name),
                  src_done["checkpoint"])
    logger.info("grid: %s: %s's continuations %s", arm.name, src.name,
                "moved across items" if kind == "shuffle" else "cut in half and looped")
    return done


def _reuse(run: GridRun, arm: ArmSpec, src: ArmSpec, folder: Path, fp: str, rewrite, ckpt: str) -> dict:
    """The finished generations of ``src``, rewritten row by row for ``arm`` (relabelled: generation is seeded per
    batch of example ids, not by the model label, so an endpoint's copy is exactly what generating again gives)."""
    from seqcpo.evaluation import read_generations

    src_folder = run.arm_dir(src) / "generate"
    src_done = read_done(src_folder)
    rows = rewrite(read_generations(src_folder / "generations.jsonl"))
    atomic_write_jsonl(folder / "generations.jsonl", rows)
    atomic_write_json(folder / "gold_ppl.json", json.loads((src_folder / "gold_ppl.json").read_text("utf-8")))
    if arm.kind == "ensemble":
        logger.info("grid: %s: generations copied from %s (identical weights)", arm.name, src.name)
    return write_done(folder, "generate", fp, {
        "checkpoint": ckpt, "rows": len(rows), "examples": src_done["examples"], "decoding": src_done["decoding"],
        "seconds": 0.0, "generated_tokens": src_done["generated_tokens"], "reused_from": src.name})
