"""``seqcpo reproduce GRID.yaml``: a grid of arms (train, generate, evaluate) and one report, resumable.

A grid file::

    name: smollm2                      # shown in the report
    out_dir: runs/smollm2_grid         # relative to the working directory
    base: {model_name_or_path: smollm2-135m, dataset: wiki, max_steps: 20, ...}   # SeqCPOConfig fields for all arms
    arms:                              # name -> SeqCPOConfig overrides, in the order they run
      base: {train: false}             # no training: evaluate model_name_or_path as it is
      mle: {objective: mle, seeds: [0, 1, 2]}                 # arms mle (seed 0), mle.s1, mle.s2
      cpo_tnr: {objective: cpo_ranked, negatives: tn}
      cpo_anr: {objective: cpo_ranked, negatives: an, offline_negatives: true}   # `seqcpo negatives` first
    ensembles:                         # optional weight-space ensembles of two trained arms
      - {from: mle, to: cpo_tnr, alphas: [0, 0.5, 1]}       # arms "mle~cpo_tnr@0", "@0.5", "@1"
    eval:                              # EvalConfig fields (seqcpo.evaluation.config), all optional
      split: test
      num_examples: 64
      decoding: [greedy]               # specs of seqcpo.evaluation.parse_decoding
      judge: {backend: local, model: smollm2-135m, debias: true, tie_margin: 0.0}   # every JudgeConfig field
      mauve: minilm                    # minilm | none
      baseline: mle                    # the arm every other arm meets head to head and is paired with
    judge_arms: [cpo_tnr]              # optional: only these arms (and the baseline) meet the judge
    paired: {resamples: 1000, mauve_resamples: 200, seed: 0, confidence: 0.95}   # bootstrap against baseline

Layout of ``out_dir`` (every stage ends by writing its ``done.json`` atomically; a stage whose ``done.json``
exists and whose inputs have not changed is skipped, so an interrupted grid resumes where it stopped)::

    negatives/NAME/            fixed negatives of an ``offline_negatives`` arm (``seqcpo negatives``) + done.json
    arms/NAME/                 training output_dir (final/, log_history.json, checkpoints) + done.json
    arms/NAME/generate/        generations.jsonl, gold_ppl.json, done.json
    arms/NAME/evaluate/        results.json (runs with per-item scores, head-to-head), judgments.jsonl,
                               features.npz (MiniLM features of gold and generations), done.json
    arms/NAME/paired/          paired.json: every paired difference against the baseline + done.json
    ensembles/FROM~TO/         alpha-*/ checkpoints + done.json
    judge_cache/               verdicts, shared by all arms
    report.md, results.json    arms, claims (paired differences), seed spread, separation; winrate.png,
                               mauve.png, alpha_sweep.png, separation.png (rewritten after every evaluated arm)

Inputs of each stage are fingerprinted (the arm's merged config; the generation and scoring fields of the
eval config). A changed training config is an error (delete ``arms/NAME`` to retrain); changed generation or
evaluation options redo that stage and the ones after it. This module holds the grid schema, the stage cache
and the order of stages only: generating, judging and scoring are :mod:`seqcpo.evaluation.evaluate`'s, the
report :func:`seqcpo.evaluation.report.write_report`'s.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from seqcpo.config_loader import ConfigError, check_output_dir, coerce, read_yaml, resolve, unknown_key_error
from seqcpo.evaluation.config import EvalConfig, check_judge
from seqcpo.grid.controls import ControlSpec, discrimination, informative, parse_controls
from seqcpo.io import atomic_write_json, atomic_write_jsonl
from seqcpo.training.config import load_config

logger = logging.getLogger("seqcpo")

GRID_KEYS = ("name", "out_dir", "base", "arms", "ensembles", "controls", "eval", "judge_arms", "paired")
PAIRED_KEYS = {"resamples": 1000, "mauve_resamples": 200, "seed": 0, "confidence": 0.95}
# how the paired stage computes its intervals: a change redoes every paired stage (they are cheap)
PAIRED_METHOD = "per-item percentile; set-level half-sampling"
# bump when the evaluate stage writes something new (per-item scores, features): old stages are redone
EVALUATE_VERSION = 2
# EvalConfig fields a grid sets itself (from its arms), and its own defaults for two others
GRID_SETS_EVAL = ("models", "labels", "alphas", "head_to_head", "out", "data_config")
GRID_EVAL_DEFAULTS = {"baseline": "mle", "progress": False}
_NAME = re.compile(r"^[A-Za-z0-9_.+~-]+$")
# Checked against this machine's hardware by TrainingArguments; a GPU grid must dry-run on a laptop.
_HOST_FLAGS = {"bf16": False, "fp16": False, "tf32": None, "use_cpu": True}


class GridError(ConfigError):
    """A bad grid file or an inconsistent grid folder; the message names the file and the key."""


# ----------------------------------------------------------------------------- the grid file


@dataclasses.dataclass
class Arm:
    """One row of the report: ``kind`` "train" (trained here), "model" (``train: false``: the configured model
    as it is) or "ensemble" (``alpha`` of ensemble ``ensemble``); ``overrides``: base + arm fields."""

    name: str
    kind: str
    overrides: dict[str, Any]
    ensemble: str | None = None
    alpha: float | None = None
    seed_group: str | None = None  # the arm as written in the grid file, when ``seeds:`` expanded it
    offline_negatives: bool = False  # negatives made once before training (`seqcpo negatives`), then fixed
    control: ControlSpec | None = None  # kind "control": a degraded copy of arm ``control.of`` (seqcpo.grid.controls)


@dataclasses.dataclass
class Ensemble:
    name: str
    from_arm: str
    to_arm: str
    alphas: list[float]


@dataclasses.dataclass
class Grid:
    path: str
    name: str
    out_dir: Path
    base: dict[str, Any]
    arms: list[Arm]
    ensembles: list[Ensemble]
    eval: EvalConfig
    judge_arms: list[str] | None = None  # None: the judge scores every arm
    paired: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(PAIRED_KEYS))

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _unknown(where: str, keys, allowed) -> None:
    for k in keys:
        if k not in allowed:
            raise GridError(f"{unknown_key_error(where, k, allowed, noun='key')}; allowed: {', '.join(allowed)}")


def _mapping(where: str, value, what: str) -> dict:
    if not isinstance(value or {}, dict):
        raise GridError(f"{where}: expected a mapping of {what}")
    return dict(value or {})


def ensemble_arm_name(ensemble: str, alpha: float) -> str:
    """``mle~cpo_tnr@0.5``."""
    return f"{ensemble}@{alpha:g}"


def seed_arm_name(name: str, seed: int, first: bool) -> str:
    """The arm of one training seed: the first listed seed keeps the plain name (what ``baseline`` and
    ensembles refer to), the others are ``NAME.sSEED``."""
    return name if first else f"{name}.s{seed}"


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid YAML (every arm's config is built once, so a typo fails before any training)."""
    where = str(path)
    try:
        raw = read_yaml(path)
        _unknown(where, raw, GRID_KEYS)
        for key in ("out_dir", "arms"):
            if key not in raw:
                raise GridError(f"{where}: missing {key!r}")
        base = _mapping(f"{where}: base", raw.get("base"), "SeqCPOConfig fields")
        arms_raw = _mapping(f"{where}: arms", raw["arms"], "name -> overrides")
        if not arms_raw:
            raise GridError(f"{where}: 'arms' must be a non-empty mapping of name -> overrides")
        out_dir = Path(str(raw["out_dir"]))
        check_output_dir(out_dir, f"{where}: out_dir")
        arms: list[Arm] = []
        for name, over in arms_raw.items():
            name, over = str(name), _mapping(f"{where}: arms.{name}", over, "SeqCPOConfig fields")
            for key, bad in (("output_dir", "output_dir" in {**base, **over}), ("name", not _NAME.match(name))):
                if bad:
                    raise GridError(f"{where}: arms.{name}: {key} is set by the grid (out_dir/arms/NAME; names "
                                    "use letters, digits and _ . + ~ -)")
            w = f"{where}: arms.{name}"
            trained = coerce("train", over.pop("train", True), bool, w)
            offline = coerce("offline_negatives", over.pop("offline_negatives", False), bool, w)
            seeds = over.pop("seeds", None)
            if seeds is not None:
                seeds = coerce("seeds", seeds, list[int], w)
                if not seeds or len(set(seeds)) != len(seeds) or "seed" in over or not trained:
                    raise GridError(f"{w}.seeds: give distinct training seeds (a list of integers) to a trained arm "
                                    "that sets no 'seed' of its own")
            if offline and "negatives_path" in {**base, **over}:
                raise GridError(f"{w}: offline_negatives makes negatives_path (out_dir/negatives/NAME); drop one")
            for i, sd in enumerate(seeds or [None]):
                arm_name = name if sd is None else seed_arm_name(name, sd, i == 0)
                merged = {**base, **over, **({} if sd is None else {"seed": sd})}
                if offline:
                    merged["negatives_path"] = str(out_dir / "negatives" / arm_name)
                try:  # check the fields now, not hours later (mixed precision is checked on the machine that trains)
                    cfg = load_config(None, {**merged, **_HOST_FLAGS, "output_dir": str(out_dir / "arms" / arm_name)},
                                      where=f"arms.{name}")
                except ConfigError as e:
                    raise GridError(f"{where}: arm {arm_name!r}: {e}") from None
                if offline and not cfg.uses_negatives:
                    raise GridError(f"{w}.offline_negatives: objective {cfg.objective} uses no negatives")
                arms.append(Arm(arm_name, "train" if trained else "model", merged,
                                seed_group=None if sd is None else name, offline_negatives=offline))
        ensembles = _ensembles(where, raw.get("ensembles") or [], arms)
        try:
            controls = parse_controls(where, raw.get("controls"), [a.name for a in arms])
        except ValueError as e:
            raise GridError(str(e)) from None
        arms += [Arm(c.name, "control", next(a for a in arms if a.name == c.of).overrides, control=c)
                 for c in controls]
        names = [a.name for a in arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GridError(f"{where}: arm names must be unique; repeated: {', '.join(dup)}")
        ev = _eval_config(where, _mapping(f"{where}: eval", raw.get("eval"), "EvalConfig fields"), names)
        judge_arms = raw.get("judge_arms")
        if judge_arms is not None:
            judge_arms = coerce("judge_arms", judge_arms, list[str], where)
            bad = [n for n in judge_arms if n not in names]
            if bad:
                raise GridError(f"{where}: judge_arms: {', '.join(bad)} not arms of the grid ({', '.join(names)})")
        paired = _mapping(f"{where}: paired", raw.get("paired"), "bootstrap settings")
        _unknown(f"{where}: paired", paired, tuple(PAIRED_KEYS))
        paired = {k: coerce(k, paired.get(k, d), type(d), f"{where}: paired") for k, d in PAIRED_KEYS.items()}
        if paired["resamples"] < 1 or paired["mauve_resamples"] < 0 or not 0 < paired["confidence"] < 1:
            raise GridError(f"{where}: paired: resamples >= 1, mauve_resamples >= 0 (0 = no MAUVE interval), "
                            f"confidence in (0, 1); got {paired}")
    except GridError:
        raise
    except ConfigError as e:
        raise GridError(str(e)) from None
    return Grid(where, str(raw.get("name") or Path(where).stem), out_dir, base, arms, ensembles, ev, judge_arms,
                paired)


def _ensembles(where: str, specs, arms: list[Arm]) -> list[Ensemble]:
    """The ``ensembles:`` list; each adds one arm per alpha (after its two trained endpoints)."""
    out: list[Ensemble] = []
    trained = {a.name: a for a in arms if a.kind == "train"}
    for i, spec in enumerate(specs):
        w = f"{where}: ensembles[{i}]"
        spec = _mapping(w, spec, "from, to, alphas")
        _unknown(w, spec, ("from", "to", "alphas", "name"))
        for key in ("from", "to"):
            if spec.get(key) not in trained:
                raise GridError(f"{w}.{key}: {spec.get(key)!r} is not a trained arm ({', '.join(sorted(trained))})")
        alphas = coerce("alphas", spec.get("alphas", [0, 0.5, 1]), list[float], w)
        ens = Ensemble(str(spec.get("name") or f"{spec['from']}~{spec['to']}"), spec["from"], spec["to"], alphas)
        if not _NAME.match(ens.name):
            raise GridError(f"{w}.name: {ens.name!r}: use letters, digits and _ . + ~ - only")
        out.append(ens)
        arms += [Arm(ensemble_arm_name(ens.name, a), "ensemble", trained[ens.from_arm].overrides, ens.name, a)
                 for a in alphas]
    return out


def _eval_config(where: str, ev_raw: dict, names: list[str]) -> EvalConfig:
    """The ``eval:`` block as an :class:`EvalConfig` (the grid's defaults under it)."""
    _unknown(f"{where}: eval", ev_raw, [f.name for f in dataclasses.fields(EvalConfig) if f.name not in GRID_SETS_EVAL])
    if "mauve" in ev_raw and ev_raw["mauve"] in (False, None):
        ev_raw["mauve"] = "none"
    try:
        ev = EvalConfig(**resolve(EvalConfig, [("defaults", GRID_EVAL_DEFAULTS), (f"{where}: eval", ev_raw)]))
    except ConfigError as e:
        raise GridError(str(e) if str(e).startswith(where) else f"{where}: eval: {e}") from None
    if ev.mauve == "model":
        raise GridError(f"{where}: eval.mauve: choose minilm or none (a grid scores arms after their model is gone)")
    if ev.baseline is not None and ev.baseline not in names:
        raise GridError(f"{where}: eval.baseline {ev.baseline!r} is not an arm ({', '.join(names)})")
    try:
        _decoding_configs(ev, 64)
    except ValueError as e:
        raise GridError(f"{where}: eval.decoding: {e}") from None
    return ev


def data_config(overrides: dict[str, Any]):
    """The :class:`seqcpo.data.DataConfig` part of an arm's fields (no TrainingArguments, no hardware checks)."""
    from seqcpo.data import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in overrides.items() if k in names})


