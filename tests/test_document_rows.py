"""Document rows (seqcpo.document_rows, seqcpo.training.document_step): one forward pass per row gives the loss and
the gradients of the same anchors computed one by one as windows with their full prefix (tiny Llama and GPT-2,
within 1e-5 relative), rows never see each other, MN's logits are the window pass's, anchors are seeded per
(document, chunk), and a trainer step on rows equals the naive one and does not depend on its split."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_EOS, TINY_PAD, make_tiny_gpt2, make_tiny_llama
from seqcpo.document_rows import (
    anchor_count,
    anchor_examples,
    anchor_gold_logits,
    build_document_layout,
    choose_anchors,
    document_logps,
    document_tokens,
)
from seqcpo.logps import naive_sequence_logps
from seqcpo.losses import cpo_loss_per_example
from seqcpo.negatives import build_negative_generator
from seqcpo.negatives.mean_field import continuation_logits
from seqcpo.seeding import example_generators
from seqcpo.types import CandidateBatch, Example

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL = 1e-5


def _rows(seed=0, lengths=(40, 9, 25, 3), vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ---- anchors


def test_anchor_rule_counts_draws_and_strides():
    assert [anchor_count(n, 4, 3) for n in (1, 4, 5, 6, 7, 100)] == [0, 0, 1, 2, 3, 3]
    assert [anchor_count(n, 4, 3, anchor_stride=5) for n in (8, 9, 14, 15)] == [0, 1, 2, 2]
    for seed in range(20):
        a = choose_anchors(12, 4, 3, None, torch.Generator().manual_seed(seed))
        assert len(a) == 3 and a == sorted(set(a)) and all(1 <= x <= 8 for x in a)
    assert choose_anchors(6, 4, 8, None, torch.Generator()) == [1, 2]  # a short row: every position it has
    assert choose_anchors(20, 4, 0, 5, None) == [5, 10, 15]
    # seeded per (document, chunk): the same row id and epoch draw the same anchors, another chunk other ones
    draw = lambda rid, epoch=0: choose_anchors(  # noqa: E731
        500, 4, 8, None, example_generators(0, [rid], epoch, "anchors")[0])
    assert draw("doc7#1") == draw("doc7#1")
    assert len({tuple(draw(r)) for r in ("doc7", "doc7#1", "doc8")} | {tuple(draw("doc7", 1))}) == 4


# ---- the layout


def test_layout_by_hand():
    """Row 5 6 7 8 9 with an anchor at 2 (gold 7 8) and negatives [3] and [4 1]; a second row 10 11 alone."""
    lay = build_document_layout([[5, 6, 7, 8, 9], [10, 11]], [[2], []], [[[3], [4, 1]]], continuation_tokens=2)
    assert lay.input_ids.tolist() == [[5, 6, 7, 8, 9, 3, 4, 1, 10, 11]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 2, 3, 0, 1]]
    assert lay.segment_ids.tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 0, 0]
    assert lay.bounds == [(0, 8), (8, 10)]
    # negatives' first tokens predicted at the row's position a - 1 = 1; the second of [4 1] at its own branch
    assert lay.neg_src.tolist() == [1, 1, 6] and lay.neg_targets.tolist() == [3, 4, 1]
    assert lay.gold_index.tolist() == [1, 2]  # row targets 6 7 8 9 | 11: the gold 7 8 is targets 1 and 2
    assert lay.token_counts.tolist() == [[2, 1, 2]] and lay.row_counts.tolist() == [4, 1]
    m = lay.attention_mask()[0, 0].int()
    assert m[6].tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0, 0]  # branch [4 1]: row tokens 0..a-1, then itself
    assert m[7].tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # a row token: its row, causally, never a branch
    assert m[9].tolist() == [0] * 8 + [1, 1]  # row 1 never sees row 0
    assert document_tokens([[5] * 1024], [[100] * 8], 4, 64) == (1024 + 8 * 4 * 64, 8 * (100 + 5 * 64))


def test_attention_blocks_hold_exactly_the_dense_mask():
    """The CPU path's blocks (a row causally, each anchor's branches over the row's first a tokens and
    themselves) rebuild the dense mask pair for pair, and cover every query once, in order."""
    rows = [[5, 6, 7, 8, 9, 10, 11], [10, 11], [3, 4, 5, 6]]
    anchors = [[1, 3, 4], [], [2]]
    negs = [[[3], [4, 1, 2]], [[], [7, 7]], [[9, 9, 9], [2]], [[1, 2], [3]]]
    lay = build_document_layout(rows, anchors, negs, continuation_tokens=2)
    T = lay.input_ids.shape[1]
    rebuilt = torch.zeros(T, T, dtype=torch.bool)
    q = 0
    for blk in lay.attention_blocks():
        assert blk.q0 == q
        keys = torch.cat([torch.arange(s, e) for s, e in blk.key_spans])
        mask = blk.mask if blk.mask is not None else torch.ones(len(keys), len(keys), dtype=torch.bool).tril()
        assert mask.shape == (blk.q1 - blk.q0, len(keys))
        rebuilt[blk.q0:blk.q1, keys] = mask
        q = blk.q1
    assert q == T
    assert torch.equal(rebuilt, lay.attention_mask()[0, 0])
    assert len(lay.attention_blocks()) == 3 + 4  # a block per row, one per anchor


def _negatives(examples, k, seed=3, vocab=96, eos=TINY_EOS):
    """Random negatives of 1..C tokens, some ending in EOS, one empty, one equal to its gold (dropped)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, ex in enumerate(examples):
        row = []
        for j in range(k):
            n = int(torch.randint(1, len(ex.continuation_ids) + 1, (1,), generator=g))
            row.append(torch.randint(3, vocab, (n,), generator=g).tolist() + ([eos] if j == 1 else []))
        out.append(row)
    out[0][0] = []
    out[1][0] = list(examples[1].continuation_ids)
    return out


