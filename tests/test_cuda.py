"""The CUDA paths: FlexAttention layouts, the two-pass layout, the adapter-off LoRA reference, bf16 training
at OpenLLaMA-3B's shape. Marked ``cuda`` (``pytest -m cuda``; ``make gpu-check`` runs them first).

They skip without a GPU. ``SEQCPO_CUDA_TESTS_ON_CPU=1`` (set by ``make gpu-check-dry``) runs them on the CPU at
tiny shapes instead, where the code path allows (FlexAttention needs CUDA for gradients: on the CPU the same
calls take their SDPA fallback), so the first GPU run cannot die on a mistake a CPU could have caught.

Tolerances (log-probs are summed over 2-40 tokens; gradients of every parameter):
- fp32 (TF32 off): ``atol = rtol = 1e-4`` on values and on every gradient tensor, as on the CPU.
- bf16: values within ``0.1 + 0.01 |naive|`` nats; gradients as one flattened vector, relative L2 error
  <= 5e-2 and cosine >= 0.995. Two bf16 runs differ only by rounding in another order; a wrong mask moves
  values by whole nats and gradients by O(1).
"""

import os

import pytest
import torch
from torch.testing import assert_close

from conftest import make_tiny_llama
from seqcpo.logps import sequence_logps
from seqcpo.types import CandidateBatch

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("SEQCPO_CUDA_TESTS_ON_CPU") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
ON_GPU = DEVICE == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (SEQCPO_CUDA_TESTS_ON_CPU=1 runs these on the CPU)"),
]

OPENLLAMA_3B = dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)
TINY_3B_LIKE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def _no_tf32():
    if ON_GPU:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def _model(dtype=torch.float32, seed=0):
    """A small Llama on the device: on the GPU large enough for several FlexAttention blocks (L > 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not ON_GPU:
        return make_tiny_llama(seed).to(dtype)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device=DEVICE, dtype=dtype)


def _mixed_batch(seed, B=3, K=3, vocab=96):
    """Mixed lengths; on the GPU long enough (up to ~200 tokens a row) to span FlexAttention blocks."""
    g = torch.Generator().manual_seed(seed)
    hi_p, hi_c = (120, 30) if ON_GPU else (12, 9)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefixes = [ids(int(torch.randint(1, hi_p, (1,), generator=g))) for _ in range(B)]
    cands = [[ids(int(torch.randint(1, hi_c, (1,), generator=g))) for _ in range(K + 1)] for _ in range(B)]
    return CandidateBatch(prefix_ids=prefixes, candidate_ids=cands, candidate_mask=[[True] * (K + 1)] * B)


def _run(model, batch, layout, weights, attn):
    model.config._attn_implementation = attn
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, layout=layout, chunk_size=64)
    (out.logps * weights).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logps.detach().float(), grads


def _assert_same(got, want, dtype):
    (v1, g1), (v2, g2) = got, want
    assert g1.keys() == g2.keys() and len(g1) > 0
    if dtype == torch.float32:
        assert_close(v1, v2, atol=1e-4, rtol=1e-4)
        for name in g1:
            assert_close(g1[name], g2[name], atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")
        return
    assert torch.all((v1 - v2).abs() <= 0.1 + 0.01 * v2.abs()), f"bf16 values differ: {v1} vs {v2}"
    a = torch.cat([g1[n].flatten() for n in sorted(g1)])
    b = torch.cat([g2[n].flatten() for n in sorted(g2)])
    rel = ((a - b).norm() / b.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert rel <= 5e-2 and cos >= 0.995, f"bf16 gradients differ: relative L2 {rel:.3g}, cosine {cos:.5f}"


@pytest.mark.parametrize("layout", ["shared", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_layouts_equal_naive_values_and_gradients(layout, dtype):
    """FlexAttention BlockMask (prefix-shared, and packed with document masking) against the naive layout
    under SDPA, values and gradients (tolerances in the module docstring)."""
    model = _model(dtype)
    model.train()
    batch = _mixed_batch(seed=1)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want = _run(model, batch, "naive", w, "sdpa")
    got = _run(model, batch, layout, w, "flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    _assert_same(got, want, dtype)


def test_two_pass_on_the_device_equals_naive():
    """The two-pass layout (KV cache of the gold pass, 4-D mask over cache + negatives) on the device."""
    model = _model(torch.float32, seed=3)
    model.train()
    base = _mixed_batch(seed=4, K=1)
    # negatives sharing the gold's beginning (a truncation, a changed token), as TN and MN make them
    cands = [[c[0], c[0][: max(1, len(c[0]) // 2)] + [2], c[0][:1] + [7] + c[0][2:]] for c in base.candidate_ids]
    batch = CandidateBatch(base.prefix_ids, cands, [[True] * 3] * len(cands))
    w = torch.randn(len(cands), 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _assert_same(_run(model, batch, "two_pass", w, "sdpa"), _run(model, batch, "naive", w, "sdpa"), torch.float32)


def test_adapter_off_lora_reference_is_the_base_model():
    peft = pytest.importorskip("peft")
    from seqcpo.reference import AdapterDisabledReference

    base = _model(torch.float32, seed=6)
    batch = _mixed_batch(seed=7)
    with torch.no_grad():
        start = sequence_logps(base, batch).logps.float()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # the adapter does something, as after training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    ref = AdapterDisabledReference(model)
    assert_close(ref.logps(batch), start, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, batch).logps.float(), start, atol=1e-2)
    assert model.training


def test_bf16_training_steps_at_openllama_3b_shape_lower_the_loss():
    """A random-init Llama of OpenLLaMA-3B's shape (tiny on the CPU), bf16 weights and AdamW, CPO (K = 4) with
    a cached reference: four optimizer steps on one batch lower the loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqcpo.losses import cpo_loss, mle_loss

    kw = OPENLLAMA_3B if ON_GPU else TINY_3B_LIKE
    cfg = LlamaConfig(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.train()
    g = torch.Generator().manual_seed(8)
    ids = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    P, C, B, K = (128, 64, 2, 4) if ON_GPU else (12, 8, 2, 4)
    golds = [ids(C) for _ in range(B)]
    batch = CandidateBatch([ids(P) for _ in range(B)], [[gd] + [ids(C) for _ in range(K)] for gd in golds],
                           [[True] * (K + 1)] * B)
    with torch.no_grad():
        ref = sequence_logps(model, batch, layout="auto").logps.float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4 if ON_GPU else 1e-2, weight_decay=0.0)
    losses = []
    for _ in range(4):
        out = sequence_logps(model, batch, layout="auto")
        loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + cpo_loss(out.logps, ref, 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    del model, opt
    if ON_GPU:
        torch.cuda.empty_cache()
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall: {losses}"
