"""``seqcpo reproduce GRID.yaml``: a grid of arms (train, generate, evaluate) and one report, resumable.

A grid file::

    name: smollm2                      # shown in the report
    out_dir: runs/smollm2_grid         # relative to the working directory
    base: {model_name_or_path: smollm2-135m, dataset: wiki, max_steps: 20, ...}   # SeqCPOConfig fields for all arms
    arms:                              # name -> SeqCPOConfig overrides, in the order they run
      base: {train: false}             # no training: evaluate model_name_or_path as it is
      mle: {objective: mle}
      cpo_tnr: {objective: cpo_ranked, negatives: tn}
    ensembles:                         # optional weight-space ensembles of two trained arms
      - {from: mle, to: cpo_tnr, alphas: [0, 0.5, 1]}       # arms "mle~cpo_tnr@0", "@0.5", "@1"
    eval:                              # everything optional; defaults in EVAL_DEFAULTS
      split: test
      num_examples: 64
      decoding: [greedy]               # specs of seqcpo.evaluation.parse_decoding
      judge: {backend: local, model: smollm2-135m}          # none | local | openai (url, model, api_key_env)
      mauve: minilm                    # minilm | none
      baseline: mle                    # the arm every other arm meets head to head

Layout of ``out_dir`` (every stage ends by writing its ``done.json`` atomically; a stage whose ``done.json``
exists and whose inputs have not changed is skipped, so an interrupted grid resumes where it stopped)::

    arms/NAME/                 training output_dir (final/, log_history.json, checkpoints) + done.json
    arms/NAME/generate/        generations.jsonl, gold_ppl.json, done.json
    arms/NAME/evaluate/        results.json (runs + head-to-head), judgments.jsonl, done.json
    ensembles/FROM~TO/         alpha-*/ checkpoints + done.json
    judge_cache/               verdicts, shared by all arms
    report.md, results.json    the table; winrate.png, mauve.png, alpha_sweep.png

Inputs of each stage are fingerprinted (the arm's merged config; decoding and data options; the judge, MAUVE
and baseline settings). A changed training config is an error (delete ``arms/NAME`` to retrain); changed
generation or evaluation options redo that stage and the ones after it. The evaluation package does the
generation, judging and metrics (:mod:`seqcpo.evaluation`); this module only orders the stages and collects
the numbers into one table.
"""

from __future__ import annotations

import dataclasses
import difflib
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

import yaml

from seqcpo.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from seqcpo.training.config import ConfigError, load_config

logger = logging.getLogger("seqcpo")

GRID_KEYS = ("name", "out_dir", "base", "arms", "ensembles", "eval")
ARM_KEYS = ("train",)  # arm keys that are not SeqCPOConfig fields
EVAL_DEFAULTS: dict[str, Any] = {
    "split": "test",
    "num_examples": 64,  # first N examples of the split (0 = all)
    "decoding": ["greedy"],
    "max_new_tokens": None,  # default: the data's continuation length
    "batch_size": 16,  # generation batch size
    "seed": 0,  # base sampling seed of the decoding configs
    "dtype": "float32",
    "device": "auto",
    "judge": {"backend": "none"},
    "order": "both",  # both orders per item (disagreement = tie) | random
    "order_seed": 0,
    "mauve": "minilm",  # minilm | none
    "ppl": True,  # gold perplexity of each arm
    "baseline": "mle",  # head-to-head opponent of every other arm (needs a judge)
    "progress": False,
}
JUDGE_KEYS = ("backend", "model", "url", "api_key_env", "prompt", "concurrency", "max_retries", "timeout", "note")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Checked against this machine's hardware by TrainingArguments; a GPU grid must dry-run on a laptop.
_HOST_FLAGS = {"bf16": False, "fp16": False, "tf32": None, "use_cpu": True}


class GridError(ConfigError):
    """A bad grid file or an inconsistent grid folder; the message names the file and the key."""


# ----------------------------------------------------------------------------- the grid file


@dataclasses.dataclass
class Arm:
    """One row of the report: a model to generate from and evaluate.

    ``kind`` is "train" (trained here), "model" (``train: false``: the configured model as it is) or
    "ensemble" (``alpha`` of ensemble ``ensemble``).
    """

    name: str
    kind: str
    overrides: dict[str, Any]  # base + arm fields (ensembles: their "from" arm's)
    ensemble: str | None = None
    alpha: float | None = None


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
    eval: dict[str, Any]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _unknown(where: str, keys, allowed) -> None:
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GridError(f"{where}: unknown key {k!r}{hint}; allowed: {', '.join(allowed)}")


