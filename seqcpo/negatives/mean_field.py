"""MN, mean-field negatives (docs/method.md, "Negatives" table, row MN; ranked variant MNR).

Construction: one teacher-forced forward pass over ``x + y_0``; the logits at position
``len(x) + t - 1`` predict gold token ``t``. For each of the K negatives, every continuation position
independently is replaced with probability ``c`` by the model's prediction for it: a sample from
``softmax(logits / temperature)`` when ``sample`` (docs/method.md default, temperature 1), else the argmax.
docs/method.md default ``c = 0.15``.

Ranked (MNR): the K negatives are drawn at K values of ``c`` spread linearly over ``c_range``
(default [0.05, 0.5]) in increasing order; a smaller ``c`` is better, ``score = -c``.

Dropped rule (shared by all generators): a negative identical to the gold (no position replaced, or
every replaced token equal to the gold's) is redrawn, at most ``max_tries`` draws in all; if it is still
a copy it is kept with ``valid = False`` and the loss masks it out. An empty gold always gives that.

:class:`MeanFieldNegatives` runs the pass itself, or takes ``gold_logits`` already computed by a pass over
``x + y_0`` of the same model: the trainer's two-pass layout (:mod:`seqcpo.two_pass`) hands it the logits of
the reference's (or the policy's) gold branch, so MN then costs no forward pass of its own. Both ways draw the
same negatives from the same logits and generator state.
"""

from __future__ import annotations

from typing import Sequence

import torch

from seqcpo.negatives.base import NegativesBuilder, check_k
from seqcpo.sampling import model_device, sample_categorical, seeded_model_rng
from seqcpo.padding import pad_batch
from seqcpo.seeding import Generators, joint_seed, per_example_generators
from seqcpo.types import Example, Negatives


def mean_field_negatives_from_logits(
    golds: Sequence[Sequence[int]],
    logits: Sequence[torch.Tensor],
    k: int,
    c: float | Sequence[float] = 0.15,
    *,
    sample: bool = True,
    temperature: float = 1.0,
    generator: Generators,
    max_tries: int = 8,
    ranked: bool = False,
    source: str = "mn",
) -> Negatives:
    """Mean-field negatives from teacher-forced logits (docs/method.md, "Negatives", row MN).

    Args:
        golds: B gold continuations ``y_0`` (token-id lists, length T_b).
        logits: B tensors ``(T_b, V)``; row t is the model's logits *predicting* gold token t, i.e. the
            logits at position ``len(prefix) + t - 1`` of a pass over ``prefix + gold``.
        k: negatives per example.
        c: the replacement probability, one float for all K negatives or K floats (negative i uses c[i]).
        sample: replace with a sample from ``softmax(logits / temperature)`` (True) or with the argmax.
        generator: the only source of randomness: one generator per example (a list, see
            :mod:`seqcpo.seeding`), so an example's negatives depend on its own stream only, or one for the call.
        max_tries: draws in all per negative before a copy of the gold is kept as ``valid = False``.
        ranked: return each row sorted best first with ``scores[b][i] = -c_i`` (smaller c = better).

    Returns:
        ``Negatives`` with ``ids[b][i]`` of length T_b (same length as the gold).
    """
    check_k("mn", k)
    if len(golds) != len(logits):
        raise ValueError(f"mn: got {len(golds)} golds but {len(logits)} logits tensors")
    cs = [float(c)] * k if isinstance(c, (int, float)) else [float(x) for x in c]
    if len(cs) != k:
        raise ValueError(f"mn: got {len(cs)} values of c for k={k}")
    if any(not 0.0 <= x <= 1.0 for x in cs):
        raise ValueError(f"mn: every c must lie in [0, 1], got {cs}")
    if sample and temperature <= 0:
        raise ValueError(f"mn: temperature must be > 0 when sampling, got {temperature}")
    c_col = torch.tensor(cs).unsqueeze(1)  # (k, 1)
    gens = per_example_generators(generator, len(golds))

    out = NegativesBuilder(source, ranked)
    for gold_list, lg, g in zip(golds, logits, gens):
        gold = torch.tensor(list(gold_list), dtype=torch.long)  # (T,)
        T = gold.numel()
        if lg.shape[0] != T:
            raise ValueError(f"mn: logits have {lg.shape[0]} rows for a gold of {T} tokens")
        if T == 0:
            ids, valid = [[] for _ in range(k)], [False] * k
        else:
            lg = lg.detach().float()
            probs = torch.softmax(lg / temperature, dim=-1) if sample else None  # (T, V)
            argmax = None if sample else lg.argmax(-1).cpu()  # (T,)
            negs = gold.expand(k, T).clone()  # (k, T)
            rows = torch.arange(k)
            for _ in range(max(1, max_tries)):
                n = rows.numel()
                replace = torch.rand((n, T), generator=g) < c_col[rows]  # (n, T)
                if sample:
                    pred = sample_categorical(probs, g, n).T.cpu()  # (n, T)
                else:
                    pred = argmax.expand(n, T)
                negs[rows] = torch.where(replace, pred, gold)
                rows = (negs == gold).all(dim=1).nonzero().flatten()  # copies of the gold: redraw them
                if rows.numel() == 0:
                    break
            valid = (negs != gold).any(dim=1).tolist()
            ids = negs.tolist()
        scores = [-x for x in cs]
        out.add(ids, valid, scores)
    return out.build()


