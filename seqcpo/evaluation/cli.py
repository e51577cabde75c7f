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

import argparse
import dataclasses
import gc
import json
import logging
import sys
from pathlib import Path

from seqcpo.config_loader import ConfigError, check_output_dir, load_dataclass, read_yaml, resolve
from seqcpo.evaluation.config import EvalConfig, JudgeConfig

logger = logging.getLogger(__name__)

ENSEMBLE_FILE = "seqcpo_ensemble.json"
DATA_OVERRIDES = {  # CLI flag dest -> DataConfig field
    "dataset": "dataset",
    "task": "task",
    "prefix_tokens": "prefix_tokens",
    "continuation_tokens": "continuation_tokens",
    "split_seed": "split_seed",
    "validation_size": "validation_size",
    "test_size": "test_size",
    "prompt_template": "prompt_template",
    "max_prefix_tokens": "max_prefix_tokens",
    "max_continuation_tokens": "max_continuation_tokens",
}
# argparse dest -> the EvalConfig field it sets ("judge.x": a JudgeConfig field); flags left unset keep the
# config's value. The store_true flags set the field to False.
EVAL_FLAGS = {
    "models": "models", "labels": "labels", "alphas": "alphas", "head_to_head": "head_to_head", "out": "out",
    "data_config": "data_config", "split": "split", "num_examples": "num_examples", "decoding": "decoding",
    "max_new_tokens": "max_new_tokens", "seed": "seed", "batch_size": "batch_size", "dtype": "dtype",
    "device": "device", "order": "order", "order_seed": "order_seed", "mauve_features": "mauve",
    "no_ppl": "ppl", "no_progress": "progress",
    "judge": "judge.backend", "judge_model": "judge.model", "judge_url": "judge.url",
    "judge_api_key_env": "judge.api_key_env", "judge_prompt": "judge.prompt",
    "judge_concurrency": "judge.concurrency", "judge_max_retries": "judge.max_retries",
    "judge_timeout": "judge.timeout", "judge_max_tokens": "judge.max_tokens", "judge_cache": "judge.cache",
    "judge_no_debias": "judge.debias", "judge_tie_margin": "judge.tie_margin",
}
_SWITCHES = ("no_ppl", "no_progress", "judge_no_debias")


def _help(field_path: str, extra: str = "") -> str:
    """The flag's help: the EvalConfig field's help and default (declared once, there)."""
    cls, name = (JudgeConfig, field_path[6:]) if field_path.startswith("judge.") else (EvalConfig, field_path)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else None
    text = f.metadata.get("help", "")
    if extra:
        text = f"{extra} {text}"
    return f"{text} (default: {default})" if default not in (None, "") and f.type not in ("bool",) else text


def register(subparsers) -> None:
    """Add the ``generate`` and ``eval`` subcommands to an argparse subparsers object."""
    gen = subparsers.add_parser(
        "generate",
        help="generate continuations from checkpoints (resumable JSONL)",
        description="Generate continuations of a data split from one or more checkpoints.",
        allow_abbrev=False,
    )
    _add_common_args(gen)
    gen.set_defaults(func=run_generate)

    ev = subparsers.add_parser(
        "eval",
        help="generate, judge and score checkpoints; write report.md, results.json and plots",
        description="Win rate against the gold (pairwise judge), MAUVE, ROUGE-L, distinct-n, repetition and "
        "gold perplexity for checkpoints x decoding configurations.",
        allow_abbrev=False,  # "--judge-api-key sk-..." must fail, not pass as an abbreviation of -env
    )
    _add_common_args(ev)
    # judge: strings here; the one config loader reads them by the JudgeConfig field's type
    ev.add_argument("--judge", choices=("local", "openai", "none"), help=_help("judge.backend"))
    ev.add_argument("--judge-model", help=_help("judge.model"))
    ev.add_argument("--judge-url", help=_help("judge.url"))
    ev.add_argument("--judge-api-key-env", help=_help("judge.api_key_env"))
    ev.add_argument("--judge-prompt", help=_help("judge.prompt"))
    ev.add_argument("--judge-concurrency", help=_help("judge.concurrency"))
    ev.add_argument("--judge-max-retries", help=_help("judge.max_retries"))
    ev.add_argument("--judge-timeout", help=_help("judge.timeout"))
    ev.add_argument("--judge-max-tokens", help=_help("judge.max_tokens"))
    ev.add_argument("--judge-cache", help=_help("judge.cache"))
    ev.add_argument("--judge-no-debias", action="store_true", help="local: " + _help("judge.debias", "turn off:"))
    ev.add_argument("--judge-tie-margin", help=_help("judge.tie_margin"))
    ev.add_argument("--order", choices=("both", "random"), help=_help("order"))
    ev.add_argument("--order-seed", help=_help("order_seed"))
    ev.add_argument("--head-to-head", nargs=2, action="append", metavar=("X", "Y"),
                    help="also judge model X against model Y (labels or paths); repeatable")
    # metrics
    ev.add_argument("--mauve-features", choices=("minilm", "model", "none"), help=_help("mauve"))
    ev.add_argument("--no-ppl", action="store_true", help="skip the gold-continuation perplexity")
    ev.add_argument("--alphas", nargs="+", help=_help("alphas"))
    ev.set_defaults(func=run_eval)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML with EvalConfig fields (top level or under 'eval:'); flags win")
    g = p.add_argument_group("models")
    g.add_argument("--models", nargs="+", help=_help("models"))
    g.add_argument("--labels", nargs="+", help=_help("labels"))
    g.add_argument("--dtype", help=_help("dtype"))
    g.add_argument("--device", help=_help("device"))
    g.add_argument("--batch-size", help=_help("batch_size"))
    d = p.add_argument_group("data (a YAML file and/or flags; flags win)")
    d.add_argument("--data-config", help=_help("data_config"))
    d.add_argument("--dataset", help="wiki, a local .jsonl/.json/.parquet/.txt file, or a Hub dataset id")
    d.add_argument("--task", choices=("continuation", "instruction"))
    d.add_argument("--prefix-tokens")
    d.add_argument("--continuation-tokens")
    d.add_argument("--prompt-template", choices=("auto", "plain", "chat"))
    d.add_argument("--max-prefix-tokens")
    d.add_argument("--max-continuation-tokens")
    d.add_argument("--validation-size")
    d.add_argument("--test-size")
    d.add_argument("--split-seed")
    d.add_argument("--split", choices=("train", "validation", "test"), help=_help("split"))
    d.add_argument("--num-examples", help=_help("num_examples"))
    o = p.add_argument_group("decoding")
    o.add_argument("--decoding", nargs="+", help=_help("decoding"))
    o.add_argument("--max-new-tokens", help=_help("max_new_tokens"))
    o.add_argument("--seed", help=_help("seed"))
    p.add_argument("--out", help=_help("out"))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ----------------------------------------------------------------------------- flags -> configs