def ensemble_arm_name(ensemble: str, alpha: float) -> str:
    """``mle~cpo_tnr@0.5``."""
    return f"{ensemble}@{alpha:g}"


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid YAML (every arm's config is built once, so a typo fails before any training)."""
    where = str(path)
    if not os.path.exists(path):
        raise GridError(f"{where}: no such grid file")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise GridError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise GridError(f"{where}: the top level must be a mapping with keys {', '.join(GRID_KEYS)}")
    _unknown(where, raw, GRID_KEYS)
    for key in ("out_dir", "arms"):
        if key not in raw:
            raise GridError(f"{where}: missing {key!r}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise GridError(f"{where}: 'base' must be a mapping of SeqCPOConfig fields")
    if "output_dir" in base:
        raise GridError(f"{where}: base.output_dir is set by the grid (out_dir/arms/NAME); remove it")
    out_dir = Path(str(raw["out_dir"]))
    arms_raw = raw["arms"]
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise GridError(f"{where}: 'arms' must be a non-empty mapping of name -> overrides")

    arms: list[Arm] = []
    for name, over in arms_raw.items():
        name = str(name)
        over = dict(over or {})
        if not _NAME.match(name):
            raise GridError(f"{where}: arm name {name!r}: use letters, digits and _ . + - only")
        if "output_dir" in over:
            raise GridError(f"{where}: arms.{name}.output_dir is set by the grid; remove it")
        trained = over.pop("train", True)
        if not isinstance(trained, bool):
            raise GridError(f"{where}: arms.{name}.train must be true or false")
        merged = {**base, **over}
        try:  # check the fields now, not hours later (mixed precision is checked on the machine that trains)
            load_config(None, {**merged, **_HOST_FLAGS, "output_dir": str(out_dir / "arms" / name)})
        except ConfigError as e:
            raise GridError(f"{where}: arm {name!r}: {e}") from None
        arms.append(Arm(name, "train" if trained else "model", merged))

    ensembles: list[Ensemble] = []
    trained_names = {a.name for a in arms if a.kind == "train"}
    for i, spec in enumerate(raw.get("ensembles") or []):
        w = f"{where}: ensembles[{i}]"
        if not isinstance(spec, dict):
            raise GridError(f"{w}: expected a mapping with from, to, alphas")
        _unknown(w, spec, ("from", "to", "alphas", "name"))
        for key in ("from", "to"):
            if spec.get(key) not in trained_names:
                known = ", ".join(sorted(trained_names))
                raise GridError(f"{w}.{key}: {spec.get(key)!r} is not a trained arm ({known})")
        alphas = [float(x) for x in spec.get("alphas", [0, 0.5, 1])]
        ens_name = str(spec.get("name") or f"{spec['from']}~{spec['to']}")
        if not re.match(r"^[A-Za-z0-9_.+~-]+$", ens_name):
            raise GridError(f"{w}.name: {ens_name!r}: use letters, digits and _ . + ~ - only")
        ens = Ensemble(ens_name, spec["from"], spec["to"], alphas)
        ensembles.append(ens)
        for alpha in alphas:
            arms.append(Arm(ensemble_arm_name(ens_name, alpha), "ensemble",
                            next(a for a in arms if a.name == ens.from_arm).overrides, ens_name, alpha))
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GridError(f"{where}: arm names must be unique; repeated: {', '.join(dup)}")

    ev = dict(EVAL_DEFAULTS)
    ev_raw = raw.get("eval") or {}
    _unknown(f"{where}: eval", ev_raw, EVAL_DEFAULTS)
    ev.update(ev_raw)
    if isinstance(ev["decoding"], str):
        ev["decoding"] = [ev["decoding"]]
    judge = ev["judge"]
    if isinstance(judge, str):
        judge = {"backend": judge}
    judge = dict(judge or {"backend": "none"})
    _unknown(f"{where}: eval.judge", judge, JUDGE_KEYS)
    if judge.get("backend", "none") not in ("none", "local", "openai"):
        raise GridError(f"{where}: eval.judge.backend: choose none, local or openai")
    judge.setdefault("backend", "none")
    ev["judge"] = judge
    if ev["mauve"] in (False, None):
        ev["mauve"] = "none"
    if ev["mauve"] not in ("minilm", "none"):
        raise GridError(f"{where}: eval.mauve: choose minilm or none")
    if ev["order"] not in ("both", "random"):
        raise GridError(f"{where}: eval.order: choose both or random")
    if ev["baseline"] is not None and ev["baseline"] not in names:
        raise GridError(f"{where}: eval.baseline {ev['baseline']!r} is not an arm ({', '.join(names)})")
    try:
        _decoding_configs(ev, 64)
    except ValueError as e:
        raise GridError(f"{where}: eval.decoding: {e}") from None
    return Grid(where, str(raw.get("name") or Path(where).stem), out_dir, base, arms, ensembles, ev)


def data_config(overrides: dict[str, Any]):
    """The :class:`seqcpo.data.DataConfig` part of an arm's fields (no TrainingArguments, no hardware checks)."""
    from seqcpo.data import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in overrides.items() if k in names})