def _decoding_configs(ev: EvalConfig, default_max_new_tokens: int):
    from seqcpo.evaluation.evaluate import decoding_configs

    return decoding_configs(ev, default_max_new_tokens)


# ----------------------------------------------------------------------------- the stage cache


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value (the inputs of a stage)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Fields that decide what a run logs, saves or shows, never its weights (training is deterministic on CPU and these
# leave every random draw alone: tests/test_quality.py, tests/test_training.py). They are left out of the training
# fingerprint so that a finished arm stays finished when they change. FROZEN for the resolving grid: a change to
# this list or to what train_fp hashes changes finished arms' fingerprints and must say so in its commit.
BOOKKEEPING_FIELDS = frozenset({
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "run_name", "report_to",
    "disable_tqdm", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "eval_strategy", "eval_steps", "per_device_eval_batch_size", "dataloader_num_workers",
    "quality_examples", "quality_split", "quality_embeddings", "quality_samples",
})


MODEL_FIELDS = ("model_name_or_path", "model_dtype", "trust_remote_code", "attn_implementation")


def weight_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """An arm's fields less :data:`BOOKKEEPING_FIELDS`: what its trained weights depend on.

    >>> weight_fields({"learning_rate": 1e-5, "logging_steps": 5, "eval_steps": 50})
    {'learning_rate': 1e-05}
    """
    return {k: v for k, v in overrides.items() if k not in BOOKKEEPING_FIELDS}


def non_default_fields(obj) -> dict[str, Any]:
    """A dataclass's fields that differ from their defaults: a fingerprint of it stays the same when a later
    version adds a field (at its default), and changes when a value or a default that applies changes."""
    out = {}
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(obj, f.name)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING or value != default:
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def scoring_key(ev: EvalConfig) -> dict:
    """What decides the scores of given generations (the evaluate stage's fingerprint; frozen like
    :data:`BOOKKEEPING_FIELDS`)."""
    return {"judge": non_default_fields(ev.judge), "order": ev.order, "order_seed": ev.order_seed, "mauve": ev.mauve,
            "baseline": ev.baseline}


def read_done(folder: Path) -> dict | None:
    """The stage's ``done.json``, or None when the stage has not finished."""
    try:
        return json.loads((folder / "done.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_done(folder: Path, stage: str, fp: str, info: dict) -> dict:
    done = {"stage": stage, "fingerprint": fp, "finished_utc": _now(), **info}
    atomic_write_json(folder / "done.json", done)
    return done


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Runner:
    """Runs the stages of one grid in order; holds the judge (built once, when the first evaluation needs it)."""

    def __init__(self, grid: Grid, selected: set[str]):
        self.grid, self.selected, self.out = grid, selected, grid.out_dir
        self._judge, self._judge_built = None, False

    def arm_dir(self, arm: Arm) -> Path:
        return self.out / "arms" / arm.name

    def ensemble_dir(self, name: str) -> Path:
        return self.out / "ensembles" / name

    def _ensemble(self, arm: Arm) -> Ensemble:
        return next(e for e in self.grid.ensembles if e.name == arm.ensemble)

    # ---- stage 1: train (or resolve the checkpoint, or interpolate an ensemble)
    def train_fp(self, arm: Arm) -> str:
        """What the arm's weights depend on: its config, or (ensembles) both endpoints and its alpha."""
        if arm.kind == "ensemble":
            ens = self._ensemble(arm)
            return fingerprint(["ensemble", self.train_fp(self.grid.arm(ens.from_arm)),
                                self.train_fp(self.grid.arm(ens.to_arm)), arm.alpha])
        if arm.kind == "control":
            c = arm.control
            return fingerprint(["control", self.train_fp(self.grid.arm(c.of)), c.kind, c.temperature])
        if arm.kind == "model":  # untrained: only the model and its dtype decide its weights
            return fingerprint(["model", {k: arm.overrides[k] for k in MODEL_FIELDS if k in arm.overrides}])
        return fingerprint([arm.kind, weight_fields(arm.overrides)]
                           + (["offline_negatives"] if arm.offline_negatives else []))

    def negatives_dir(self, arm: Arm) -> Path:
        return self.out / "negatives" / arm.name

    def negatives(self, arm: Arm) -> dict | None:
        """Stage 0 of an ``offline_negatives`` arm: ``seqcpo negatives`` with the arm's own config, once
        (the folder resumes by itself; its settings must match the arm's, which the trainer checks)."""
        if not arm.offline_negatives:
            return None
        folder, fp = self.negatives_dir(arm), self.train_fp(arm)
        done = read_done(folder)
        if done is not None and done["fingerprint"] == fp and any(folder.glob("*.parquet")):
            logger.info("grid: %s: negatives made already, skipped", arm.name)
            return done
        from seqcpo.training import run as training_run

        logger.info("grid: %s: making fixed negatives into %s", arm.name, folder)
        cfg = load_config(None, {**arm.overrides, "output_dir": str(self.arm_dir(arm))}, where=f"arms.{arm.name}")
        t0 = time.perf_counter()
        made = training_run.make_negatives(cfg, str(folder))
        return write_done(folder, "negatives", fp, {"seconds": round(time.perf_counter() - t0, 1),
                                                    "examples": made["examples"], "shards": made["shards"]})

    def ensemble_fp(self, ens: Ensemble) -> str:
        return fingerprint([self.train_fp(self.grid.arm(ens.from_arm)), self.train_fp(self.grid.arm(ens.to_arm)),
                            ens.alphas])

    def train_done(self, arm: Arm) -> dict | None:
        """The finished training (or ensemble) stage of ``arm``, or None (a control: its source's)."""
        if arm.kind == "control":
            return self.train_done(self.grid.arm(arm.control.of))
        folder = self.ensemble_dir(arm.ensemble) if arm.kind == "ensemble" else self.arm_dir(arm)
        done = read_done(folder)
        expected = self.ensemble_fp(self._ensemble(arm)) if arm.kind == "ensemble" else self.train_fp(arm)
        if done is None or done["fingerprint"] == expected:
            return done
        if arm.kind != "train":
            return None  # cheap: interpolate (or resolve the untrained model) again
        raise GridError(f"{self.grid.path}: arm {arm.name!r} was trained with another config than the grid now gives "
                        f"({folder / 'done.json'}); delete {folder} to retrain it, or set another out_dir")

    def train(self, arm: Arm, force: bool = False) -> dict:
        done = self.train_done(arm)
        if done is not None and not force:
            logger.info("grid: %s: trained already (%s), skipped", arm.name, done["finished_utc"])
            return done
        folder = self.arm_dir(arm)
        if arm.kind == "model":
            from seqcpo.models import resolve_model_path

            ckpt = resolve_model_path(arm.overrides.get("model_name_or_path", "smollm2-135m"))
            return write_done(folder, "train", self.train_fp(arm),
                              {"checkpoint": ckpt, "steps": 0, "seconds": 0.0, "train_loss": None, "trained": False})
        from seqcpo.training import run as training_run

        self.negatives(arm)
        overrides = {**arm.overrides, "output_dir": str(folder)}
        if any(folder.glob("checkpoint-*")) and "resume_from_checkpoint" not in overrides:
            overrides["resume_from_checkpoint"] = "auto"  # an interrupted run: resume it (afresh if all are torn)
        logger.info("grid: %s: training", arm.name)
        result = training_run.train(load_config(None, overrides, where=f"arms.{arm.name}"))
        info = {"checkpoint": result["final_checkpoint"], "steps": result["steps"], "seconds": result["seconds"],
                "train_loss": result["train_loss"], "trained": True, "examples": result["examples"]}
        del result
        gc.collect()
        return write_done(folder, "train", self.train_fp(arm), info)

    def interpolate(self, ens: Ensemble, force: bool = False) -> dict:
        from seqcpo.ensemble import interpolate_checkpoints

        done = self.train_done(next(a for a in self.grid.arms if a.ensemble == ens.name))
        if done is not None and not force:
            logger.info("grid: ensemble %s: written already, skipped", ens.name)
            return done
        ends = {}
        for key in (ens.from_arm, ens.to_arm):
            if self.train_done(self.grid.arm(key)) is None:
                raise GridError(f"{self.grid.path}: ensemble {ens.name!r} needs arm {key!r} trained first; "
                                f"run it too (--only {key} ...)")
            ends[key] = self.weights(self.grid.arm(key))
        t0 = time.perf_counter()
        paths = interpolate_checkpoints(ends[ens.from_arm], ends[ens.to_arm], ens.alphas, self.ensemble_dir(ens.name))
        return write_done(self.ensemble_dir(ens.name), "ensemble", self.ensemble_fp(ens), {
            "checkpoints": {f"{a:g}": p for a, p in zip(ens.alphas, paths)}, "from": ends[ens.from_arm],
            "to": ends[ens.to_arm], "seconds": round(time.perf_counter() - t0, 1)})

    def checkpoint(self, arm: Arm) -> str:
        """The arm's weights as recorded by its finished stage (a path that may not exist on this machine:
        committed outputs travel without weights; :meth:`weights` makes them again)."""
        if arm.kind == "control":
            return self.checkpoint(self.grid.arm(arm.control.of))
        done = self.train_done(arm)
        if done is None:
            raise GridError(f"{self.grid.path}: arm {arm.name!r} has no checkpoint yet")
        return done["checkpoints"][f"{arm.alpha:g}"] if arm.kind == "ensemble" else done["checkpoint"]

    def weights(self, arm: Arm) -> str:
        """The arm's checkpoint folder, made again when its stage finished elsewhere (a fresh clone holds the
        committed outputs, never weights): a trained arm is retrained (deterministic on CPU: the same weights),
        an ensemble re-interpolated, the untrained model resolved again."""
        if arm.kind == "control":
            return self.weights(self.grid.arm(arm.control.of))
        if arm.kind == "model":
            from seqcpo.models import resolve_model_path

            return resolve_model_path(arm.overrides.get("model_name_or_path", "smollm2-135m"))
        path = self.checkpoint(arm)
        if _has_weights(path):
            return path
        if arm.kind == "ensemble":
            ens = self._ensemble(arm)
            logger.info("grid: %s: ensemble weights not on this machine: interpolating again", arm.name)
            self.interpolate(ens, force=True)
        else:
            logger.info("grid: %s: weights not on this machine (only the stage's committed outputs are): training "
                        "again, which gives the same weights on CPU", arm.name)
            self.train(arm, force=True)
        return self.checkpoint(arm)

    # ---- stage 2: generate
    def generate_fp(self, arm: Arm) -> str:
        return fingerprint([self.train_fp(arm), self.grid.eval.generation_key(),
                            non_default_fields(data_config(arm.overrides))])

    def source(self, arm: Arm):
        from seqcpo.evaluation.evaluate import ExampleSource

        return ExampleSource(data_config(arm.overrides), self.grid.eval.split, self.grid.eval.num_examples)

    def generate(self, arm: Arm) -> dict:
        from seqcpo.evaluation.evaluate import generate_model

        folder, fp = self.arm_dir(arm) / "generate", self.generate_fp(arm)
        done = read_done(folder)
        if done is not None and done["fingerprint"] == fp:
            logger.info("grid: %s: generated already, skipped", arm.name)
            return done
        end = self._identical_endpoint(arm)
        if end is not None:
            return self._copy_generations(arm, end, folder, self.checkpoint(arm), fp)
        if arm.kind == "control" and arm.control.kind == "shuffle":
            return self._shuffled_generations(arm, folder, fp)
        ckpt = self.weights(arm)
        logger.info("grid: %s: generating from %s", arm.name, ckpt)
        source = self.source(arm)
        configs = _decoding_configs(self.grid.eval, source.default_max_new_tokens())
        if arm.kind == "control":  # temperature: the source's weights, sampled hot under every decoding's name
            from seqcpo.grid.controls import temperature_configs

            configs = temperature_configs(configs, arm.control.temperature)
        t0 = time.perf_counter()
        try:
            g = generate_model(ckpt, arm.name, source, configs, folder / "generations.jsonl",
                               dataclasses.replace(self.grid.eval, mauve="none"))
        except ValueError as e:
            raise GridError(f"{self.grid.path}: arm {arm.name!r}: {e}") from None
        rows = [r for rs in g.rows.values() for r in rs]
        atomic_write_json(folder / "gold_ppl.json", g.ppl)
        return write_done(folder, "generate", fp, {
            "checkpoint": ckpt, "rows": len(rows), "examples": g.examples, "decoding": [c.name for c in configs],
            "seconds": round(time.perf_counter() - t0, 1), "generated_tokens": sum(r["num_tokens"] for r in rows)})

    def _shuffled_generations(self, arm: Arm, folder: Path, fp: str) -> dict:
        """A shuffle control: its source's generations, each moved to the next item (seqcpo.grid.controls)."""
        from seqcpo.evaluation import read_generations
        from seqcpo.grid.controls import shuffled_rows

        src = self.grid.arm(arm.control.of)
        src_folder = self.arm_dir(src) / "generate"
        src_done = read_done(src_folder)
        if src_done is None:
            raise GridError(f"{self.grid.path}: control {arm.name!r} needs arm {src.name!r} generated first")
        rows = shuffled_rows(read_generations(src_folder / "generations.jsonl"), arm.name)
        atomic_write_jsonl(folder / "generations.jsonl", rows)
        atomic_write_json(folder / "gold_ppl.json", json.loads((src_folder / "gold_ppl.json").read_text("utf-8")))
        logger.info("grid: %s: %s's continuations moved across items", arm.name, src.name)
        return write_done(folder, "generate", fp, {
            "checkpoint": src_done["checkpoint"], "rows": len(rows), "examples": src_done["examples"],
            "decoding": src_done["decoding"], "seconds": 0.0, "generated_tokens": src_done["generated_tokens"],
            "reused_from": src.name})

    def _identical_endpoint(self, arm: Arm) -> Arm | None:
        """Alpha 0 and 1 are bit for bit the endpoint models: the endpoint, when its generations are current."""
        if arm.kind != "ensemble" or arm.alpha not in (0.0, 1.0):
            return None
        ens = self._ensemble(arm)
        end = self.grid.arm(ens.from_arm if arm.alpha == 0.0 else ens.to_arm)
        done = read_done(self.arm_dir(end) / "generate")
        return end if done is not None and done["fingerprint"] == self.generate_fp(end) else None

    def _copy_generations(self, arm: Arm, end: Arm, folder: Path, ckpt: str, fp: str) -> dict:
        """The endpoint's generations relabelled: generation is seeded per batch of example ids (not by the
        model label), so the copy is exactly what generating again would give."""
        from seqcpo.evaluation import read_generations

        end_folder = self.arm_dir(end) / "generate"
        end_done = read_done(end_folder)
        rows = [dict(r, model=arm.name, model_path=ckpt) for r in read_generations(end_folder / "generations.jsonl")]
        atomic_write_jsonl(folder / "generations.jsonl", rows)
        atomic_write_json(folder / "gold_ppl.json", json.loads((end_folder / "gold_ppl.json").read_text("utf-8")))
        logger.info("grid: %s: generations copied from %s (identical weights)", arm.name, end.name)
        return write_done(folder, "generate", fp, {
            "checkpoint": ckpt, "rows": len(rows), "examples": end_done["examples"], "decoding": end_done["decoding"],
            "seconds": 0.0, "generated_tokens": end_done["generated_tokens"], "reused_from": end.name})

    # ---- stage 3: evaluate
    def judge(self):
        """The pairwise judge of ``eval.judge``, built at first use (a local judge loads a model)."""
        if not self._judge_built:
            from seqcpo.evaluation.config import make_judge

            try:
                self._judge = make_judge(self.grid.eval.judge, str(self.out / "judge_cache"))
            except ValueError as e:
                raise GridError(f"{self.grid.path}: eval.judge: {e}") from None
            self._judge_built = True
        return self._judge

    def evaluate_fp(self, arm: Arm) -> str:
        base = self._baseline_for(arm)
        base_gen = read_done(self.arm_dir(base) / "generate") if base is not None else None
        return fingerprint([self.generate_fp(arm), scoring_key(self.grid.eval),
                            base_gen["fingerprint"] if base_gen else None, self.judged(arm), EVALUATE_VERSION])

    def judged(self, arm: Arm) -> bool:
        """Whether the judge scores this arm (``judge_arms``; the baseline too, so head-to-heads pair)."""
        if self.grid.eval.judge.backend == "none":
            return False
        ja = self.grid.judge_arms
        return ja is None or arm.name in ja or arm.name == self.grid.eval.baseline

    def _baseline_for(self, arm: Arm) -> Arm | None:
        b = self.grid.eval.baseline
        if b is None or b == arm.name or not self.judged(arm):
            return None
        return self.grid.arm(b)

    def evaluate(self, arm: Arm) -> dict:
        from seqcpo.evaluation.evaluate import TextFeatures, evaluate_model, rows_by_decoding

        folder, fp = self.arm_dir(arm) / "evaluate", self.evaluate_fp(arm)
        done = read_done(folder)
        if done is not None and done["fingerprint"] == fp:
            logger.info("grid: %s: evaluated already, skipped", arm.name)
            return done
        gen_folder = self.arm_dir(arm) / "generate"
        if read_done(gen_folder) is None:
            raise GridError(f"{self.grid.path}: arm {arm.name!r} has no finished generations to evaluate")
        logger.info("grid: %s: evaluating", arm.name)
        t0 = time.perf_counter()
        rows = rows_by_decoding(gen_folder / "generations.jsonl")
        baseline = None
        base = self._baseline_for(arm)
        if base is not None and read_done(self.arm_dir(base) / "generate") is not None:
            judged = self.arm_dir(base) / "evaluate" / "judgments.jsonl"
            vs_gold = [json.loads(x) for x in judged.read_text("utf-8").splitlines()] if judged.is_file() else []
            baseline = (base.name, rows_by_decoding(self.arm_dir(base) / "generate" / "generations.jsonl"), vs_gold)
        elif base is not None:
            logger.warning("grid: %s: baseline %s has no generations yet; head-to-head left for a rerun",
                           arm.name, base.name)
        features = TextFeatures(progress=self.grid.eval.progress) if self.grid.eval.mauve == "minilm" else None
        part, judgments = evaluate_model(
            arm.name, rows, [c for c in _decoding_configs(self.grid.eval, 1) if c.name in rows],
            json.loads((gen_folder / "gold_ppl.json").read_text("utf-8")), self.judge() if self.judged(arm) else None,
            self.grid.eval, alpha=arm.alpha, baseline=baseline, text_features=features)
        if features is not None:  # the MiniLM features of each item, for the paired MAUVE bootstrap
            _save_features(folder / "features.npz", {
                f"{dec}/{side}": features([r[key] for r in rs])
                for dec, rs in rows.items() for side, key in (("gold", "reference"), ("model", "generation"))})
        atomic_write_json(folder / "results.json", part)
        atomic_write_jsonl(folder / "judgments.jsonl", judgments)
        return write_done(folder, "evaluate", fp, {"seconds": round(time.perf_counter() - t0, 1),
                                                   "judged_items": len(judgments)})

    # ---- stage 4: paired differences against the baseline (bootstrap; MAUVE resampling costs minutes)
    def paired_fp(self, arm: Arm, base: Arm) -> str:
        return fingerprint([self.evaluate_fp(arm), self.evaluate_fp(base), self.grid.paired, "by_decoding",
                            PAIRED_METHOD])

    def paired_baseline(self, arm: Arm) -> Arm | None:
        """The arm ``arm`` is paired with: the baseline, or, when both are ``seeds:`` arms, the baseline's arm
        of the same training seed (cpo.s1 against mle.s1), so each seed's difference is one replicate."""
        if arm.kind == "control":
            return self.grid.arm(arm.control.of)
        b = self.grid.eval.baseline
        if b is None or b == arm.name:
            return None
        base = self.grid.arm(b)
        if arm.seed_group and base.seed_group and arm.seed_group != base.seed_group:
            same = [a for a in self.grid.arms if a.seed_group == base.seed_group
                    and a.overrides.get("seed") == arm.overrides.get("seed")]
            if same:
                return same[0]
        return base

    def paired(self, arm: Arm) -> dict | None:
        """``{"vs": arm, decoding: {metric: PairedDifference dict}}`` of ``arm`` minus its
        :meth:`paired_baseline`, cached in ``arms/NAME/paired/``; None for the baseline itself or while either
        side is not evaluated."""
        from seqcpo.evaluation.paired import compare_to_baseline

        base = self.paired_baseline(arm)
        if base is None:
            return None
        if read_done(self.arm_dir(arm) / "evaluate") is None or read_done(self.arm_dir(base) / "evaluate") is None:
            return None
        folder, fp = self.arm_dir(arm) / "paired", self.paired_fp(arm, base)
        done = read_done(folder)
        if done is not None and done["fingerprint"] == fp:
            return json.loads((folder / "paired.json").read_text("utf-8"))
        logger.info("grid: %s: paired bootstrap against %s", arm.name, base.name)
        t0 = time.perf_counter()
        sides = {x.name: self._scored(x) for x in (arm, base)}
        p = self.grid.paired
        out = {"vs": base.name, "by_decoding": {
            dec: compare_to_baseline(sides[arm.name][dec], sides[base.name][dec], p["resamples"],
                                     p["mauve_resamples"], p["seed"], p["confidence"])
            for dec in sides[arm.name] if dec in sides[base.name]}}
        atomic_write_json(folder / "paired.json", out)
        write_done(folder, "paired", fp, {"seconds": round(time.perf_counter() - t0, 1)})
        return out

    def _scored(self, arm: Arm) -> dict[str, dict]:
        """Per decoding: the arm's per-item scores, texts and (MAUVE) features, rows in per-item order."""
        from seqcpo.evaluation.evaluate import rows_by_decoding

        ev = self.arm_dir(arm) / "evaluate"
        runs = json.loads((ev / "results.json").read_text("utf-8"))["runs"]
        rows = rows_by_decoding(self.arm_dir(arm) / "generate" / "generations.jsonl")
        feats = _load_features(ev / "features.npz")
        out = {}
        for r in runs:
            if "per_item" not in r:
                raise GridError(f"{ev / 'results.json'}: no per-item scores (made by an older seqcpo); delete "
                                f"{ev} to score {arm.name!r} again")
            dec = r["decoding"]
            out[dec] = {"per_item": r["per_item"], "texts": [x["generation"] for x in rows[dec]],
                        "gold_features": feats.get(f"{dec}/gold"), "features": feats.get(f"{dec}/model")}
        return out

    def compute(self, arm: Arm) -> dict:
        """What the arm is and what each of its stages cost (the report's arms table)."""
        tr = self.train_done(arm) or {}
        gen = read_done(self.arm_dir(arm) / "generate") or {}
        neg = read_done(self.negatives_dir(arm)) or {} if arm.offline_negatives else {}
        ens = arm.kind in ("ensemble", "control")  # neither trains
        return {"kind": arm.kind, "summary": _arm_summary(arm), "checkpoint": self.checkpoint(arm),
                "train_seconds": None if ens else tr.get("seconds"), "train_steps": None if ens else tr.get("steps"),
                "negatives_seconds": neg.get("seconds"),
                "ensemble_seconds": tr.get("seconds") if ens else None, "generate_seconds": gen.get("seconds"),
                "generations_copied_from": gen.get("reused_from"), "generated_tokens": gen.get("generated_tokens"),
                "evaluate_seconds": (read_done(self.arm_dir(arm) / "evaluate") or {}).get("seconds"),
                "paired_seconds": (read_done(self.arm_dir(arm) / "paired") or {}).get("seconds"),
                "seed_group": arm.seed_group, "seed": arm.overrides.get("seed", 42) if arm.seed_group else None}

    def training_curves(self, arm: Arm) -> dict | None:
        """The arm's logged pairwise signal over steps and when its negatives became separated
        (:func:`seqcpo.training.separation.separation_onset`); None without a log or without negatives."""
        from seqcpo.training.separation import separation_onset

        if arm.kind != "train":
            return None
        try:
            history = json.loads((self.arm_dir(arm) / "log_history.json").read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        from seqcpo.grid.curves import curves_summary, quality_curves

        curves = {k: [(int(r["step"]), float(r[k])) for r in history if isinstance(r.get(k), (int, float))]
                  for k in CURVE_KEYS}
        quality = quality_curves(history)
        if not any(curves.values()) and not quality:
            return None
        return {"curves": curves, **separation_onset(history).as_dict(), "quality": quality,
                "quality_best_step": curves_summary(quality)}


CURVE_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/gold_top1")


def _has_weights(path: str) -> bool:
    """Whether a checkpoint folder holds weights (safetensors or a .bin) here."""
    p = Path(path)
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))


def _save_features(path: Path, arrays: dict) -> None:
    import io

    import numpy as np

    from seqcpo.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def _load_features(path: Path) -> dict:
    import numpy as np

    if not path.is_file():
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _arm_summary(arm: Arm) -> str:
    o = arm.overrides
    if arm.kind == "control":
        c = arm.control
        how = "continuations moved across items" if c.kind == "shuffle" else f"sampled at temperature {c.temperature:g}"
        return f"control: {c.of}'s {how}"
    if arm.kind != "train":
        return "no training" if arm.kind == "model" else f"weight-space ensemble, alpha {arm.alpha:g}"
    obj = o.get("objective", "cpo")
    if obj in ("cpo", "cpo_ranked", "dpo"):
        how = ", fixed (made once)" if arm.offline_negatives else ""
        if o.get("negatives_model") == "policy":
            how = f", from the policy (refresh every {o.get('negatives_refresh_steps', 1)})"
        seed = f", seed {o['seed']}" if arm.seed_group else ""
        return f"{obj}, negatives {o.get('negatives', 'tn:2,bn:2')}, K={o.get('num_negatives', 4)}{how}{seed}"
    if arm.seed_group:
        return f"{obj}, seed {o.get('seed')}"
    if obj == "pss":
        return f"pss, p_gold {o.get('pss_p_gold', 0.5)}, passes {o.get('pss_passes', 1)}"
    return obj


def write_grid_report(runner: _Runner, command: str) -> str:
    """Collect every evaluated arm's results into one results dict for the evaluation package's report writer."""
    from seqcpo.evaluation.report import write_report

    import seqcpo

    grid = runner.grid
    parts = {a.name: json.loads((runner.arm_dir(a) / "evaluate" / "results.json").read_text("utf-8"))
             for a in grid.arms if read_done(runner.arm_dir(a) / "evaluate") is not None}
    missing = [a.name for a in grid.arms if a.name not in parts]
    judge_stats: dict[str, int] = {}
    for part in parts.values():
        for k, v in (part.get("judge_stats") or {}).items():
            judge_stats[k] = judge_stats.get(k, 0) + v
    first = next((a for a in grid.arms if a.name in parts), grid.arms[0])
    paired = {a.name: p for a in grid.arms if a.name in parts and (p := runner.paired(a)) is not None}
    ev = grid.eval
    results = {
        "title": f"Grid `{grid.name}`", "command": command, "seqcpo_version": seqcpo.__version__,
        "created_utc": _now(), "data": runner.source(first).describe(),
        "judge": next((p["judge"] for p in parts.values() if p.get("judge")), None), "judge_stats": judge_stats,
        "order": ev.order, "order_seed": ev.order_seed, "mauve": ev.mauve,
        "runs": [r for p in parts.values() for r in p["runs"]],
        "head_to_head": [h for p in parts.values() for h in p["head_to_head"]],
        "grid": {"name": grid.name, "file": grid.path, "command": command, "out_dir": str(runner.out),
                 "base": grid.base, "arms": {a.name: {"kind": a.kind, "overrides": a.overrides} for a in grid.arms},
                 "ensembles": [dataclasses.asdict(e) for e in grid.ensembles], "eval": dataclasses.asdict(ev),
                 "compute": {a.name: runner.compute(a) for a in grid.arms if a.name in parts},
                 "not_evaluated": missing, "paired": paired, "paired_settings": grid.paired,
                 "seed_spread": _seed_spreads(grid, parts),
                 "seed_spread_of_difference": _difference_spreads(grid, paired),
                 "training": {a.name: c for a in grid.arms if (c := runner.training_curves(a)) is not None}},
    }
    controls = {a.name: discrimination(paired[a.name]["by_decoding"]) for a in grid.arms
                if a.kind == "control" and a.name in paired}
    results["grid"]["controls"] = controls
    results["grid"]["informative"] = informative(controls)
    results = write_report(results, runner.out)
    _append_grid_sections(runner, results, controls)
    return str(runner.out / "report.md")


def _append_grid_sections(runner: _Runner, results: dict, controls: dict) -> None:
    """The grid's own report sections after the common report: which metrics the controls show to be
    informative here, and quality over training steps (with ``quality.png``)."""
    from seqcpo.grid.controls import controls_markdown
    from seqcpo.grid.curves import curves_markdown, plot_quality
    from seqcpo.io import atomic_write_text

    training = results["grid"]["training"]
    lines = controls_markdown(controls, {a.name: a.control.of for a in runner.grid.arms if a.kind == "control"})
    lines += curves_markdown(training)
    plot = plot_quality(training, runner.out)
    if plot:
        lines += [f"![quality over steps]({plot})", ""]
    if lines:
        path = runner.out / "report.md"
        atomic_write_text(path, path.read_text("utf-8").rstrip("\n") + "\n\n" + "\n".join(lines))


SPREAD_METRICS = ("rep_3", "rep_4", "distinct_2", "rouge_l", "similarity", "mauve")


def _seed_spreads(grid: Grid, parts: dict[str, dict]) -> dict[str, dict]:
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


def _difference_spreads(grid: Grid, paired: dict[str, dict]) -> dict[str, dict]:
    """``{group: {"vs": baseline group, decoding: {metric: seed_spread}}}``: the paired difference of each
    seed of a ``seeds:`` arm against the baseline's arm of the same seed, spread over the seed pairs."""
    from seqcpo.evaluation.paired import seed_spread

    base = grid.arm(grid.eval.baseline) if grid.eval.baseline else None
    out: dict[str, dict] = {}
    if base is None or not base.seed_group:
        return out
    for group in dict.fromkeys(a.seed_group for a in grid.arms if a.seed_group and a.seed_group != base.seed_group):
        ps = [(a.name, paired[a.name]) for a in grid.arms if a.seed_group == group and a.name in paired]
        ps = [(n, p) for n, p in ps if grid.arm(p["vs"]).seed_group == base.seed_group]
        decs = dict.fromkeys(d for _, p in ps for d in p["by_decoding"])
        for dec in decs:
            rows = [p["by_decoding"][dec] for _, p in ps if dec in p["by_decoding"]]
            out.setdefault(group, {"vs": base.seed_group, "pairs": [f"{n} - {p['vs']}" for n, p in ps]})[dec] = {
                m: seed_spread([r[m]["difference"] for r in rows if m in r]) for m in SPREAD_METRICS}
    return out


# ----------------------------------------------------------------------------- the order of stages


def _status(runner: _Runner, arm: Arm) -> str:
    def state(fn, folder):
        d = read_done(folder)
        return "todo" if d is None else ("done" if d["fingerprint"] == fn(arm) else "redo")

    try:
        tr = "done" if runner.train_done(arm) is not None else "todo"
    except GridError:
        tr = "CONFLICT"
    neg = f"negatives {state(runner.train_fp, runner.negatives_dir(arm))}, " if arm.offline_negatives else ""
    return (f"{neg}train {tr}, generate {state(runner.generate_fp, runner.arm_dir(arm) / 'generate')}, "
            f"evaluate {state(runner.evaluate_fp, runner.arm_dir(arm) / 'evaluate')}")


def _plan(runner: _Runner, command: str) -> str:
    g, ev = runner.grid, runner.grid.eval
    lines = [f"grid {g.name!r} from {g.path} -> {g.out_dir}/ (report {g.out_dir / 'report.md'})",
             f"command: {command}", "arms:"]
    for arm in g.arms:
        if arm.kind == "train":
            changed = {k: v for k, v in arm.overrides.items() if g.base.get(k, object()) != v}
            what = "train " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "(base config)")
        elif arm.kind == "model":
            what = f"no training: {arm.overrides.get('model_name_or_path', 'smollm2-135m')}"
        elif arm.kind == "control":
            what = _arm_summary(arm)
        else:
            ens = runner._ensemble(arm)
            what = f"(1 - {arm.alpha:g}) * {ens.from_arm} + {arm.alpha:g} * {ens.to_arm}"
        mark = " " if arm.name in runner.selected else "-"
        lines.append(f" {mark} {arm.name:24s} {what}\n     [{_status(runner, arm)}]")
    lines.append(f"eval: {ev.split} split, {ev.num_examples or 'all'} examples, decoding {', '.join(ev.decoding)}, "
                 f"judge {ev.judge.backend}{' ' + ev.judge.model if ev.judge.model else ''}, MAUVE {ev.mauve}, "
                 f"baseline {ev.baseline}")
    if g.judge_arms is not None:
        lines.append(f"judged arms: {', '.join(g.judge_arms)} (and the baseline)")
    p = g.paired
    lines.append(f"paired bootstrap against {ev.baseline}: {p['resamples']} resamples ({p['mauve_resamples']} for "
                 f"MAUVE), {100 * p['confidence']:g}% intervals")
    if runner.selected != {a.name for a in g.arms}:
        lines.append("('-' = not selected by --only)")
    return "\n".join(lines)


def run_grid(grid_path: str | os.PathLike, only: Sequence[str] | None = None, dry_run: bool = False) -> str:
    """Run (or resume) a grid: train, generate and evaluate each arm, then write the report.

    Args:
        grid_path: the grid YAML (see the module docstring and ``configs/*_grid.yaml``).
        only: run the stages of these arms only (arm names, or an ensemble name for all its alphas); the
            report still lists every arm evaluated so far.
        dry_run: print the plan (arms, what each trains, which stages are done) and run nothing.

    Returns:
        The path of ``report.md`` (not written by a dry run).
    """
    grid = load_grid(grid_path)
    names = [a.name for a in grid.arms]
    groups = {e.name for e in grid.ensembles} | {a.seed_group for a in grid.arms if a.seed_group}
    unknown = [n for n in only or () if n not in names and n not in groups]
    if unknown:
        raise GridError(f"--only: {', '.join(unknown)} not in the grid (arms: {', '.join(names)})")
    selected = {a.name for a in grid.arms
                if not only or a.name in only or a.ensemble in only or a.seed_group in only}
    runner = _Runner(grid, selected)
    command = " ".join(shlex.quote(c) for c in ["seqcpo", "reproduce", str(grid_path), *(["--only", *only] if only else [])])
    if dry_run:
        print(_plan(runner, command))
        return str(grid.out_dir / "report.md")
    try:  # a judge that cannot work fails now, before any training
        check_judge(grid.eval.judge)
    except ValueError as e:
        raise GridError(f"{grid.path}: eval.judge: {e}") from None
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def evaluate_when_ready(arm: Arm) -> None:
        """Evaluate now (and rewrite the report: a long grid has a current one) once the baseline, which the
        arm meets head to head, is evaluated; otherwise the last loop below does it."""
        base = runner._baseline_for(arm)
        if base is None or read_done(runner.arm_dir(base) / "evaluate") is not None:
            runner.evaluate(arm)
            write_grid_report(runner, command)

    def ensembles_when_ready(pending: list[Ensemble]) -> None:
        """Interpolate, generate and evaluate each ensemble as soon as every arm of its two endpoints' seed
        groups is trained (the headline part of a grid finishes before the arms after it start)."""
        for ens in list(pending):
            groups = {g for e in (ens.from_arm, ens.to_arm) for g in (e, grid.arm(e).seed_group) if g}
            ends = [a for a in grid.arms if a.kind == "train" and (a.name in groups or a.seed_group in groups)]
            if all(a.name not in selected or runner.train_done(a) is not None for a in ends):
                pending.remove(ens)
                arms = [a for a in grid.arms if a.ensemble == ens.name and a.name in selected]
                if arms:
                    runner.interpolate(ens)
                    for arm in arms:
                        runner.generate(arm)
                        evaluate_when_ready(arm)

    # 1-3. negatives (where fixed), train, generate and evaluate, arm by arm in the file's order; each ensemble
    # right after its endpoints
    pending = list(grid.ensembles)
    for arm in grid.arms:
        if arm.kind in ("train", "model") and arm.name in selected:
            runner.train(arm)
            runner.generate(arm)
            evaluate_when_ready(arm)
            for ctl in (a for a in grid.arms if a.kind == "control" and a.control.of == arm.name):
                if ctl.name in selected:  # a control right after its source: it decides which metrics count
                    runner.generate(ctl)
                    evaluate_when_ready(ctl)
            ensembles_when_ready(pending)
    ensembles_when_ready(pending)
    # the rest, the baseline first (the others meet it head to head); finished evaluations are skipped
    for arm in sorted((a for a in grid.arms if a.name in selected), key=lambda a: a.name != grid.eval.baseline):
        runner.evaluate(arm)
    # 4. paired bootstrap against the baseline (cached per arm) and the report
    path = write_grid_report(runner, command)
    logger.info("grid %s: done in %.0f s; report %s", grid.name, time.perf_counter() - t0, path)
    return path
