"""``seqcpo generate`` and ``seqcpo eval``: generation and the full evaluation from saved checkpoints.

Generate only (resumable; rerun the same command after a crash)::

    seqcpo generate --models runs/mle runs/cpo --dataset wiki --task continuation --split test \\
        --num-examples 64 --decoding greedy sample:t=0.7,p=0.9 --out eval/wiki

Evaluate (generation + judge + metrics + report)::

    seqcpo eval --models runs/mle runs/cpo --labels MLE CPO --data-config configs/wiki.yaml --split test \\
        --num-examples 64 --decoding greedy sample:t=0.7 beam:n=4 \\
        --judge openai --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini \\
        --judge-api-key-env OPENAI_API_KEY --head-to-head CPO MLE --out eval/wiki

    seqcpo eval --models runs/cpo --dataset dolly.jsonl --task instruction --judge local \\
        --judge-model path/to/judge-lm --out eval/dolly

Outputs in ``--out``: ``generations.jsonl``, ``judgments.jsonl``, ``judge_cache/judge_cache.jsonl``,
``results.json``, ``report.md``, ``winrate.png``, ``mauve.png`` and, for a weight-space ensemble sweep,
``alpha_sweep.png``. The API key is only ever read from the environment variable named by
``--judge-api-key-env``; there is no flag that takes a key.

Every flag sets a field of :class:`seqcpo.evaluation.config.EvalConfig` (``--config FILE.yaml`` reads the same
fields from YAML, flags win), read by the one config loader (:mod:`seqcpo.config_loader`); the work is
:func:`seqcpo.evaluation.evaluate.evaluate`, the report :func:`seqcpo.evaluation.report.write_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

from seqcpo.config_loader import ConfigError, add_field_flags, check_output_dir, flag_sources, read_yaml, resolve
from seqcpo.evaluation.config import EvalConfig, JudgeConfig
from seqcpo.evaluation.data_source import ExampleSource, resolve_data

logger = logging.getLogger(__name__)

ENSEMBLE_FILE = "seqcpo_ensemble.json"
_MODELS = ("models", "labels", "dtype", "device", "batch_size")
_DECODING = ("decoding", "max_new_tokens", "seed")
_DATA_CHOICE = ("data_config", "checkpoint_data", "allow_train_overlap", "split", "num_examples")
_EVAL_ONLY = ("alphas", "head_to_head", "order", "order_seed", "mauve", "ppl")


def register(subparsers) -> None:
    """Add the ``generate`` and ``eval`` subcommands to an argparse subparsers object; every flag is declared
    from a field of :class:`EvalConfig`, :class:`JudgeConfig` or :class:`seqcpo.data.DataConfig`."""
    gen = subparsers.add_parser(
        "generate", help="generate continuations from checkpoints (resumable JSONL)",
        description="Generate continuations of a data split from one or more checkpoints.", allow_abbrev=False)
    eval_flags, data_flags = _add_common_args(gen)
    gen.set_defaults(func=run_generate, eval_flags=eval_flags, data_flags=data_flags)

    ev = subparsers.add_parser(
        "eval", help="generate, judge and score checkpoints; write report.md, results.json and plots",
        description="Win rate against the gold (pairwise judge), MAUVE, ROUGE-L, distinct-n, repetition and "
        "gold perplexity for checkpoints x decoding configurations.",
        allow_abbrev=False)  # "--judge-api-key sk-..." must fail, not pass as an abbreviation of -env
    eval_flags, data_flags = _add_common_args(ev)
    eval_flags.update(add_field_flags(
        ev.add_argument_group("scoring"), EvalConfig, fields=_EVAL_ONLY, names={"mauve": ("mauve_features",)},
        special={"head_to_head": dict(nargs=2, action="append", metavar=("X", "Y"))}))
    eval_flags.update(add_field_flags(
        ev.add_argument_group("judge (JudgeConfig)"), JudgeConfig, prefix="judge_", path="judge.",
        names={"backend": ("judge",)}, hidden={"--judge-no-debias": "debias"}))
    ev.set_defaults(func=run_eval, eval_flags=eval_flags, data_flags=data_flags)


def _add_common_args(p) -> tuple[dict, dict]:
    """The flags of both commands; returns ({dest: EvalConfig field}, {dest: DataConfig field})."""
    from seqcpo.data import DataConfig

    p.add_argument("--config", metavar="FILE.yaml", help="YAML with EvalConfig fields (top level or under 'eval:'); "
                   "flags win")
    flags = add_field_flags(p.add_argument_group("models"), EvalConfig, fields=_MODELS + ("out", "progress"))
    flags.update(add_field_flags(p.add_argument_group("decoding"), EvalConfig, fields=_DECODING))
    g = p.add_argument_group("data (from a model's seqcpo_config.yaml, then --data-config, then these "
                             "flags)")
    flags.update(add_field_flags(g, EvalConfig, fields=_DATA_CHOICE))
    return flags, add_field_flags(g, DataConfig)


# ----------------------------------------------------------------------------- flags -> configs


def _fail(e: Exception) -> SystemExit:
    return SystemExit(f"seqcpo: error: {e}")


def eval_config_from_args(args) -> EvalConfig:
    """The :class:`EvalConfig` of ``--config`` (if any) overridden by the flags given; SystemExit naming the
    flag (or file) on a bad value."""
    try:
        sources = [(args.config, read_yaml(args.config, section="eval"))] if getattr(args, "config", None) else []
        sources += flag_sources(args, getattr(args, "eval_flags", {}))
        cfg = EvalConfig(**resolve(EvalConfig, sources))
    except ConfigError as e:
        raise _fail(e) from None
    if not cfg.models:
        raise SystemExit("seqcpo: error: --models: give at least one checkpoint")
    if not cfg.out:
        raise SystemExit("seqcpo: error: --out: give the output folder")
    from seqcpo.evaluation.evaluate import decoding_configs

    try:  # a bad spec fails now, before any model is loaded
        decoding_configs(cfg, 64)
    except ValueError as e:
        raise SystemExit(f"seqcpo: error: --decoding: {e}") from None
    try:
        check_output_dir(cfg.out, "--out")
    except ConfigError as e:
        raise _fail(e) from None
    return cfg


def data_config_from_args(args, cfg: EvalConfig | None = None):
    """The DataConfig of an evaluation: the training data settings of the first model that has them (unless
    ``checkpoint_data`` is false), then ``--data-config``, then the data flags (:func:`resolve_data`)."""
    return example_source(args, cfg).cfg


def example_source(args, cfg: EvalConfig | None = None) -> ExampleSource:
    """The :class:`ExampleSource` of an evaluation (see :func:`data_config_from_args`)."""
    models = cfg.models if cfg is not None else (getattr(args, "models", None) or [])
    data_config = cfg.data_config if cfg is not None else getattr(args, "data_config", None)
    use_checkpoint = cfg.checkpoint_data if cfg is not None else True
    try:
        data, origin = resolve_data(models, data_config, flag_sources(args, getattr(args, "data_flags", {})),
                                    use_checkpoint)
    except ConfigError as e:
        raise _fail(e) from None
    split, num = (cfg.split, cfg.num_examples) if cfg is not None else ("test", 64)
    return ExampleSource(data, split, num, origin)


def _labels(args) -> list[str]:
    if args.labels:
        if len(args.labels) != len(args.models):
            raise SystemExit(f"--labels: got {len(args.labels)} labels for {len(args.models)} models")
        if len(set(args.labels)) != len(args.labels):
            raise SystemExit("--labels must be unique")
        return list(args.labels)
    labels = []
    for m in args.models:
        base = Path(m).name or m
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def _alphas(args) -> list[float | None]:
    if getattr(args, "alphas", None):
        if len(args.alphas) != len(args.models):
            raise SystemExit(f"--alphas: got {len(args.alphas)} values for {len(args.models)} models")
        return list(args.alphas)
    out = []
    for m in args.models:
        meta = Path(m) / ENSEMBLE_FILE
        alpha = None
        if meta.is_file():
            try:
                alpha = json.loads(meta.read_text(encoding="utf-8")).get("alpha")
            except (json.JSONDecodeError, AttributeError):
                logger.warning("%s: unreadable, no alpha", meta)
        out.append(float(alpha) if alpha is not None else None)
    return out


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def _out_dir(cfg: EvalConfig) -> Iterator[Path]:
    """The ``--out`` folder, created; a folder this call created is removed again when the command fails before
    writing anything into it (a typo in a model path leaves no empty folder behind)."""
    out = Path(cfg.out)
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"seqcpo: error: --out {out}: cannot create the folder ({e.strerror or e})") from None
    try:
        yield out
    except BaseException:
        for folder in made:  # deepest first; a folder with anything in it stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


# ----------------------------------------------------------------------------- generate


def run_generate(args) -> int:
    from seqcpo.evaluation.checkpoints import load_tokenizer_only
    from seqcpo.evaluation.data_source import check_training_overlap
    from seqcpo.evaluation.evaluate import decoding_configs, generate_model

    _setup_logging()
    cfg = eval_config_from_args(args)
    cfg = dataclasses.replace(cfg, ppl=False, mauve="none")  # generation only
    with _out_dir(cfg) as out:
        source = example_source(args, cfg)
        try:
            labels = _labels(cfg)
            check_training_overlap(cfg.models, labels, source, cfg.allow_train_overlap, load_tokenizer_only)
            configs = decoding_configs(cfg, source.default_max_new_tokens())
            for path, label in zip(cfg.models, labels):
                # the tokenizer builds the examples; the model is loaded only if rows are missing
                generate_model(path, label, source, configs, out / "generations.jsonl", cfg)
                gc.collect()
        except ValueError as e:
            raise SystemExit(f"seqcpo: error: {e}") from None
    print("split: " + ", ".join(f"{k}={v}" for k, v in source.describe().items()))
    print(f"generations: {out / 'generations.jsonl'}")
    return 0


# ----------------------------------------------------------------------------- eval


def run_eval(args) -> int:
    from seqcpo.evaluation.evaluate import evaluate
    from seqcpo.evaluation.report import write_report

    _setup_logging()
    cfg = eval_config_from_args(args)
    labels, alphas = _labels(cfg), _alphas(cfg)
    with _out_dir(cfg) as out:
        source = example_source(args, cfg)
        try:
            results = evaluate(cfg, source, labels, alphas, out)
        except (ValueError, ImportError) as e:  # a bad judge option, an empty split, a missing metric package
            raise SystemExit(str(e)) from None
        write_report(results, out)
    print(f"report: {out / 'report.md'}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m seqcpo.evaluation.cli eval ...``); exit status 2 and one line for bad
    input, as ``seqcpo`` itself."""
    from seqcpo.config_loader import FlagParser

    parser = FlagParser(prog="seqcpo")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