def _decoding_configs(ev: dict, default_max_new_tokens: int):
    from seqcpo.evaluation import parse_decoding

    max_new = ev["max_new_tokens"] or default_max_new_tokens
    return [parse_decoding(str(s), max_new_tokens=int(max_new), seed=int(ev["seed"])) for s in ev["decoding"]]


# ----------------------------------------------------------------------------- stage bookkeeping


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value (the inputs of a stage)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_done(folder: Path) -> dict | None:
    """The stage's ``done.json``, or None when the stage has not finished."""
    path = folder / "done.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
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
        self.grid = grid
        self.selected = selected
        self.out = grid.out_dir
        self._judge = None
        self._judge_built = False

    # ---- folders
    def arm_dir(self, arm: Arm) -> Path:
        return self.out / "arms" / arm.name

    def ensemble_dir(self, name: str) -> Path:
        return self.out / "ensembles" / name

    # ---- stage 1: train (or resolve the checkpoint)
    def train_fp(self, arm: Arm) -> str:
        """What the arm's weights depend on: its config, or (ensembles) both endpoints and its alpha."""
        if arm.kind == "ensemble":
            ens = self._ensemble(arm)
            return fingerprint(["ensemble", self.train_fp(self.grid.arm(ens.from_arm)),
                                self.train_fp(self.grid.arm(ens.to_arm)), arm.alpha])
        return fingerprint([arm.kind, arm.overrides])

    def _ensemble(self, arm: Arm) -> Ensemble:
        return next(e for e in self.grid.ensembles if e.name == arm.ensemble)

    def ensemble_fp(self, ens: Ensemble) -> str:
        return fingerprint([self.train_fp(self.grid.arm(ens.from_arm)), self.train_fp(self.grid.arm(ens.to_arm)),
                            ens.alphas])

    def train_done(self, arm: Arm) -> dict | None:
        """The finished training (or ensemble) stage of ``arm``, or None."""
        folder = self.ensemble_dir(arm.ensemble) if arm.kind == "ensemble" else self.arm_dir(arm)
        done = read_done(folder)
        if done is None:
            return None
        expected = self.ensemble_fp(self._ensemble(arm)) if arm.kind == "ensemble" else self.train_fp(arm)
        if done["fingerprint"] != expected:
            if arm.kind != "train":
                return None  # cheap: interpolate (or resolve the untrained model) again
            raise GridError(
                f"{self.grid.path}: arm {arm.name!r} was trained with another config than the grid now gives "
                f"({folder / 'done.json'}); delete {folder} to retrain it, or set another out_dir"
            )
        return done

    def train(self, arm: Arm) -> dict:
        done = self.train_done(arm)
        if done is not None:
            logger.info("grid: %s: trained already (%s), skipped", arm.name, done["finished_utc"])
            return done
        folder = self.arm_dir(arm)
        if arm.kind == "model":
            from seqcpo.models import resolve_model_path

            ckpt = resolve_model_path(arm.overrides.get("model_name_or_path", "smollm2-135m"))
            return write_done(folder, "train", self.train_fp(arm),
                              {"checkpoint": ckpt, "steps": 0, "seconds": 0.0, "train_loss": None, "trained": False})
        from seqcpo.training import run as training_run

        overrides = {**arm.overrides, "output_dir": str(folder)}
        if any(folder.glob("checkpoint-*")) and "resume_from_checkpoint" not in overrides:
            overrides["resume_from_checkpoint"] = "auto"  # an interrupted run: resume it (afresh if all are torn)
        logger.info("grid: %s: training", arm.name)
        result = training_run.train(load_config(None, overrides))
        result.pop("trainer", None)
        info = {"checkpoint": result["final_checkpoint"], "steps": result["steps"], "seconds": result["seconds"],
                "train_loss": result["train_loss"], "trained": True, "examples": result["examples"]}
        del result
        gc.collect()
        return write_done(folder, "train", self.train_fp(arm), info)

    def interpolate(self, ens: Ensemble) -> dict:
        from seqcpo.ensemble import interpolate_checkpoints

        arm0 = next(a for a in self.grid.arms if a.ensemble == ens.name)
        done = self.train_done(arm0)
        if done is not None:
            logger.info("grid: ensemble %s: written already, skipped", ens.name)
            return done
        ends = {}
        for key in (ens.from_arm, ens.to_arm):
            d = self.train_done(self.grid.arm(key))
            if d is None:
                raise GridError(f"{self.grid.path}: ensemble {ens.name!r} needs arm {key!r} trained first; "
                                f"run it too (--only {key} ...)")
            ends[key] = d["checkpoint"]
        t0 = time.perf_counter()
        folder = self.ensemble_dir(ens.name)
        paths = interpolate_checkpoints(ends[ens.from_arm], ends[ens.to_arm], ens.alphas, folder)
        return write_done(folder, "ensemble", self.ensemble_fp(ens), {
            "checkpoints": {f"{a:g}": p for a, p in zip(ens.alphas, paths)}, "from": ends[ens.from_arm],
            "to": ends[ens.to_arm], "seconds": round(time.perf_counter() - t0, 1)})

    def checkpoint(self, arm: Arm) -> str:
        done = self.train_done(arm)
        if done is None:
            raise GridError(f"{self.grid.path}: arm {arm.name!r} has no checkpoint yet")
        return done["checkpoints"][f"{arm.alpha:g}"] if arm.kind == "ensemble" else done["checkpoint"]

    # ---- stage 2: generate
    def generate_fp(self, arm: Arm) -> str:
        ev = self.grid.eval
        keys = ("split", "num_examples", "decoding", "max_new_tokens", "seed", "dtype", "ppl")
        data = data_config(arm.overrides)
        return fingerprint([self.train_fp(arm), {k: ev[k] for k in keys}, dataclasses.asdict(data)])

    def generate(self, arm: Arm) -> dict:
        from seqcpo.data import load_splits
        from seqcpo.evaluation import generate_continuations, gold_perplexity
        from seqcpo.evaluation.checkpoints import load_checkpoint

        folder = self.arm_dir(arm) / "generate"
        fp = self.generate_fp(arm)
        done = read_done(folder)
        if done is not None and done["fingerprint"] == fp:
            logger.info("grid: %s: generated already, skipped", arm.name)
            return done
        ev = self.grid.eval
        ckpt = self.checkpoint(arm)
        reused = self._reuse_endpoint(arm, folder, ckpt, fp)
        if reused is not None:
            return reused
        data = data_config(arm.overrides)
        logger.info("grid: %s: generating from %s", arm.name, ckpt)
        model, tokenizer = load_checkpoint(ckpt, dtype=ev["dtype"], device=ev["device"])
        examples = getattr(load_splits(data, tokenizer), ev["split"])
        if ev["num_examples"]:
            examples = examples[: int(ev["num_examples"])]
        if not examples:
            raise GridError(f"{self.grid.path}: the {ev['split']} split of {data.dataset} is empty")
        default_new = data.continuation_tokens if data.task == "continuation" else data.max_continuation_tokens
        configs = _decoding_configs(ev, default_new)
        t0 = time.perf_counter()
        rows = generate_continuations(ckpt, examples, configs, folder / "generations.jsonl",
                                      batch_size=int(ev["batch_size"]), model_label=arm.name,
                                      progress=bool(ev["progress"]), model_and_tokenizer=(model, tokenizer))
        seconds = round(time.perf_counter() - t0, 1)
        ppl, ppl_seconds = None, 0.0
        if ev["ppl"]:
            t1 = time.perf_counter()
            ppl = gold_perplexity(model, examples, progress=bool(ev["progress"]))
            ppl_seconds = round(time.perf_counter() - t1, 1)
        del model
        gc.collect()
        atomic_write_json(folder / "gold_ppl.json", ppl)
        return write_done(folder, "generate", fp, {
            "checkpoint": ckpt, "rows": len(rows), "examples": len(examples), "decoding": [c.name for c in configs],
            "seconds": seconds, "generated_tokens": sum(r.get("num_tokens", 0) for r in rows),
            "gold_ppl_seconds": ppl_seconds})

    def _reuse_endpoint(self, arm: Arm, folder: Path, ckpt: str, fp: str) -> dict | None:
        """Alpha 0 and 1 are bit for bit the endpoint models: copy the endpoint's generations, relabelled.

        Generation is seeded per batch of example ids (not by the model label), so the copy is exactly what
        generating again would give; it saves the slowest stage of two arms per ensemble.
        """
        from seqcpo.evaluation import read_generations

        if arm.kind != "ensemble" or arm.alpha not in (0.0, 1.0):
            return None
        ens = self._ensemble(arm)
        end = self.grid.arm(ens.from_arm if arm.alpha == 0.0 else ens.to_arm)
        end_folder = self.arm_dir(end) / "generate"
        end_done = read_done(end_folder)
        if end_done is None or end_done["fingerprint"] != self.generate_fp(end):
            return None
        rows = [dict(r, model=arm.name, model_path=ckpt) for r in read_generations(end_folder / "generations.jsonl")]
        atomic_write_jsonl(folder / "generations.jsonl", rows)
        ppl = json.loads((end_folder / "gold_ppl.json").read_text(encoding="utf-8"))
        atomic_write_json(folder / "gold_ppl.json", ppl)
        logger.info("grid: %s: generations copied from %s (identical weights)", arm.name, end.name)
        return write_done(folder, "generate", fp, {
            "checkpoint": ckpt, "rows": len(rows), "examples": end_done["examples"], "decoding": end_done["decoding"],
            "seconds": 0.0, "generated_tokens": end_done["generated_tokens"], "gold_ppl_seconds": 0.0,
            "reused_from": end.name})

    # ---- stage 3: evaluate
    def judge(self):
        """The pairwise judge of ``eval.judge``, built at first use (a local judge loads a model)."""
        if not self._judge_built:
            from seqcpo.evaluation.judges import build_judge

            j = self.grid.eval["judge"]
            kwargs = {}
            if j["backend"] == "openai":
                kwargs = {k: j[k] for k in ("concurrency", "max_retries", "timeout") if k in j}
                if "concurrency" in kwargs:
                    kwargs["max_concurrency"] = kwargs.pop("concurrency")
            elif j["backend"] == "local":
                kwargs = {k: j[k] for k in ("debias", "tie_margin") if k in j}
            try:
                self._judge = build_judge(j["backend"], model=j.get("model"), url=j.get("url"),
                                          api_key_env=j.get("api_key_env", "OPENAI_API_KEY"),
                                          prompt_path=j.get("prompt"), cache_dir=str(self.out / "judge_cache"),
                                          **kwargs)
            except ValueError as e:
                raise GridError(f"{self.grid.path}: eval.judge: {e}") from None
            self._judge_built = True
        return self._judge

    def evaluate_fp(self, arm: Arm) -> str:
        ev = self.grid.eval
        keys = ("judge", "order", "order_seed", "mauve", "baseline")
        base = self._baseline_for(arm)
        base_gen = read_done(self.arm_dir(base) / "generate") if base is not None else None
        return fingerprint([self.generate_fp(arm), {k: ev[k] for k in keys},
                            base_gen["fingerprint"] if base_gen else None])

    def _baseline_for(self, arm: Arm) -> Arm | None:
        b = self.grid.eval["baseline"]
        if b is None or b == arm.name or self.grid.eval["judge"]["backend"] == "none":
            return None
        return self.grid.arm(b)

    def evaluate(self, arm: Arm) -> dict:
        from seqcpo.evaluation import (
            distinct_n,
            head_to_head,
            mauve_score,
            read_generations,
            repeated_ngram_rate,
            rouge_l,
            summarize,
            summarize_by_category,
            win_rate_vs_gold,
        )
        from seqcpo.evaluation import metrics as eval_metrics

        folder = self.arm_dir(arm) / "evaluate"
        fp = self.evaluate_fp(arm)
        done = read_done(folder)
        if done is not None and done["fingerprint"] == fp:
            logger.info("grid: %s: evaluated already, skipped", arm.name)
            return done
        ev = self.grid.eval
        progress = bool(ev["progress"])
        gen_folder = self.arm_dir(arm) / "generate"
        if read_done(gen_folder) is None:
            raise GridError(f"{self.grid.path}: arm {arm.name!r} has no finished generations to evaluate")
        logger.info("grid: %s: evaluating", arm.name)
        t0 = time.perf_counter()
        rows = read_generations(gen_folder / "generations.jsonl")
        ppl = json.loads((gen_folder / "gold_ppl.json").read_text(encoding="utf-8"))
        judge = self.judge()
        base = self._baseline_for(arm)
        base_rows = None
        if base is not None and read_done(self.arm_dir(base) / "generate") is not None:
            base_rows = read_generations(self.arm_dir(base) / "generate" / "generations.jsonl")
        elif base is not None:
            logger.warning("grid: %s: baseline %s has no generations yet; head-to-head left for a rerun",
                           arm.name, base.name)
        runs, h2h, judgments = [], [], []
        for dec in (c.name for c in _decoding_configs(ev, 1)):  # the names generation wrote
            rs = [r for r in rows if r["decoding"] == dec]
            refs, gens = [r["reference"] for r in rs], [r["generation"] for r in rs]
            run = {"label": arm.name, "model": rs[0]["model_path"] if rs else None, "alpha": arm.alpha,
                   "decoding": dec, "decoding_config": rs[0]["config"] if rs else None, "num_items": len(rs),
                   "win_rate_vs_gold": None, "win_rate_by_category": {}, "mauve": None}
            if judge is not None:
                items = win_rate_vs_gold(judge, rs, order=ev["order"], seed=int(ev["order_seed"]), progress=progress)
                run["win_rate_vs_gold"] = summarize(items).to_dict()
                run["win_rate_by_category"] = {k: v.to_dict() for k, v in summarize_by_category(items).items()}
                judgments += [dict(i.to_dict(), kind="vs_gold", model=arm.name, decoding=dec) for i in items]
            if ev["mauve"] == "minilm" and rs:
                feats = eval_metrics.minilm_features(refs + gens, progress=progress)
                try:
                    run["mauve"] = mauve_score(feats[: len(refs)], feats[len(refs):], featurizer="minilm").to_dict()
                except Exception as e:  # a degenerate feature set must not sink the whole grid
                    run["mauve_error"] = f"MAUVE failed: {type(e).__name__}: {e}"
                    logger.warning("grid: %s / %s: %s", arm.name, dec, run["mauve_error"])
            run["rouge_l"] = rouge_l(gens, refs)
            for n in (1, 2, 3):
                run[f"distinct_{n}"] = distinct_n(gens, n)
            run["rep_4"] = repeated_ngram_rate(gens, 4)
            run["mean_tokens"] = sum(r.get("num_tokens", 0) for r in rs) / max(1, len(rs))
            run["gold_ppl"] = ppl
            runs.append(run)
            if judge is not None and base_rows is not None:
                brs = [r for r in base_rows if r["decoding"] == dec]
                items = head_to_head(judge, rs, brs, order=ev["order"], seed=int(ev["order_seed"]), progress=progress)
                h2h.append({"a": arm.name, "b": base.name, "decoding": dec, "win_rate": summarize(items).to_dict(),
                            "by_category": {k: v.to_dict() for k, v in summarize_by_category(items).items()}})
                judgments += [dict(i.to_dict(), kind="head_to_head", model=arm.name, opponent=base.name,
                                   decoding=dec) for i in items]
        seconds = round(time.perf_counter() - t0, 1)
        atomic_write_json(folder / "results.json", {
            "runs": runs, "head_to_head": h2h, "judge": judge.describe() if judge is not None else None,
            "judge_stats": dict(getattr(judge, "stats", {}) or {}) if judge is not None else {}})
        atomic_write_jsonl(folder / "judgments.jsonl", judgments)
        return write_done(folder, "evaluate", fp, {"seconds": seconds, "judged_items": len(judgments)})