def _document_loss(model, reference, rows, anchors, negs, C, beta, ranked, length_normalize, mask):
    lay = build_document_layout(rows, anchors, negs, C)
    out = document_logps(model, lay, length_normalize=length_normalize, chunk_size=7)
    with torch.no_grad():
        ref = document_logps(reference, lay, length_normalize=length_normalize).anchors.logps
    cpo = cpo_loss_per_example(out.anchors.logps, ref, beta, ranked=ranked, mask=mask)
    return -out.row_summed.sum() / lay.row_counts.sum() + 0.7 * cpo.mean(), out


def _window_loss(model, reference, rows, examples, negs, beta, ranked, length_normalize, mask, lam=0.7, term=None):
    """The naive form: every row's MLE in its own full-vocabulary pass; every anchor on its own, one window of
    its full prefix per candidate (seqcpo.logps.naive_sequence_logps); ``term(pol, ref, mask)`` the per-example
    preference loss (CPO's by default)."""
    nll = tokens = 0
    for row in rows:
        one = CandidateBatch([row[:1]], [[row[1:]]], [[True]])
        nll = nll - naive_sequence_logps(model, one).summed[0, 0]
        tokens += len(row) - 1
    pol, ref = [], []
    for ex, neg in zip(examples, negs):
        one = CandidateBatch([ex.prefix_ids], [[ex.continuation_ids] + neg], [[True] * (len(neg) + 1)])
        pol.append(naive_sequence_logps(model, one, length_normalize=length_normalize).logps)
        with torch.no_grad():  # reference None: reference-free, zeros
            ref.append(torch.zeros_like(pol[-1]) if reference is None
                       else naive_sequence_logps(reference, one, length_normalize=length_normalize).logps)
    pol, ref = torch.cat(pol), torch.cat(ref)
    pref = term(pol, ref, mask) if term else cpo_loss_per_example(pol, ref, beta, ranked=ranked, mask=mask)
    return nll / tokens + lam * pref.mean(), pol


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ranked, length_normalize", [(False, False), (True, True)])
def test_one_pass_per_row_equals_the_anchors_as_full_prefix_windows(make, attn, ranked, length_normalize):
    """Loss and every gradient within 1e-5 relative; a short row with no anchor beside long ones."""
    model, reference = make(), make(seed=1)
    for m in (model, reference):
        m.config._attn_implementation = attn
    model.train()
    C, K = 5, 3
    rows = _rows()
    gens = example_generators(0, ["a", "b", "c", "d"], 0, "anchors")
    anchors = [choose_anchors(len(r), C, 4, None, g) for r, g in zip(rows, gens)]
    assert [len(a) for a in anchors] == [4, 4, 4, 0]
    examples = anchor_examples(rows, ["a", "b", "c", "d"], anchors, C)
    negs = _negatives(examples, K)
    mask = torch.tensor([[True] + [n != e.continuation_ids for n in row] for e, row in zip(examples, negs)])
    assert not mask.all()
    args = (0.5, ranked, length_normalize, mask)
    model.zero_grad(set_to_none=True)
    doc, doc_out = _document_loss(model, reference, rows, anchors, negs, C, *args)
    doc.backward()
    g_doc = _grads(model)
    model.zero_grad(set_to_none=True)
    win, win_logps = _window_loss(model, reference, rows, examples, negs, *args)
    win.backward()
    g_win = _grads(model)
    assert doc.item() == pytest.approx(win.item(), rel=REL)
    assert _relative(doc_out.anchors.logps.detach(), win_logps.detach()) < REL
    assert g_win.norm() > 1e-3 and _relative(g_doc, g_win) < REL


