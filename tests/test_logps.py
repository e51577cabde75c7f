"""The prefix-shared layout gives the naive layout's log-probs and gradients (fp32, within 1e-4)."""

import pytest
import torch
from torch.testing import assert_close

from conftest import make_tiny_gpt2, make_tiny_llama
from seqcpo.logps import build_prefix_shared_batch, sequence_logps
from seqcpo.types import CandidateBatch


def _random_batch(seed=0, B=3, K=3, vocab=96):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefixes = [ids(int(torch.randint(1, 12, (1,), generator=g))) for _ in range(B)]
    cands = [[ids(int(torch.randint(1, 9, (1,), generator=g))) for _ in range(K + 1)] for _ in range(B)]
    return CandidateBatch(prefix_ids=prefixes, candidate_ids=cands, candidate_mask=[[True] * (K + 1)] * B)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_shared_equals_naive(make, attn, length_normalize):
    model = make()
    model.config._attn_implementation = attn
    model.train()  # dropout is 0 in the tiny configs; train mode must not change the numbers
    batch = _random_batch(seed=1)
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))  # a generic downstream loss

    out_s = sequence_logps(model, batch, layout="shared", length_normalize=length_normalize, chunk_size=5)
    (out_s.logps * weights).sum().backward()
    g_s = _grads(model)
    model.zero_grad()
    out_n = sequence_logps(model, batch, layout="naive", length_normalize=length_normalize)
    (out_n.logps * weights).sum().backward()
    g_n = _grads(model)

    assert_close(out_s.logps, out_n.logps, atol=1e-4, rtol=1e-4)
    assert torch.equal(out_s.token_counts, out_n.token_counts)
    assert g_s.keys() == g_n.keys() and len(g_s) > 0
    for name in g_s:
        assert_close(g_s[name], g_n[name], atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_head_in_forward_equals_naive(make):
    """The FSDP/ZeRO-3 path (LM head inside the model's forward) gives the same numbers and gradients."""
    model = make()
    batch = _random_batch(seed=4)
    a = sequence_logps(model, batch, head_in_forward=True, chunk_size=3)
    a.logps.sum().backward()
    ga = _grads(model)
    model.zero_grad()
    b = sequence_logps(model, batch, layout="naive")
    b.logps.sum().backward()
    assert_close(a.logps, b.logps, atol=1e-4, rtol=1e-4)
    for n, g in _grads(model).items():
        assert_close(ga[n], g, atol=1e-4, rtol=1e-4)


def test_values_match_a_hand_written_loop(tiny_llama):
    """Independent check: logp(y|x) from one full forward per candidate, no batching at all."""
    batch = _random_batch(seed=2, B=2, K=1)
    got = sequence_logps(tiny_llama, batch).logps
    for b in range(2):
        for i in range(2):
            x, y = batch.prefix_ids[b], batch.candidate_ids[b][i]
            logits = tiny_llama(torch.tensor([x + y])).logits[0].log_softmax(-1)
            want = sum(logits[len(x) - 1 + t, tok].item() for t, tok in enumerate(y))
            assert got[b, i].item() == pytest.approx(want, abs=1e-4)


def test_layout_tensors():
    batch = CandidateBatch(prefix_ids=[[5, 6]], candidate_ids=[[[7, 8], [9]]], candidate_mask=[[True, True]])
    sb = build_prefix_shared_batch(batch, pad_token_id=0)
    assert sb.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert sb.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert sb.segment_ids.tolist() == [[0, 0, 1, 1, 2]]
    # targets 7, 8 (candidate 0) predicted at positions 1, 2; target 9 (candidate 1) at position 1
    assert sb.targets.tolist() == [7, 8, 9]
    assert sb.src_pos.tolist() == [1, 2, 1]
    mask = sb.attention_mask()[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # candidate 1 sees the prefix and itself, not candidate 0
    ]


def test_chunked_head_saves_no_full_logits():
    """The recomputing chunked head keeps no (N, V) tensor for backward: only h, W, bias and targets."""
    from seqcpo.token_logps import ChunkedLinearLogps as _ChunkedLinearLogps

    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(1000, 8, requires_grad=True)
    t = torch.randint(0, 1000, (50,))
    out = _ChunkedLinearLogps.apply(h, w, None, t, 7)
    saved = [x.numel() for x in out.grad_fn.saved_tensors if x is not None]
    assert max(saved) <= w.numel() and 50 * 1000 not in saved
    out.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    torch.log_softmax(h2 @ w2.T, -1).gather(1, t[:, None]).sum().backward()
    assert_close(h.grad, h2.grad)
    assert_close(w.grad, w2.grad)


def test_empty_prefix_is_refused(tiny_llama):
    batch = CandidateBatch(prefix_ids=[[]], candidate_ids=[[[3], [4]]], candidate_mask=[[True, True]])
    with pytest.raises(ValueError, match="empty prefix"):
        sequence_logps(tiny_llama, batch)