# ----------------------------------------------------------------------------- the report


def _command(grid_path: str, only: Sequence[str] | None) -> str:
    cmd = ["seqcpo", "reproduce", grid_path]
    if only:
        cmd += ["--only", *only]
    return " ".join(shlex.quote(c) for c in cmd)


def _arm_summary(arm: Arm) -> str:
    o = arm.overrides
    if arm.kind == "model":
        return "no training"
    if arm.kind == "ensemble":
        return f"weight-space ensemble, alpha {arm.alpha:g}"
    obj = o.get("objective", "cpo")
    if obj in ("cpo", "cpo_ranked", "dpo"):
        return f"{obj}, negatives {o.get('negatives', 'tn:2,bn:2')}, K={o.get('num_negatives', 4)}"
    if obj == "pss":
        return f"pss, p_gold {o.get('pss_p_gold', 0.5)}, passes {o.get('pss_passes', 1)}"
    return obj


def _pct(wr: dict | None) -> str:
    if not wr or wr.get("rate") is None:
        return "-"
    return f"{100 * wr['rate']:.1f} [{100 * wr['ci_low']:.1f}, {100 * wr['ci_high']:.1f}]"


def write_grid_report(runner: _Runner, command: str) -> str:
    """Collect every evaluated arm into ``report.md`` + ``results.json`` (+ the evaluation package's plots)."""
    from seqcpo.evaluation.report import judge_label, render_markdown, write_plots

    import seqcpo

    grid, out = runner.grid, runner.out
    runs, h2h, compute, missing = [], [], {}, []
    judge_desc, judge_stats = None, {}
    for arm in grid.arms:
        ev_folder = runner.arm_dir(arm) / "evaluate"
        if read_done(ev_folder) is None:
            missing.append(arm.name)
            continue
        res = json.loads((ev_folder / "results.json").read_text(encoding="utf-8"))
        runs += res["runs"]
        h2h += res["head_to_head"]
        judge_desc = judge_desc or res.get("judge")
        for k, v in (res.get("judge_stats") or {}).items():
            judge_stats[k] = judge_stats.get(k, 0) + v
        tr = runner.train_done(arm) or {}
        gen = read_done(runner.arm_dir(arm) / "generate") or {}
        compute[arm.name] = {
            "kind": arm.kind,
            "summary": _arm_summary(arm),
            "checkpoint": runner.checkpoint(arm),
            "train_seconds": tr.get("seconds") if arm.kind != "ensemble" else None,
            "train_steps": tr.get("steps") if arm.kind != "ensemble" else None,
            "ensemble_seconds": tr.get("seconds") if arm.kind == "ensemble" else None,
            "generate_seconds": gen.get("seconds"),
            "generations_copied_from": gen.get("reused_from"),
            "generated_tokens": gen.get("generated_tokens"),
            "evaluate_seconds": (read_done(ev_folder) or {}).get("seconds"),
        }
    first = next((a for a in grid.arms if a.name not in missing), grid.arms[0])
    data_cfg = data_config(first.overrides)
    ev = grid.eval
    results = {
        "seqcpo_version": seqcpo.__version__,
        "created_utc": _now(),
        "data": {"dataset": data_cfg.dataset, "task": data_cfg.task, "split": ev["split"],
                 "num_examples": ev["num_examples"] or "all", "split_seed": data_cfg.split_seed},
        "judge": judge_desc,
        "judge_stats": judge_stats,
        "order": ev["order"],
        "order_seed": ev["order_seed"],
        "runs": runs,
        "head_to_head": h2h,
        "grid": {"name": grid.name, "file": grid.path, "command": command, "out_dir": str(out),
                 "base": grid.base, "arms": {a.name: {"kind": a.kind, "overrides": a.overrides} for a in grid.arms},
                 "ensembles": [dataclasses.asdict(e) for e in grid.ensembles], "eval": ev,
                 "compute": compute, "not_evaluated": missing},
    }
    results["plots"] = write_plots(results, out) if runs else []
    atomic_write_json(out / "results.json", results)

    judge = judge_label(judge_desc)
    jcfg = ev["judge"]
    lines = [f"# Grid `{grid.name}`", "", f"Regenerate this report (finished stages are skipped): `{command}`", ""]
    lines.append(f"- grid file: `{grid.path}`, output: `{out}`, created {results['created_utc']}, "
                 f"seqcpo {seqcpo.__version__}")
    lines.append(f"- data: {data_cfg.dataset} ({data_cfg.task}), {ev['split']} split, "
                 f"{ev['num_examples'] or 'all'} examples; decoding: {', '.join(map(str, ev['decoding']))}")
    lines.append(f"- judge: {judge}")
    if jcfg["backend"] == "local":
        lines.append("- **the local judge is weak**: a small LM choosing A/B/C by next-token log-probabilities "
                     "agrees with people far less than GPT-3.5 did in the paper; read its win rates as a smoke "
                     "test of the pipeline, not as evidence for or against a method")
    if jcfg.get("note"):
        lines.append(f"- judge note: {jcfg['note']}")
    if ev["mauve"] == "none":
        lines.append("- MAUVE: off")
    if missing:
        lines.append(f"- not evaluated yet: {', '.join(missing)}")
    lines += ["", "| arm | what | decoding | win vs gold % [95% CI] | n | vs "
              f"{ev['baseline'] or '-'} % [95% CI] | n | MAUVE (n gold/model) | ROUGE-L | train s | steps | gen s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    h2h_by = {(h["a"], h["decoding"]): h["win_rate"] for h in h2h}
    for r in runs:
        c = compute[r["label"]]
        wr = r.get("win_rate_vs_gold")
        hw = h2h_by.get((r["label"], r["decoding"]))
        mv = r.get("mauve")
        mauve = "-" if not mv else f"{mv['score']:.3f} ({mv['n_p']}/{mv['n_q']}){' (!)' if mv.get('warning') else ''}"
        train_s = c["train_seconds"] if c["kind"] != "ensemble" else f"({c['ensemble_seconds']} interp.)"
        gen_s = c["generate_seconds"] if not c["generations_copied_from"] else f"(= {c['generations_copied_from']})"
        lines.append(
            f"| {r['label']} | {c['summary']} | `{r['decoding']}` | {_pct(wr)} | {wr['n'] if wr else '-'} | "
            f"{_pct(hw)} | {hw['n'] if hw else '-'} | {mauve} | {r['rouge_l']:.3f} | "
            f"{train_s if train_s is not None else '-'} | "
            f"{c['train_steps'] if c['train_steps'] is not None else '-'} | {gen_s} |"
        )
    lines += ["", "Win rate = (wins + 0.5 ties) / n with a 95% Wilson interval; n = judged items. MAUVE marked (!) "
              "comes from too few samples to discriminate. train s includes model loading; ensemble arms cost an "
              "interpolation on top of their two endpoints' training; alpha 0 and 1 are bit for bit their endpoints, "
              "so their generations are copied (gen s \"(= arm)\").", ""]
    detail = render_markdown(results)  # the evaluation package's full tables and plots, one heading level down
    lines += ["---", ""] + [("#" + ln if ln.startswith("#") else ln) for ln in detail.splitlines()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return str(out / "report.md")


# ----------------------------------------------------------------------------- entry point


def _status(runner: _Runner, arm: Arm) -> str:
    def state(fn, folder):
        d = read_done(folder)
        return "todo" if d is None else ("done" if d["fingerprint"] == fn(arm) else "redo")

    try:
        tr = "done" if runner.train_done(arm) is not None else "todo"
    except GridError:
        tr = "CONFLICT"
    gen = state(runner.generate_fp, runner.arm_dir(arm) / "generate")
    ev = state(runner.evaluate_fp, runner.arm_dir(arm) / "evaluate")
    return f"train {tr}, generate {gen}, evaluate {ev}"


def _plan(runner: _Runner, command: str) -> str:
    g = runner.grid
    ev = g.eval
    lines = [f"grid {g.name!r} from {g.path} -> {g.out_dir}/ (report {g.out_dir / 'report.md'})",
             f"command: {command}", "arms:"]
    for arm in g.arms:
        mark = " " if arm.name in runner.selected else "-"
        if arm.kind == "train":
            changed = {k: v for k, v in arm.overrides.items() if g.base.get(k, object()) != v}
            what = "train " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "(base config)")
        elif arm.kind == "model":
            what = f"no training: {arm.overrides.get('model_name_or_path', 'smollm2-135m')}"
        else:
            ens = next(e for e in g.ensembles if e.name == arm.ensemble)
            what = f"(1 - {arm.alpha:g}) * {ens.from_arm} + {arm.alpha:g} * {ens.to_arm}"
        lines.append(f" {mark} {arm.name:24s} {what}\n     [{_status(runner, arm)}]")
    j = ev["judge"]
    lines.append(f"eval: {ev['split']} split, {ev['num_examples'] or 'all'} examples, decoding "
                 f"{', '.join(map(str, ev['decoding']))}, judge {j['backend']}"
                 f"{' ' + str(j.get('model')) if j.get('model') else ''}, MAUVE {ev['mauve']}, "
                 f"baseline {ev['baseline']}")
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
    if only:
        ens_names = {e.name for e in grid.ensembles}
        unknown = [n for n in only if n not in names and n not in ens_names]
        if unknown:
            raise GridError(f"--only: {', '.join(unknown)} not in the grid (arms: {', '.join(names)})")
        selected = {a.name for a in grid.arms if a.name in only or a.ensemble in only}
    else:
        selected = set(names)
    runner = _Runner(grid, selected)
    command = _command(str(grid_path), only)
    report = str(grid.out_dir / "report.md")
    if dry_run:
        print(_plan(runner, command))
        return report
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # 1-2. train and generate, arm by arm (an ensemble after both its endpoints)
    for arm in grid.arms:
        if arm.kind == "ensemble" or arm.name not in selected:
            continue
        runner.train(arm)
        runner.generate(arm)
    for ens in grid.ensembles:
        arms = [a for a in grid.arms if a.ensemble == ens.name and a.name in selected]
        if not arms:
            continue
        runner.interpolate(ens)
        for arm in arms:
            runner.generate(arm)
    # 3. evaluate, the baseline first (the others meet it head to head)
    order = sorted((a for a in grid.arms if a.name in selected), key=lambda a: a.name != grid.eval["baseline"])
    for arm in order:
        runner.evaluate(arm)
    path = write_grid_report(runner, command)
    logger.info("grid %s: done in %.0f s; report %s", grid.name, time.perf_counter() - t0, path)
    return path