def test_rows_never_see_each_other():
    model = make_tiny_llama()
    rows = _rows(lengths=(20, 15))
    anchors = [[3, 9], [4]]
    negs = [[[7, 8]], [[9]], [[10, 11, 12]]]
    with torch.no_grad():
        a = document_logps(model, build_document_layout(rows, anchors, negs, 4))
        rows2 = [rows[0], [50] * 15]
        b = document_logps(model, build_document_layout(rows2, anchors, negs, 4))
    assert abs(float(a.row_summed[0] - b.row_summed[0])) < 1e-5
    assert torch.allclose(a.anchors.logps[:2], b.anchors.logps[:2], atol=1e-5)
    assert not torch.allclose(a.anchors.logps[2], b.anchors.logps[2], atol=1e-3)


def test_mn_logits_from_the_row_pass_are_the_window_pass_logits():
    model = make_tiny_gpt2()
    rows = _rows(lengths=(30, 12))
    anchors = [[2, 17], [7]]
    C = 5
    examples = anchor_examples(rows, ["x", "y"], anchors, C)
    got = anchor_gold_logits(model, build_document_layout(rows, anchors, None, C), C)
    want = continuation_logits(model, examples, TINY_PAD)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["tn", "bn", "mn", "an", "tn:1,bn:1,mn:1,an:1"])
def test_negatives_at_anchors_are_per_anchor_windows(spec):
    """Every source at anchors: TN cuts and MN replacements of the anchor's gold, BN other anchors' golds; an
    anchor's TN / MN negatives come from its own generator (the same alone as with the others)."""
    model = make_tiny_llama()
    rows = _rows(lengths=(40, 30))
    C = 6
    anchors = [[3, 12, 30], [5, 20]]
    examples = anchor_examples(rows, ["d0", "d1"], anchors, C)
    assert [e.meta["id"] for e in examples] == ["d0@3", "d0@12", "d0@30", "d1@5", "d1@20"]
    k = 4 if "," in spec else 2
    gen = build_negative_generator(spec, k, model=model, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD,
                                   options={"an_max_new_tokens": C, "an_batch_size": 2})
    lay = build_document_layout(rows, anchors, None, C)
    logits = anchor_gold_logits(model, lay, C)
    rngs = lambda exs: example_generators(0, [e.meta["id"] for e in exs], 0, "negatives")  # noqa: E731
    extra = {"gold_logits": logits} if "mn" in spec else {}
    neg = gen(examples, k, rngs(examples), **extra)
    golds = [e.continuation_ids for e in examples]
    for b, (ex, row, sources) in enumerate(zip(examples, neg.ids, neg.sources)):
        for ids, source in zip(row, sources):
            if source == "bn":
                assert ids in golds and ids != ex.continuation_ids
            elif source == "tn":
                assert ids[-1] == TINY_EOS and ids[:-1] == ex.continuation_ids[: len(ids) - 1]
            elif source == "an":
                assert 1 <= len(ids) <= C
            else:
                assert len(ids) == C
        if "bn" not in spec:
            one = {"gold_logits": logits[b:b + 1]} if "mn" in spec else {}
            assert gen([ex], k, rngs([ex]), **one).ids[0] == row