def continuation_logits(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
) -> list[torch.Tensor]:
    """One teacher-forced pass over ``prefix + gold`` (right-padded batch, no grad).

    Returns B tensors ``(T_b, V)``: row t predicts gold token t. With an empty prefix nothing predicts
    token 0, so its row is a point mass on the gold token (MN then never changes it).
    """
    device = model_device(model)
    seqs = [list(ex.prefix_ids) + list(ex.continuation_ids) for ex in examples]
    input_ids, attention_mask = pad_batch(seqs, pad_token_id, min_width=1)  # (B, L) each
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # (B, L, V)
    out = []
    for b, ex in enumerate(examples):
        P, T = len(ex.prefix_ids), len(ex.continuation_ids)
        if P > 0:
            out.append(logits[b, P - 1 : P - 1 + T])
        elif T == 0:
            out.append(logits[b, :0])
        else:
            first = torch.full_like(logits[b, :1], -1e4)  # (1, V)
            first[0, ex.continuation_ids[0]] = 0.0
            out.append(torch.cat([first, logits[b, : T - 1]], dim=0))
    return out


class MeanFieldNegatives:
    """MN: the gold with a random fraction ``c`` of its tokens replaced by the model's predictions.

    Args:
        model: a causal LM (docs/method.md default: the reference model); its train/eval mode is left as is,
            and any dropout in its (batched) pass is seeded by :func:`seqcpo.seeding.joint_seed` of the examples'
            generators, which does not advance them.
        c: the replacement probability (unranked).
        sample: sample the replacement (True) or take the argmax.
        temperature: the sampling temperature.
        c_range: (low, high) for ranked MNR: K values of c spaced linearly, increasing.
        pad_token_id: the pad id for the right-padded forward pass.
        max_tries: draws in all per negative before a copy of the gold is dropped (``valid = False``).
    """

    name = "mn"
    needs_model = True
    uses_gold_logits = True  # accepts ``gold_logits`` from a pass the caller already ran

    def __init__(
        self,
        model: torch.nn.Module,
        c: float = 0.15,
        sample: bool = True,
        temperature: float = 1.0,
        c_range: tuple[float, float] = (0.05, 0.5),
        pad_token_id: int = 0,
        max_tries: int = 8,
    ):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"mn: c must lie in [0, 1], got {c}")
        lo, hi = c_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mn: c_range must satisfy 0 <= low <= high <= 1, got {c_range}")
        if sample and temperature <= 0:
            raise ValueError(f"mn: temperature must be > 0 when sampling, got {temperature}")
        self.model = model
        self.c = c
        self.sample = sample
        self.temperature = temperature
        self.c_range = (float(lo), float(hi))
        self.pad_token_id = pad_token_id
        self.max_tries = max_tries

    def ranked_cs(self, k: int) -> list[float]:
        """The K increasing values of c used by MNR (one value, ``c_range[0]``, when K = 1)."""
        return torch.linspace(self.c_range[0], self.c_range[1], k, dtype=torch.float64).tolist()

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: Generators,
        ranked: bool = False,
        gold_logits: Sequence[torch.Tensor] | None = None,
    ) -> Negatives:
        """K negatives per example; ``generator``: one per example (or one for the call); ``gold_logits``: B
        tensors (T_b, V) from a pass over ``prefix + gold`` of this generator's model (row t predicts gold token
        t), used instead of running the pass here. Either way the same negatives come from the same streams."""
        gens = per_example_generators(generator, len(examples))
        if gold_logits is None:
            # the batched pass's own randomness (dropout) cannot be per example; it never advances their streams
            with seeded_model_rng(joint_seed(gens), model_device(self.model)):
                logits = continuation_logits(self.model, examples, self.pad_token_id)
        else:
            logits = list(gold_logits)
        return mean_field_negatives_from_logits(
            [ex.continuation_ids for ex in examples],
            logits,
            k,
            self.ranked_cs(k) if ranked else self.c,
            sample=self.sample,
            temperature=self.temperature,
            generator=gens,
            max_tries=self.max_tries,
            ranked=ranked,
            source=self.name,
        )
