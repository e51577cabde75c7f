"""``seqcpo reproduce GRID.yaml``: a grid of arms (train, generate, evaluate), its controls and curves, and one
report, resumable.

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
    controls:                          # optional degraded copies, paired with their source (seqcpo.grid.controls)
      - {of: base, kind: shuffle}                            # arm "base.shuffle" (kinds: shuffle, loop, temperature)
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
    inputs.json                content digests of the local data files and model folders the arms use
    report.md, results.json    arms, claims (paired differences), seed spread, separation; winrate.png,
                               mauve.png, alpha_sweep.png, separation.png (rewritten after every evaluated arm)

Inputs of each stage are fingerprinted (the arm's merged config; the generation and scoring fields of the
eval config). A changed training config is an error (delete ``arms/NAME`` to retrain); changed generation or
evaluation options redo that stage and the ones after it. The fingerprints name a data file or model folder by its
path; what is there is checked by :mod:`~seqcpo.grid.inputs`: changed content under finished stages is refused.

Modules: :mod:`~seqcpo.grid.spec` the grid file (typed, through the one config loader);
:mod:`~seqcpo.grid.cache` fingerprints, ``done.json`` and the skip rule; :mod:`~seqcpo.grid.state` the run's
folders, fingerprints and judge; the stages :mod:`~seqcpo.grid.train`, :mod:`~seqcpo.grid.generate`,
:mod:`~seqcpo.grid.evaluate`; :mod:`~seqcpo.grid.report` the report; :mod:`~seqcpo.grid.run` their order;
:mod:`~seqcpo.grid.controls`, :mod:`~seqcpo.grid.curves` and :mod:`~seqcpo.grid.inputs`. Generating, judging and scoring are
:mod:`seqcpo.evaluation.evaluate`'s, the common report :func:`seqcpo.evaluation.report.write_report`'s.
"""

from seqcpo.grid.run import run_grid
from seqcpo.grid.spec import GridConfig, GridError, load_grid

__all__ = ["GridConfig", "GridError", "load_grid", "run_grid"]