def test_checkpointing_and_flex_paths_give_the_same_numbers():
    """Under activation checkpointing (no FlexAttention) each row runs its own forward on its dense mask; without
    gradients the FlexAttention block mask runs on CPU: both equal the per-row SDPA path."""
    rows = _rows(lengths=(30, 14, 22))
    anchors, C = [[2, 20], [5], [1, 9]], 4
    negs = [[[7, 8, 9], [10]] for _ in range(5)]
    lay = build_document_layout(rows, anchors, negs, C)
    model = make_tiny_llama()
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        out = document_logps(model, lay)
        (out.row_summed.sum() + out.anchors.logps.sum()).backward()
        return out.anchors.logps.detach(), out.row_summed.detach(), _grads(model)

    plain = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = run()
    model.gradient_checkpointing_disable()
    for a, b in zip(plain, checkpointed):
        assert _relative(b, a) < REL
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for inductor's CPU FlexAttention kernel")
    torch._dynamo.reset()  # a fresh compile cache (see tests/test_packing.py)
    model.eval()
    with torch.no_grad():
        model.config._attn_implementation = "flex_attention"
        flex = document_logps(model, lay)
    torch.testing.assert_close(flex.anchors.logps, plain[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex.row_summed, plain[1], atol=1e-4, rtol=1e-4)


# ---- through the trainer


def _doc_examples():
    """Four document rows of 7 to 50 tokens as the data stage hands them over (first token, the rest)."""
    rows = _rows(seed=5, lengths=(7, 50, 12, 31))
    return [Example(prefix_ids=r[:1], continuation_ids=r[1:], meta={"id": f"doc{i}#{i % 2}"}) for i, r in enumerate(rows)]


DOC = dict(task="document", max_length=64, continuation_tokens=4, anchors_per_row=3, objective="cpo",
           num_negatives=2, negatives="tn:1,mn:1", cpo_lambda=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("docrows") / "tiny"
    make_tiny_llama().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("over", [{}, {"reference": "none", "target_margin": 0.5}, {"objective": "lipo"}],
                         ids=["cpo", "reference-free", "lipo"])
def test_a_trainer_step_on_rows_equals_the_naive_windows_and_not_its_split(model_dir, tmp_path, over):
    """One SGD step (lr 1): the update is minus the gradient of the naive loss (rows' MLE + the objective's term at
    the same anchors as full-prefix windows, with the negatives the trainer made), and 2x2 gives 4x1's step.
    Reference-free (none): the anchors' candidates scored by their mean token log-prob against zeros, the target
    margin taken off the gold, MN from the policy; a list loss (LiPO) gets its labels from the column order."""
    from split_step import one_step
    from transformers import AutoModelForCausalLM

    from seqcpo.losses import preference_loss_per_example
    from seqcpo.negatives.data import candidate_labels

    examples = _doc_examples()
    doc = {**DOC, **over}
    full = one_step(model_dir, str(tmp_path), "cpo", batch=4, accumulation=1, examples=examples, **doc)
    split = one_step(model_dir, str(tmp_path), "cpo", batch=2, accumulation=2, examples=examples, **doc)
    assert full["update"].norm() > 1e-3
    assert _relative(split["update"], full["update"]) < 1e-5
    assert split["negatives"] == full["negatives"]
    for key in ("loss", "loss/mle", "loss/cpo", "rewards/accuracies", "logps/chosen"):
        assert split["log"][key] == pytest.approx(full["log"][key], rel=1e-4, abs=1e-6), key
    made = full["negatives"]  # anchor id -> [ids, valid]
    assert len(made) == sum(anchor_count(len(e.prefix_ids) + len(e.continuation_ids), 4, 3) for e in examples) == 12
    model, ref_model = AutoModelForCausalLM.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()  # the trainer trains in train mode (no dropout in the tiny model)
    rows = [e.prefix_ids + e.continuation_ids for e in examples]
    windows, negs, valid = [], [], []
    for b, e in enumerate(examples):
        for aid in sorted((k for k in made if k.startswith(e.meta["id"] + "@")), key=lambda k: int(k.split("@")[1])):
            a = int(aid.split("@")[1])
            windows.append(Example(prefix_ids=rows[b][:a], continuation_ids=rows[b][a:a + 4]))
            negs.append(made[aid][0])
            valid.append([True] + made[aid][1])
    objective, free = doc["objective"], doc.get("reference") == "none"
    labels, _ = candidate_labels(windows, [["tn", "mn"]] * len(windows), ranked=objective == "lipo")

    def term(pol, ref, mask):
        return preference_loss_per_example(objective, pol, ref, 1.0, mask=mask, margin=doc.get("target_margin", 0.0),
                                           labels=torch.tensor(labels))

    loss, _ = _window_loss(model, None if free else ref_model, rows, windows, negs, 1.0, False, free,
                           torch.tensor(valid), lam=DOC["cpo_lambda"], term=term)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert _relative(full["update"], -_grads(model)) < 1e-5