def eval_config_from_args(args) -> EvalConfig:
    """The :class:`EvalConfig` of ``--config`` (if any) overridden by the flags given; SystemExit naming the
    flag (or file) on a bad value."""
    sources = []
    try:
        if getattr(args, "config", None):
            sources.append((args.config, read_yaml(args.config, section="eval")))
        for dest, target in EVAL_FLAGS.items():
            value = getattr(args, dest, None)
            if value is None or (dest in _SWITCHES and not value):
                continue
            if dest in _SWITCHES:
                value = False
            flag = "--" + dest.replace("_", "-")
            if target.startswith("judge."):
                sources.append((flag, {"judge": {target[6:]: value}}))
            else:
                sources.append((flag, {target: value}))
        cfg = EvalConfig(**resolve(EvalConfig, sources))
    except ConfigError as e:
        raise SystemExit(f"seqcpo: error: {e}") from None
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
        raise SystemExit(f"seqcpo: error: {e}") from None
    return cfg


def data_config_from_args(args):
    """A DataConfig from ``--data-config`` (top level or its ``data:`` section) overridden by flags."""
    from seqcpo.data import DataConfig

    flags = {DATA_OVERRIDES[d]: getattr(args, d) for d in DATA_OVERRIDES if getattr(args, d, None) is not None}
    try:
        cfg = load_dataclass(DataConfig, args.data_config, flags, section="data")
    except ConfigError as e:
        raise SystemExit(f"seqcpo: error: {e}") from None
    if cfg.task == "document":  # a document row has no prompt to continue: evaluate on windows of the same data
        raise SystemExit("seqcpo: error: task=document (from --data-config) trains on document rows; evaluate on "
                         "windows of the same data: --task continuation --prefix-tokens P --continuation-tokens C")
    return cfg


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


def _out_dir(cfg: EvalConfig) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"seqcpo: error: --out {out}: cannot create the folder ({e.strerror or e})") from None
    return out


# ----------------------------------------------------------------------------- generate


def run_generate(args) -> int:
    from seqcpo.evaluation.evaluate import ExampleSource, decoding_configs, generate_model

    _setup_logging()
    cfg = eval_config_from_args(args)
    cfg = dataclasses.replace(cfg, ppl=False, mauve="none")  # generation only
    out = _out_dir(cfg)
    try:
        source = ExampleSource(data_config_from_args(args), cfg.split, cfg.num_examples)
        configs = decoding_configs(cfg, source.default_max_new_tokens())
        for path, label in zip(cfg.models, _labels(cfg)):
            # the tokenizer builds the examples; the model is loaded only if rows are missing
            generate_model(path, label, source, configs, out / "generations.jsonl", cfg)
            gc.collect()
    except ValueError as e:
        raise SystemExit(f"seqcpo: error: {e}") from None
    print(f"generations: {out / 'generations.jsonl'}")
    return 0


# ----------------------------------------------------------------------------- eval


def run_eval(args) -> int:
    from seqcpo.evaluation.evaluate import evaluate
    from seqcpo.evaluation.report import write_report

    _setup_logging()
    cfg = eval_config_from_args(args)
    labels, alphas = _labels(cfg), _alphas(cfg)
    out = _out_dir(cfg)
    try:
        results = evaluate(cfg, data_config_from_args(args), labels, alphas, out)
    except (ValueError, ImportError) as e:  # a bad judge option, an empty split, a missing metric package
        raise SystemExit(str(e)) from None
    write_report(results, out)
    print(f"report: {out / 'report.md'}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m seqcpo.evaluation.cli eval ...``)."""
    parser = argparse.ArgumentParser(prog="seqcpo")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
