"""The packed layout (seqcpo.packing) gives the naive and prefix-shared layouts' values and gradients on batches of
mixed lengths (fp32, within 1e-4), runs no padding, and attends within each example only."""

import pytest
import torch
from torch.testing import assert_close

from conftest import make_tiny_gpt2, make_tiny_llama
from seqcpo.logps import choose_layout, sequence_logps
from seqcpo.packing import DOCUMENT_ATTENTION, build_packed_batch, packed_tokens
from seqcpo.types import CandidateBatch

ATOL = RTOL = 1e-4


def _mixed_batch(seed=0, B=4, K=3, vocab=96):
    """Lengths spread wide on purpose: one short example beside long ones, as in an instruction mix."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefix_lens = [1, 30, 7, 18][:B]
    prefixes = [ids(n) for n in prefix_lens]
    cands = [[ids(int(torch.randint(1, 20 if b % 2 else 4, (1,), generator=g))) for _ in range(K + 1)] for b in range(B)]
    return CandidateBatch(prefix_ids=prefixes, candidate_ids=cands, candidate_mask=[[True] * (K + 1)] * B)


def _run(model, batch, layout, weights, **kw):
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, layout=layout, **kw)
    (out.logps * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logps.detach(), out.token_counts, grads


def _assert_same(a, b):
    assert_close(a[0], b[0], atol=ATOL, rtol=RTOL)
    assert torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    for name in a[2]:
        assert_close(a[2][name], b[2][name], atol=ATOL, rtol=RTOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_packed_equals_naive_and_shared_on_mixed_lengths(make, attn, length_normalize):
    model = make()
    model.config._attn_implementation = attn
    model.train()
    batch = _mixed_batch(seed=1)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    packed = _run(model, batch, "packed", w, length_normalize=length_normalize, chunk_size=7)
    _assert_same(packed, _run(model, batch, "naive", w, length_normalize=length_normalize))
    _assert_same(packed, _run(model, batch, "shared", w, length_normalize=length_normalize))
    assert model.config._attn_implementation == attn  # restored after the call


def test_packed_with_one_candidate_and_an_empty_negative():
    """The MLE batch (K+1 = 1) and a zero-length negative pack too."""
    model = make_tiny_llama()
    gold_only = CandidateBatch(prefix_ids=[[5, 6], [7] * 20], candidate_ids=[[[8, 9, 10]], [[11]]],
                               candidate_mask=[[True], [True]])
    w = torch.ones(2, 1)
    _assert_same(_run(model, gold_only, "packed", w), _run(model, gold_only, "naive", w))
    empty = CandidateBatch(prefix_ids=[[5, 6], [7] * 9], candidate_ids=[[[8, 9], []], [[11, 12, 13], [14]]],
                           candidate_mask=[[True, True], [True, True]])
    w = torch.tensor([[1.0, 0.5], [-1.0, 2.0]])
    _assert_same(_run(model, empty, "packed", w, length_normalize=True),
                 _run(model, empty, "naive", w, length_normalize=True))


def test_packed_batch_layout_by_hand():
    batch = CandidateBatch(prefix_ids=[[5, 6], [7]], candidate_ids=[[[8, 9], [10]], [[11], [12, 13]]],
                           candidate_mask=[[True, True], [True, True]])
    pb = build_packed_batch(batch)
    # example 0: 5 6 | 8 9 | 10 ; example 1: 7 | 11 | 12 13 -- no padding
    assert pb.input_ids.tolist() == [[5, 6, 8, 9, 10, 7, 11, 12, 13]]
    assert pb.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert pb.doc_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert pb.segment_ids.tolist() == [0, 0, 1, 1, 2, 0, 1, 2, 2]
    assert pb.bounds == [(0, 5), (5, 9)]
    # token 8 and token 10 are predicted by the last prefix token (1), 9 by 8 (2); 11, 12 by 7 (5), 13 by 12 (7)
    assert pb.src_pos.tolist() == [1, 2, 1, 5, 5, 7]
    assert pb.targets.tolist() == [8, 9, 10, 11, 12, 13]
    mask = pb.attention_mask()[0, 0]
    assert mask[6].tolist() == [False] * 5 + [True, True, False, False]  # 11 sees 7 and itself, not example 0
    assert mask[8].tolist() == [False] * 5 + [True, False, True, True]  # 13 sees 7, 12, itself, never 11
    assert packed_tokens(batch) == (10, 9)


def test_attention_runs_once_per_example(monkeypatch):
    """The document attention computes each example's block alone: the packed sequence is never attended
    as a whole (which would cost T^2)."""
    from transformers import AttentionInterface

    import seqcpo.packing as packing

    seen = []

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append([e - s for s, e in packing._BOUNDS.get()])
        return packing.document_attention(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, DOCUMENT_ATTENTION, spy)
    model = make_tiny_llama()
    batch = _mixed_batch(seed=3)
    with torch.no_grad():
        got = sequence_logps(model, batch, layout="packed").logps
        want = sequence_logps(model, batch, layout="naive").logps
    assert_close(got, want, atol=ATOL, rtol=RTOL)
    lengths = [len(p) + sum(len(c) for c in cands) for p, cands in zip(batch.prefix_ids, batch.candidate_ids)]
    assert seen == [lengths] * model.config.num_hidden_layers


def test_auto_packs_mixed_lengths_only():
    model = make_tiny_llama()
    mixed = _mixed_batch(seed=4)
    padded, packed = packed_tokens(mixed)
    assert packed <= 0.9 * padded
    assert choose_layout(model, mixed) == "packed"
    assert choose_layout(model, mixed, head_in_forward=True) == "shared"
    uniform = CandidateBatch(prefix_ids=[[5, 6, 7]] * 3, candidate_ids=[[[8, 9], [10, 11]]] * 3,
                             candidate_mask=[[True, True]] * 3)
    assert choose_layout(model, uniform) == "shared"
    with pytest.raises(ValueError, match="packed"):
        sequence_logps(model, mixed, layout="packed", head_in_forward=True)


@pytest.mark.integration  # compiles FlexAttention's CPU kernel (about 30 s)
def test_packed_flex_forward_on_cpu_matches_naive():
    """Without gradients the document-masked BlockMask runs on CPU; its values equal the naive layout's."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for inductor's CPU kernel")
    # a fresh compile cache: after another test compiled FlexAttention at other shapes, dynamo recompiles with
    # dynamic shapes, and inductor's CPU flex kernel for those fails to build (a torch 2.13 CPU codegen bug)
    torch._dynamo.reset()
    model = make_tiny_llama()
    batch = _mixed_batch(seed=5)
    with torch.no_grad():
        want = sequence_logps(model, batch, layout="naive").logps
        model.config._attn_implementation = "flex_attention"
        got = sequence_logps(model, batch, layout="packed").logps
    assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_under_gradient_checkpointing_equals_naive_and_auto_does_not_pack(attn):
    """A layer recomputed in backward runs outside the packed layout's attention switch: under checkpointing
    the model's own attention takes the dense document mask (exact), and auto keeps the padded rows."""
    model = make_tiny_llama()
    model.config._attn_implementation = attn
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _mixed_batch(seed=6)
    assert choose_layout(model, batch) == "shared"
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))
    _assert_same(_run(model, batch, "packed", w), _run(model, batch, "naive", w))
