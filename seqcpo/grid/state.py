"""One grid's run state: where each stage writes, what each stage's inputs are (fingerprints), which stages are
finished, and the judge (built once, at first use). The stages themselves are functions of
:mod:`seqcpo.grid.train`, :mod:`seqcpo.grid.generate` and :mod:`seqcpo.grid.evaluate`."""

from __future__ import annotations

from pathlib import Path

from seqcpo.grid.cache import (EVALUATE_VERSION, MODEL_FIELDS, PAIRED_METHOD, fingerprint, non_default_fields,
                               read_done, scoring_key, weight_fields)
from seqcpo.grid.spec import ArmSpec, EnsembleSpec, GridConfig, GridError, data_config


class GridRun:
    """The grid, the arms selected to run (``--only``) and its output folder."""

    def __init__(self, grid: GridConfig, selected: set[str]):
        self.grid, self.selected, self.out = grid, selected, grid.out_dir
        self._judge, self._judge_built = None, False

    # ---- folders
    def arm_dir(self, arm: ArmSpec) -> Path:
        return self.out / "arms" / arm.name

    def ensemble_dir(self, name: str) -> Path:
        return self.out / "ensembles" / name

    def negatives_dir(self, arm: ArmSpec) -> Path:
        return self.out / "negatives" / arm.name

    def ensemble(self, arm: ArmSpec) -> EnsembleSpec:
        return next(e for e in self.grid.ensembles if e.name == arm.ensemble)

    # ---- fingerprints (frozen: see seqcpo.grid.cache)
    def train_fp(self, arm: ArmSpec) -> str:
        """What the arm's weights depend on: its config, or (ensembles) both endpoints and its alpha."""
        if arm.kind == "ensemble":
            ens = self.ensemble(arm)
            return fingerprint(["ensemble", self.train_fp(self.grid.arm(ens.from_arm)),
                                self.train_fp(self.grid.arm(ens.to_arm)), arm.alpha])
        if arm.kind == "control":
            c = arm.control
            return fingerprint(["control", self.train_fp(self.grid.arm(c.of)), c.kind, c.temperature])
        if arm.kind == "model":  # untrained: only the model and its dtype decide its weights
            return fingerprint(["model", {k: arm.overrides[k] for k in MODEL_FIELDS if k in arm.overrides}])
        return fingerprint([arm.kind, weight_fields(arm.overrides)]
                           + (["offline_negatives"] if arm.offline_negatives else []))

    def ensemble_fp(self, ens: EnsembleSpec) -> str:
        return fingerprint([self.train_fp(self.grid.arm(ens.from_arm)), self.train_fp(self.grid.arm(ens.to_arm)),
                            ens.alphas])

    def generate_fp(self, arm: ArmSpec) -> str:
        return fingerprint([self.train_fp(arm), self.grid.eval.generation_key(),
                            non_default_fields(data_config(arm.overrides))])

    def evaluate_fp(self, arm: ArmSpec) -> str:
        base = self.baseline_for(arm)
        base_gen = read_done(self.arm_dir(base) / "generate") if base is not None else None
        return fingerprint([self.generate_fp(arm), scoring_key(self.grid.eval),
                            base_gen["fingerprint"] if base_gen else None, self.judged(arm), EVALUATE_VERSION])

    def paired_fp(self, arm: ArmSpec, base: ArmSpec) -> str:
        import dataclasses

        return fingerprint([self.evaluate_fp(arm), self.evaluate_fp(base), dataclasses.asdict(self.grid.paired),
                            "by_decoding", PAIRED_METHOD])

    # ---- what is finished
    def train_done(self, arm: ArmSpec) -> dict | None:
        """The finished training (or ensemble) stage of ``arm``, or None (a control: its source's). A trained
        arm finished with another config is an error: its results would mix with the new config's."""
        if arm.kind == "control":
            return self.train_done(self.grid.arm(arm.control.of))
        folder = self.ensemble_dir(arm.ensemble) if arm.kind == "ensemble" else self.arm_dir(arm)
        done = read_done(folder)
        expected = self.ensemble_fp(self.ensemble(arm)) if arm.kind == "ensemble" else self.train_fp(arm)
        if done is None or done["fingerprint"] == expected:
            return done
        if arm.kind != "train":
            return None  # cheap: interpolate (or resolve the untrained model) again
        raise GridError(f"{self.grid.path}: arm {arm.name!r} was trained with another config than the grid now gives "
                        f"({folder / 'done.json'}); delete {folder} to retrain it, or set another out_dir")

    def checkpoint(self, arm: ArmSpec) -> str:
        """The arm's weights as recorded by its finished stage (a path that may not exist on this machine:
        committed outputs travel without weights; :func:`seqcpo.grid.train.weights` makes them again)."""
        if arm.kind == "control":
            return self.checkpoint(self.grid.arm(arm.control.of))
        done = self.train_done(arm)
        if done is None:
            raise GridError(f"{self.grid.path}: arm {arm.name!r} has no checkpoint yet")
        return done["checkpoints"][f"{arm.alpha:g}"] if arm.kind == "ensemble" else done["checkpoint"]

    # ---- who meets whom
    def judged(self, arm: ArmSpec) -> bool:
        """Whether the judge scores this arm (``judge_arms``; the baseline too, so head-to-heads pair)."""
        if self.grid.eval.judge.backend == "none":
            return False
        ja = self.grid.judge_arms
        return ja is None or arm.name in ja or arm.name == self.grid.eval.baseline

    def baseline_for(self, arm: ArmSpec) -> ArmSpec | None:
        """The arm ``arm`` meets head to head (the baseline), or None."""
        b = self.grid.eval.baseline
        if b is None or b == arm.name or not self.judged(arm):
            return None
        return self.grid.arm(b)

    def paired_baseline(self, arm: ArmSpec) -> ArmSpec | None:
        """The arm ``arm`` is paired with: the baseline, or, when both are ``seeds:`` arms, the baseline's arm
        of the same training seed (cpo.s1 against mle.s1), so each seed's difference is one replicate; a
        control's source."""
        if arm.kind == "control":
            return self.grid.arm(arm.control.of)
        b = self.grid.eval.baseline
        if b is None or b == arm.name:
            return None
        base = self.grid.arm(b)
        if arm.seed_group and base.seed_group and arm.seed_group != base.seed_group:
            same = [a for a in self.grid.arms if a.seed_group == base.seed_group and a.config.seed == arm.config.seed]
            if same:
                return same[0]
        return base

    # ---- shared inputs
    def source(self, arm: ArmSpec):
        """The evaluation examples of the arm's data (:class:`seqcpo.evaluation.evaluate.ExampleSource`)."""
        from seqcpo.evaluation.evaluate import ExampleSource

        return ExampleSource(data_config(arm.overrides), self.grid.eval.split, self.grid.eval.num_examples)

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
