"""Document rows: MLE on every token of a row and CPO at anchors, in one forward pass per row.

A row is one chunk of one document (:mod:`seqcpo.data.documents`), ``n`` tokens. An *anchor* ``a``
(1 <= a <= n - C) splits it: the prefix ``x`` is the row's first ``a`` tokens, the gold ``y_0`` its next ``C``
(``continuation_tokens``), and K negatives ``y_1 .. y_K`` are made for that (x, y_0) pair exactly as for a window
(docs/method.md, "Negatives"). The loss (docs/method.md, "The objective", "Tasks") is the MLE term over every predicted
token of every row plus lambda times the CPO term averaged over the step's anchors.

One sequence holds a micro-batch's rows, each followed by its anchors' negative continuations as branches::

    [ row 0: t_0 .. t_{n-1} | a_0: y_1 | .. | y_K | a_1: y_1 | .. ][ row 1: .. ] (no pad)

A branch of anchor ``a`` has positions ``a, a+1, ..`` (where its tokens would sit in the row) and attends to
the row's tokens ``0 .. a-1`` and to itself causally; a row token attends to its row causally; nothing attends
across rows (document masking). The row's hidden states give every row token's log-prob (the MLE term) and each
anchor's gold log-prob ``logp(y_0|x)``, since ``y_0`` *is* the row's next C tokens; each negative's first token is
predicted at row position ``a - 1``, its others in its branch. The numbers are those of the anchors computed one
by one as windows with their full prefix (tests/test_document_rows.py): the row's tokens run once instead of
once per candidate per anchor. Attention runs as for :mod:`seqcpo.packing` (a FlexAttention block mask on CUDA,
per-row SDPA on the dense mask's blocks elsewhere).

Anchors are drawn per row from that row's own generator (:mod:`seqcpo.seeding`, seeded by (seed, row id, epoch,
"anchors"), the row id naming (document, chunk)): ``anchors_per_row`` distinct positions, or one every
``anchor_stride`` tokens. The count depends on the row's length only (:func:`anchor_count`), so a step's anchors
can be counted before any is drawn. With fixed negatives (``negatives_path``) every epoch keeps the epoch-0 draw
(:mod:`seqcpo.training.offline_documents`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch

from seqcpo.hf_model import attn_implementation, checkpointing_in_training, needs_grad, unwrap_model
from seqcpo.packing import AttentionBlock, packed_hidden
from seqcpo.token_logps import SequenceLogps, sum_token_logps, token_logps_from_hidden
from seqcpo.types import Example


# ---- anchors -------------------------------------------------------------------------------------------


def anchor_count(n: int, continuation_tokens: int, anchors_per_row: int, anchor_stride: int | None = None) -> int:
    """Anchors of a row of ``n`` tokens: positions ``a`` in ``1 .. n - C`` (a prefix token before, C gold tokens
    after); ``anchors_per_row`` of them, or all there are when fewer; with a stride, ``a = s, 2s, ..``.

    >>> anchor_count(10, 4, 8), anchor_count(100, 4, 8), anchor_count(10, 4, 8, anchor_stride=2)
    (6, 8, 3)
    """
    free = max(0, n - continuation_tokens)
    if anchor_stride is not None:
        return free // anchor_stride
    return min(anchors_per_row, free)


def choose_anchors(n: int, continuation_tokens: int, anchors_per_row: int, anchor_stride: int | None,
                   generator: torch.Generator) -> list[int]:
    """The anchors of a row of ``n`` tokens, increasing (:func:`anchor_count` of them); drawn without replacement
    from ``generator`` (the row's own), or every ``anchor_stride`` tokens (no draw)."""
    free = max(0, n - continuation_tokens)
    if anchor_stride is not None:
        return list(range(anchor_stride, free + 1, anchor_stride))
    k = min(anchors_per_row, free)
    if k == 0:
        return []
    return sorted(1 + int(i) for i in torch.randperm(free, generator=generator)[:k])


def anchor_examples(rows: Sequence[Sequence[int]], row_ids: Sequence[str], anchors: Sequence[Sequence[int]],
                    continuation_tokens: int) -> list[Example]:
    """Every anchor as a window: prefix ``row[:a]``, gold ``row[a:a+C]``, id ``"<row id>@<a>"`` (seeds its
    negatives), in row order then anchor order."""
    C = continuation_tokens
    return [
        Example(prefix_ids=list(row[:a]), continuation_ids=list(row[a:a + C]), meta={"id": f"{rid}@{a}"})
        for row, rid, row_anchors in zip(rows, row_ids, anchors)
        for a in row_anchors
    ]


# ---- the layout ----------------------------------------------------------------------------------------


@dataclass
class DocumentLayout:
    """B rows and their anchors' negative branches as one sequence of T tokens (see the module docstring).

    Attributes:
        input_ids, position_ids: (1, T) long.
        doc_ids: (T,) long, the row each token belongs to.
        segment_ids: (T,) long; 0 row token, else the branch (one per anchor and negative, from 1).
        visible: (T,) long, how many of its row's first tokens a token attends to (position + 1 in the row, a
            in a branch of anchor a).
        bounds: B pairs (start, end), each row's span with its branches.
        row_src, row_targets: (N_r,) long, the position predicting each row token 1..n-1 and that token.
        row_of_target: (N_r,) long, its row.
        gold_index: (M*C,) long, for each anchor in order, its gold tokens' indices into the row targets.
        neg_src, neg_targets, neg_cand: (N_n,) long, each negative token's predicting position, the token, and
            its candidate's flat index m*(K+1)+k.
        token_counts: (M, K+1) long, tokens per candidate of each of the M anchors.
        row_counts: (B,) long, predicted tokens per row (n - 1).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    segment_ids: torch.Tensor
    visible: torch.Tensor
    bounds: list[tuple[int, int]]
    row_src: torch.Tensor
    row_targets: torch.Tensor
    row_of_target: torch.Tensor
    gold_index: torch.Tensor
    gold_cand: torch.Tensor
    neg_src: torch.Tensor
    neg_targets: torch.Tensor
    neg_cand: torch.Tensor
    token_counts: torch.Tensor
    row_counts: torch.Tensor

    def attention_mask(self) -> torch.Tensor:
        """(1, 1, T, T) bool, True = attend: same row, and the key a row token the query sees (``position <
        visible[q]``) or an earlier token of the query's own branch."""
        doc, seg, vis, pos = self.doc_ids, self.segment_ids, self.visible, self.position_ids[0]
        T = doc.shape[0]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
        to_row = (seg == 0)[None, :] & (pos[None, :] < vis[:, None])
        own = (seg[:, None] == seg[None, :]) & (seg != 0)[None, :] & causal
        return ((doc[:, None] == doc[None, :]) & (to_row | own))[None, None]

    def attention_blocks(self) -> list[AttentionBlock]:
        """The same mask as blocks for :func:`seqcpo.packing.document_attention` on CPU: each row's tokens
        causally over the row, then each anchor's branches (contiguous, one anchor after another) over the row's
        first ``a`` tokens and their own tokens. Attention then costs ``n^2 / 2 + sum_a K C (a + K C)`` pairs a
        row, not the dense ``(n + M K C)^2``."""
        seg, vis = self.segment_ids.tolist(), self.visible.tolist()
        blocks = []
        for (s, e), n in zip(self.bounds, (self.row_counts + 1).tolist()):
            blocks.append(AttentionBlock(s, s + n, ((s, s + n),)))
            g0 = s + n
            while g0 < e:
                a, g1 = vis[g0], g0
                while g1 < e and vis[g1] == a:
                    g1 += 1
                own = torch.tensor(seg[g0:g1])
                branch = (own[:, None] == own[None, :]).tril()  # same branch, causal (a branch is contiguous)
                mask = torch.cat([torch.ones(g1 - g0, a, dtype=torch.bool), branch], dim=1)
                blocks.append(AttentionBlock(g0, g1, ((s, s + a), (g0, g1)), mask))
                g0 = g1
        return blocks

    def block_mask(self, block_size: int = 128):
        """The same mask as a FlexAttention ``BlockMask`` (1, 1, T, T); blocks across rows are skipped."""
        from torch.nn.attention.flex_attention import create_block_mask

        doc, seg, vis, pos = self.doc_ids, self.segment_ids, self.visible, self.position_ids[0]
        T = doc.shape[0]

        def mask_mod(b, h, q, kv):
            s_kv = seg[kv]
            to_row = (s_kv == 0) & (pos[kv] < vis[q])
            own = (s_kv == seg[q]) & (s_kv != 0) & (kv <= q)
            return (doc[q] == doc[kv]) & (to_row | own)

        return create_block_mask(mask_mod, 1, None, T, T, device=doc.device, BLOCK_SIZE=block_size)


def build_document_layout(
    rows: Sequence[Sequence[int]],
    anchors: Sequence[Sequence[int]],
    negatives: Sequence[Sequence[Sequence[int]]] | None,
    continuation_tokens: int,
    device: torch.device | str = "cpu",
) -> DocumentLayout:
    """Lay out B rows (token lists, >= 2 tokens each), their anchors (B increasing lists) and each anchor's K
    negatives (M lists of K token lists, anchors in row order; None or K = 0: the rows alone)."""
    C = continuation_tokens
    negatives = list(negatives) if negatives is not None else [[] for row in anchors for _ in row]
    M = sum(len(a) for a in anchors)
    if len(negatives) != M:
        raise ValueError(f"got negatives for {len(negatives)} anchors, the rows have {M}")
    k1 = 1 + (len(negatives[0]) if negatives else 0)
    t: dict[str, list] = {key: [] for key in ("ids", "pos", "doc", "seg", "vis", "row_src", "row_tgt", "row_of",
                                              "gold_index", "neg_src", "neg_tgt", "neg_cand")}
    bounds, counts = [], torch.zeros((M, k1), dtype=torch.long)
    m, branch, offset = 0, 0, 0  # anchor, branch id, index of the row's first target among the row targets
    for b, (row, row_anchors) in enumerate(zip(rows, anchors)):
        n, s = len(row), len(t["ids"])
        if n < 2:
            raise ValueError(f"row {b}: {n} tokens; a row needs at least two (one predicted)")
        t["ids"] += row
        t["pos"] += range(n)
        t["seg"] += [0] * n
        t["vis"] += range(1, n + 1)
        t["row_src"] += range(s, s + n - 1)
        t["row_tgt"] += row[1:]
        t["row_of"] += [b] * (n - 1)
        for a in row_anchors:
            if not 1 <= a <= n - C:
                raise ValueError(f"row {b}: anchor {a} outside 1..{n - C} (n={n}, continuation_tokens={C})")
            t["gold_index"] += range(offset + a - 1, offset + a - 1 + C)
            counts[m, 0] = C
            for k, neg in enumerate(negatives[m]):
                L, start = len(neg), len(t["ids"])
                counts[m, k + 1] = L
                branch += 1
                t["ids"] += neg
                t["pos"] += range(a, a + L)
                t["seg"] += [branch] * L
                t["vis"] += [a] * L
                if L:  # token 0 is predicted at the row's position a - 1, token i at the branch's token i - 1
                    t["neg_src"] += [s + a - 1, *range(start, start + L - 1)]
                t["neg_tgt"] += neg
                t["neg_cand"] += [m * k1 + k + 1] * L
            m += 1
        bounds.append((s, len(t["ids"])))
        t["doc"] += [b] * (len(t["ids"]) - s)
        offset += n - 1
    L_ = {key: torch.tensor([int(x) for x in v], dtype=torch.long, device=device) for key, v in t.items()}
    return DocumentLayout(
        input_ids=L_["ids"][None],
        position_ids=L_["pos"][None],
        doc_ids=L_["doc"],
        segment_ids=L_["seg"],
        visible=L_["vis"],
        bounds=bounds,
        row_src=L_["row_src"],
        row_targets=L_["row_tgt"],
        row_of_target=L_["row_of"],
        gold_index=L_["gold_index"],
        gold_cand=torch.arange(M, device=device).repeat_interleave(C) * k1,
        neg_src=L_["neg_src"],
        neg_targets=L_["neg_tgt"],
        neg_cand=L_["neg_cand"],
        token_counts=counts.to(device),
        row_counts=torch.tensor([len(r) - 1 for r in rows], dtype=torch.long, device=device),
    )


# ---- log-probs -----------------------------------------------------------------------------------------


@dataclass
class DocumentLogps:
    """What one pass over a :class:`DocumentLayout` gives.

    Attributes:
        row_summed: (B,) float32, the summed log-probs of each row's predicted tokens (the MLE term's).
        row_counts: (B,) long, predicted tokens per row.
        anchors: :class:`~seqcpo.token_logps.SequenceLogps` of the M anchors, (M, K+1), column 0 the gold.
    """

    row_summed: torch.Tensor
    row_counts: torch.Tensor
    anchors: SequenceLogps


def document_logps(model, layout: DocumentLayout, *, length_normalize: bool = False,
                   chunk_size: int = 1024) -> DocumentLogps:
    """Row and anchor log-probs from one forward pass over ``layout`` (see the module docstring);
    ``length_normalize`` applies to the anchors' candidates (the CPO term), never to the rows."""
    hidden = _hidden(model, layout)  # (T, H)
    nr = layout.row_src.shape[0]
    src = torch.cat([layout.row_src, layout.neg_src])
    flat = token_logps_from_hidden(model, hidden[src], torch.cat([layout.row_targets, layout.neg_targets]),
                                   chunk_size=chunk_size)  # (N_r + N_n,)
    row_flat = flat[:nr]
    B = layout.row_counts.shape[0]
    row_summed = torch.zeros(B, dtype=torch.float32, device=flat.device).index_add(0, layout.row_of_target, row_flat)
    anchor_flat = torch.cat([row_flat[layout.gold_index], flat[nr:]])
    anchor_cand = torch.cat([layout.gold_cand, layout.neg_cand])
    anchors = sum_token_logps(anchor_flat, anchor_cand, layout.token_counts, length_normalize)
    return DocumentLogps(row_summed=row_summed, row_counts=layout.row_counts, anchors=anchors)


@torch.no_grad()
def anchor_gold_logits(model, layout: DocumentLayout, continuation_tokens: int) -> list[torch.Tensor]:
    """M tensors (C, V): for each anchor, the logits predicting its gold tokens, from a pass over the rows
    (negative branches, if any, are ignored); what mean-field negatives draw from (docs/method.md, "Negatives",
    row MN), the same rows of logits a window pass over ``x + y_0`` gives."""
    from seqcpo.token_logps import final_logit_softcap

    hidden = _hidden(model, layout)
    h = hidden[layout.row_src[layout.gold_index]]  # (M*C, H)
    inner = unwrap_model(model)
    logits = inner.get_output_embeddings()(h).float()
    cap = final_logit_softcap(inner)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return list(logits.split(continuation_tokens)) if h.shape[0] else []


def _hidden(model, layout: DocumentLayout) -> torch.Tensor:
    """(T, H) final hidden states of the layout. Under activation checkpointing without FlexAttention the model's
    own attention runs the dense mask (:func:`seqcpo.packing.packed_hidden`): one forward per row then, so the
    mask is a row's (n + branches)^2, never the whole micro-batch's T^2."""
    if not (checkpointing_in_training(model) and needs_grad(model) and attn_implementation(model) != "flex_attention"
            and len(layout.bounds) > 1):
        return packed_hidden(model, layout)[0]
    mask = layout.attention_mask()
    parts = []
    for s, e in layout.bounds:
        one = SimpleNamespace(input_ids=layout.input_ids[:, s:e], position_ids=layout.position_ids[:, s:e],
                              bounds=[(0, e - s)], attention_mask=lambda s=s, e=e: mask[..., s:e, s:e])
        parts.append(packed_hidden(model, one)[0])
    return torch.cat(parts)


def document_tokens(rows: Sequence[Sequence[int]], anchors: Sequence[Sequence[int]], k: int,
                    continuation_tokens: int, negative_tokens: int | None = None) -> tuple[int, int]:
    """(tokens one pass over the rows and their branches runs, ``sum n + M * K * L`` for L-token negatives;
    tokens the same anchors run as full-prefix windows in the prefix-shared layout, ``sum (a + C + K * L)``).
    ``negative_tokens`` L defaults to C (TN, BN and MN negatives are at most C long; AN ones up to
    ``an_max_new_tokens``), so the counts are what a step plans its memory for (``seqcpo train --dry-run``)."""
    C = continuation_tokens
    L = C if negative_tokens is None else negative_tokens
    M = sum(len(a) for a in anchors)
    rows_tokens = sum(len(r) for r in rows) + M * k * L
    windows = sum(a + C + k * L for row in anchors for a in row)
    return rows_tokens, windows
