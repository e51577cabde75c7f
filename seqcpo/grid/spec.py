"""The grid file: typed :class:`GridConfig`, :class:`ArmSpec`, :class:`EnsembleSpec`, :class:`PairedConfig`.

Every value goes through the one config loader (:mod:`seqcpo.config_loader`): each arm's fields build its
:class:`~seqcpo.training.config.SeqCPOConfig` once, here (so a typo fails before any training, and the report
reads defaults from that config instead of declaring them again); ``eval:`` builds an
:class:`~seqcpo.evaluation.config.EvalConfig`; ``paired:`` a :class:`PairedConfig` whose ranges are its fields'
``check`` metadata. Every error is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from seqcpo.config_loader import (ConfigError, check_output_dir, coerce, field_rules, read_yaml, resolve,
                                  unknown_key_error)
from seqcpo.evaluation.config import EvalConfig
from seqcpo.grid.controls import ControlSpec, parse_controls
from seqcpo.training.config import SeqCPOConfig, load_config

GRID_KEYS = ("name", "out_dir", "base", "arms", "ensembles", "controls", "eval", "judge_arms", "paired")
# EvalConfig fields a grid sets itself (from its arms), and its own defaults for two others
GRID_SETS_EVAL = ("models", "labels", "alphas", "head_to_head", "out", "data_config")
GRID_EVAL_DEFAULTS = {"baseline": "mle", "progress": False}
# Names are folders (out_dir/arms/NAME): no path separator, and no leading dot (`.` and `..` would be out_dir/arms
# and out_dir itself, where the grid keeps its report; `.x` a hidden folder).
_NAME = re.compile(r"^[A-Za-z0-9_+~-][A-Za-z0-9_.+~-]*$")
# Checked against this machine's hardware by TrainingArguments; a GPU grid must dry-run on a laptop.
_HOST_FLAGS = {"bf16": False, "fp16": False, "tf32": None, "use_cpu": True}


class GridError(ConfigError):
    """A bad grid file or an inconsistent grid folder; the message names the file and the key."""


def _check_name(key: str, name: str) -> None:
    """GridError naming ``key`` when ``name`` (of an arm, ensemble or control) cannot be a folder of its own."""
    if not _NAME.match(name):
        raise GridError(f"{key}: {name!r}: names are folders (out_dir/arms/NAME): use letters, digits and "
                        "_ . + ~ -, not starting with a dot")


@dataclasses.dataclass
class PairedConfig:
    """``paired:``: the bootstrap of every arm against the baseline (:mod:`seqcpo.evaluation.paired`)."""

    resamples: int = dataclasses.field(default=1000, metadata={"check": ">= 1", "help": "per-item resamples"})
    mauve_resamples: int = dataclasses.field(default=200, metadata={
        "check": ">= 0", "help": "set-level MAUVE half-samples (0 = no MAUVE interval)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "bootstrap seed"})
    confidence: float = dataclasses.field(default=0.95, metadata={"check": "(0, 1)", "help": "interval level"})


@dataclasses.dataclass
class ArmSpec:
    """One row of the report: ``kind`` "train" (trained here), "model" (``train: false``: the configured model
    as it is), "ensemble" (``alpha`` of ensemble ``ensemble``) or "control" (a degraded copy of ``control.of``).
    ``overrides``: base + arm fields (what the fingerprints hash); ``config``: the SeqCPOConfig they build (an
    ensemble's or a control's is its source's)."""

    name: str
    kind: str
    overrides: dict[str, Any]
    config: SeqCPOConfig
    ensemble: str | None = None
    alpha: float | None = None
    seed_group: str | None = None  # the arm as written in the grid file, when ``seeds:`` expanded it
    offline_negatives: bool = False  # negatives made once before training (`seqcpo negatives`), then fixed
    control: ControlSpec | None = None


@dataclasses.dataclass
class EnsembleSpec:
    name: str
    from_arm: str
    to_arm: str
    alphas: list[float]


@dataclasses.dataclass
class GridConfig:
    path: str
    name: str
    out_dir: Path
    base: dict[str, Any]
    arms: list[ArmSpec]
    ensembles: list[EnsembleSpec]
    eval: EvalConfig
    judge_arms: list[str] | None = None  # None: the judge scores every arm
    paired: PairedConfig = dataclasses.field(default_factory=PairedConfig)

    def arm(self, name: str) -> ArmSpec:
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


def load_grid(path: str | os.PathLike) -> GridConfig:
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
        arms = [a for name, over in arms_raw.items() for a in _arms(where, str(name), over, base, out_dir)]
        ensembles = _ensembles(where, raw.get("ensembles") or [], arms)
        try:
            controls = parse_controls(where, raw.get("controls"), [a.name for a in arms])
        except ValueError as e:
            raise GridError(str(e)) from None
        for i, c in enumerate(controls):
            _check_name(f"{where}: controls[{i}].name", c.name)
            src = next(a for a in arms if a.name == c.of)
            arms.append(ArmSpec(c.name, "control", src.overrides, src.config, control=c))
        names = [a.name for a in arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GridError(f"{where}: arm names must be unique; repeated: {', '.join(dup)}")
        ens_names = [e.name for e in ensembles]  # --only selects an ensemble's alphas by its name
        clash = sorted({n for n in ens_names if n in names or ens_names.count(n) > 1})
        if clash:
            raise GridError(f"{where}: ensembles: name {', '.join(map(repr, clash))} is already an arm's or another "
                            "ensemble's; give the ensemble a 'name' of its own")
        ev = _eval_config(where, _mapping(f"{where}: eval", raw.get("eval"), "EvalConfig fields"), names)
        judge_arms = raw.get("judge_arms")
        if judge_arms is not None:
            judge_arms = coerce("judge_arms", judge_arms, list[str], where)
            bad = [n for n in judge_arms if n not in names]
            if bad:
                raise GridError(f"{where}: judge_arms: {', '.join(bad)} not arms of the grid ({', '.join(names)})")
        paired = _paired_config(where, raw.get("paired"))
    except GridError:
        raise
    except ConfigError as e:
        raise GridError(str(e)) from None
    return GridConfig(where, str(raw.get("name") or Path(where).stem), out_dir, base, arms, ensembles, ev,
                      judge_arms, paired)


def _arms(where: str, name: str, over, base: dict, out_dir: Path) -> list[ArmSpec]:
    """The arms of one ``arms:`` entry (one per training seed), each with its SeqCPOConfig built."""
    w = f"{where}: arms.{name}"
    over = _mapping(w, over, "SeqCPOConfig fields")
    _check_name(f"{where}: arms: name", name)
    if "output_dir" in {**base, **over}:
        raise GridError(f"{w}: output_dir is set by the grid (out_dir/arms/NAME)")
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
    out = []
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
        out.append(ArmSpec(arm_name, "train" if trained else "model", merged, cfg,
                           seed_group=None if sd is None else name, offline_negatives=offline))
    return out


def _ensembles(where: str, specs, arms: list[ArmSpec]) -> list[EnsembleSpec]:
    """The ``ensembles:`` list; each adds one arm per alpha (after its two trained endpoints)."""
    out: list[EnsembleSpec] = []
    trained = {a.name: a for a in arms if a.kind == "train"}
    for i, spec in enumerate(specs):
        w = f"{where}: ensembles[{i}]"
        spec = _mapping(w, spec, "from, to, alphas")
        _unknown(w, spec, ("from", "to", "alphas", "name"))
        for key in ("from", "to"):
            if spec.get(key) not in trained:
                raise GridError(f"{w}.{key}: {spec.get(key)!r} is not a trained arm ({', '.join(sorted(trained))})")
        alphas = coerce("alphas", spec.get("alphas", [0, 0.5, 1]), list[float], w)
        ens = EnsembleSpec(str(spec.get("name") or f"{spec['from']}~{spec['to']}"), spec["from"], spec["to"], alphas)
        _check_name(f"{w}.name", ens.name)
        out.append(ens)
        src = trained[ens.from_arm]
        arms += [ArmSpec(ensemble_arm_name(ens.name, a), "ensemble", src.overrides, src.config, ens.name, a)
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
        decoding_configs(ev, 64)
    except ValueError as e:
        raise GridError(f"{where}: eval.decoding: {e}") from None
    return ev


def _paired_config(where: str, raw) -> PairedConfig:
    """``paired:`` through the loader; a value out of range names every range (from the fields' metadata)."""
    paired = _mapping(f"{where}: paired", raw, "bootstrap settings")
    _unknown(f"{where}: paired", paired, [f.name for f in dataclasses.fields(PairedConfig)])
    try:
        return PairedConfig(**resolve(PairedConfig, [(f"{where}: paired", paired)]))
    except ConfigError as e:
        ranges = ", ".join(f"{k} {'in ' if r[0] in '[(' else ''}{r}" for k, r in field_rules(PairedConfig).items())
        detail = str(e).removeprefix(f"{where}: paired: ")
        raise GridError(f"{where}: paired: {ranges}; {detail}") from None


def data_config(overrides: dict[str, Any]):
    """The :class:`seqcpo.data.DataConfig` part of an arm's fields (no TrainingArguments, no hardware checks)."""
    from seqcpo.data import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in overrides.items() if k in names})


def decoding_configs(ev: EvalConfig, default_max_new_tokens: int):
    """The grid's decodings (:func:`seqcpo.evaluation.evaluate.decoding_configs`)."""
    from seqcpo.evaluation.evaluate import decoding_configs as build

    return build(ev, default_max_new_tokens)
