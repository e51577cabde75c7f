"""Every fast path of :mod:`seqcpo.logps` gives the naive layout's values and gradients (fp32, within 1e-4).

Fast paths: the 2-D causal mask for one-continuation (MLE) batches; the FlexAttention ``BlockMask`` of the
prefix-shared layout, with its CPU fallback (torch 2.13 has no FlexAttention backward on CPU, so a CPU
call that needs gradients runs SDPA with the dense mask); the SDPA fallback for flash-attention kernels,
which take no 4-D mask.
"""

import os
import shutil

import pytest
import torch
from torch.testing import assert_close

from conftest import make_tiny_gpt2, make_tiny_llama
from seqcpo.logps import build_prefix_shared_batch, sequence_logps, shared_attention_mask
from seqcpo.types import CandidateBatch

ATOL = RTOL = 1e-4


def _has_cpp_compiler() -> bool:
    """FlexAttention on CPU compiles a C++ kernel through inductor: it needs a C++ compiler on PATH."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def _batch(seed=0, B=3, K=3, vocab=96, max_prefix=12, max_cont=9):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefixes = [ids(int(torch.randint(1, max_prefix, (1,), generator=g))) for _ in range(B)]
    cands = [[ids(int(torch.randint(1, max_cont, (1,), generator=g))) for _ in range(K + 1)] for _ in range(B)]
    return CandidateBatch(prefix_ids=prefixes, candidate_ids=cands, candidate_mask=[[True] * (K + 1)] * B)


def _run(model, batch, layout, weights, **kw):
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, layout=layout, **kw)
    (out.logps * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logps.detach(), grads


def _assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    assert_close(va, vb, atol=ATOL, rtol=RTOL)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert_close(ga[n], gb[n], atol=ATOL, rtol=RTOL, msg=f"gradient of {n}")


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mle_batch_takes_the_causal_path_and_matches_naive(make, attn):
    """One continuation per row: a 2-D padding mask (the model's causal kernel), same numbers as naive."""
    model = make()
    model.config._attn_implementation = attn
    batch = _batch(seed=3, K=0)
    sb = build_prefix_shared_batch(batch)
    mask, impl = shared_attention_mask(model, sb)
    assert mask.dim() == 2 and impl is None
    w = torch.randn(3, 1, generator=torch.Generator().manual_seed(1))
    _assert_same(_run(model, batch, "shared", w, chunk_size=4), _run(model, batch, "naive", w))


def test_block_mask_equals_the_dense_mask():
    """The BlockMask's mask_mod, evaluated at every (q, kv), is the dense (B, 1, L, L) mask."""
    batch = _batch(seed=5, B=2, K=4)
    sb = build_prefix_shared_batch(batch)
    bm = sb.block_mask(block_size=8)
    B, L = sb.segment_ids.shape
    b = torch.arange(B)[:, None, None]
    q = torch.arange(L)[None, :, None]
    kv = torch.arange(L)[None, None, :]
    got = bm.mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(got, sb.attention_mask()[:, 0])
    # blocks that hold no allowed pair are skipped by the kernel
    assert bm.shape == (B, 1, L, L)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_flex_on_cpu_with_gradients_falls_back_to_sdpa(make):
    model = make()
    batch = _batch(seed=7)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    model.config._attn_implementation = "sdpa"
    want = _run(model, batch, "naive", w)
    model.config._attn_implementation = "flex_attention"
    with pytest.warns(UserWarning, match="FlexAttention has no backward on CPU"):
        import seqcpo.logps as L

        L._warned.discard("FlexAttention has no backward on CPU in this torch: running SDPA with a dense mask instead")
        got = _run(model, batch, "shared", w, chunk_size=5)
    assert model.config._attn_implementation == "flex_attention"  # restored after the call
    _assert_same(got, want)


def test_mask_kind_per_attention_implementation():
    """SDPA: boolean 4-D; eager: additive 4-D; flash kernels (no 4-D mask): boolean 4-D under SDPA."""
    model = make_tiny_llama()
    sb = build_prefix_shared_batch(_batch(seed=8))
    model.config._attn_implementation = "sdpa"
    mask, impl = shared_attention_mask(model, sb)
    assert mask.dtype == torch.bool and mask.dim() == 4 and impl is None
    model.config._attn_implementation = "eager"
    mask, impl = shared_attention_mask(model, sb)
    assert mask.dtype == torch.float32 and impl is None
    model.config._attn_implementation = "flash_attention_2"
    with pytest.warns(UserWarning, match="takes no prefix-shared 4-D mask"):
        mask, impl = shared_attention_mask(model, sb)
    assert mask.dtype == torch.bool and impl == "sdpa"


@pytest.mark.integration  # slow, not for the real model: compiles FlexAttention's CPU kernel (about 30 s)
@pytest.mark.skipif(not _has_cpp_compiler(), reason="FlexAttention on CPU needs a C++ compiler (g++/clang++)")
def test_flex_forward_on_cpu_matches_naive():
    """Without gradients (a reference pass) the BlockMask path runs on CPU; values equal the naive layout's."""
    model = make_tiny_llama()
    batch = _batch(seed=9)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        want = sequence_logps(model, batch, layout="naive").logps
        model.config._attn_implementation = "flex_attention"
        sb = build_prefix_shared_batch(batch)
        mask, impl = shared_attention_mask(model, sb)
        assert impl is None and type(mask).__name__ == "BlockMask"
        got = sequence_logps(model, batch, layout="shared").logps  # a crash here fails the test
    assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention training path needs CUDA")
@pytest.mark.parametrize("K", [1, 4])
def test_flex_on_cuda_matches_naive_values_and_gradients(K):
    model = make_tiny_llama().cuda()
    batch = _batch(seed=11, K=K, max_prefix=40, max_cont=30)
    w = torch.randn(3, K + 1, generator=torch.Generator().manual_seed(3)).cuda()
    model.config._attn_implementation = "sdpa"
    want = _run(model, batch, "naive", w)
    model.config._attn_implementation = "flex_attention"
    sb = build_prefix_shared_batch(batch, device="cuda")
    assert type(shared_attention_mask(model, sb)[0]).__name__ == "BlockMask"
    _assert_same(_run(model, batch, "shared", w, chunk_size=7), want)
