"""Evaluation of saved checkpoints: generation, pairwise judges, win rates, judge-free metrics, reports.

This package reads checkpoints from disk (:mod:`seqcpo.evaluation.checkpoints`) and never imports training
code (``seqcpo.training``, ``seqcpo.losses``, ``seqcpo.negatives``); a test checks it with ``ast``.

Typical use from Python::

    from seqcpo.evaluation import parse_decoding, generate_continuations, LocalJudge, win_rate_vs_gold
    rows = generate_continuations("runs/cpo", examples, [parse_decoding("greedy")], "out/generations.jsonl")
    items = win_rate_vs_gold(LocalJudge("judge-model-dir"), rows)

From the shell: ``seqcpo generate ...`` and ``seqcpo eval ...`` (see :mod:`seqcpo.evaluation.cli`).
"""

from seqcpo.evaluation.checkpoints import checkpoint_identity, load_checkpoint, load_tokenizer_only
from seqcpo.decoding import DecodingConfig
from seqcpo.evaluation.generate import generate_continuations, parse_decoding, read_generations
from seqcpo.evaluation.judges import (
    LocalJudge,
    OpenAIJudge,
    PairwiseJudge,
    Verdict,
    check_judge,
    load_judge_prompt,
    parse_answer,
)
from seqcpo.evaluation.metrics import (
    MauveResult,
    distinct_n,
    gold_perplexity,
    mauve_score,
    repeated_ngram_rate,
    rouge_l,
)
from seqcpo.evaluation.winrate import (
    ItemResult,
    WinRate,
    combine_orders,
    head_to_head,
    summarize,
    summarize_by_category,
    wilson_interval,
    win_rate_vs_gold,
)

__all__ = [
    "DecodingConfig",
    "ItemResult",
    "LocalJudge",
    "MauveResult",
    "OpenAIJudge",
    "PairwiseJudge",
    "Verdict",
    "WinRate",
    "check_judge",
    "checkpoint_identity",
    "combine_orders",
    "distinct_n",
    "generate_continuations",
    "gold_perplexity",
    "head_to_head",
    "load_checkpoint",
    "load_judge_prompt",
    "load_tokenizer_only",
    "mauve_score",
    "parse_answer",
    "parse_decoding",
    "read_generations",
    "repeated_ngram_rate",
    "rouge_l",
    "summarize",
    "summarize_by_category",
    "wilson_interval",
    "win_rate_vs_gold",
]
