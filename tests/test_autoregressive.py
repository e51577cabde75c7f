"""AN, autoregressive negatives (docs/method.md, "Negatives", row AN): decoding backends against
``model.generate``, seeding, EOS and length handling, ranking, and the dropped rule. Tiny models, offline."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_EOS, TINY_PAD, TINY_VOCAB, make_tiny_gpt2, make_tiny_llama
from seqcpo.negatives import AutoregressiveNegatives, DecodingConfig, rouge_l_f
from seqcpo.sampling import filter_logits
from seqcpo.types import Example

EOS = TINY_EOS
PREFIXES = [[5, 6, 7, 8, 9, 10, 11], [8], [9, 9, 3], [40, 41, 42, 43]]  # different lengths: left padding


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def examples(golds=None) -> list[Example]:
    golds = golds or [[10, 11, EOS], [20, 21, 22], [30, EOS], [50, 51, 52, 53]]
    return [Example(p, g) for p, g in zip(PREFIXES, golds)]


def an(model, decoding=None, **kw) -> AutoregressiveNegatives:
    kw.setdefault("max_new_tokens", 10)
    return AutoregressiveNegatives(model, decoding or DecodingConfig(), eos_token_id=EOS, pad_token_id=TINY_PAD, **kw)


def bias_eos(model, bias: float) -> None:
    """Add ``bias`` to the EOS logit at every position (a forward hook on the LM head)."""
    def hook(module, inputs, output):
        output = output.clone()
        output[..., EOS] += bias
        return output

    model.get_output_embeddings().register_forward_hook(hook)


def make_position_sensitive(model):
    """Random tiny models barely look at positions, so a wrong position id under left padding would not
    change their argmax; sharper attention (Llama) or larger position embeddings (GPT-2) make it show."""
    with torch.no_grad():
        if hasattr(model, "transformer"):
            model.transformer.wpe.weight.mul_(30.0)
        else:
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(3.0)
                layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def hf_greedy(model, prefix, max_new_tokens):
    """Reference: ``model.generate`` on one unpadded prefix, cut after the first EOS."""
    ids = torch.tensor([prefix])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=EOS, pad_token_id=TINY_PAD,
    )[0, len(prefix) :].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_greedy_matches_generate_token_for_token(make, backend):
    model = make_position_sensitive(make())
    neg = an(model, DecodingConfig("greedy"), backend=backend, max_new_tokens=12)(examples(), 1, gen(0))
    lengths = []
    for prefix, row in zip(PREFIXES, neg.ids):
        expected = hf_greedy(model, prefix, 12)
        lengths.append(len(expected))
        assert row == [expected]
    assert max(lengths) == 12  # at least one row decodes all 12 steps next to the others


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_top_k_one_and_tiny_top_p_sampling_are_greedy(make):
    model = make()
    greedy = an(model, DecodingConfig("greedy"))(examples(), 1, gen(0)).ids
    for cfg in (DecodingConfig("sample", top_k=1), DecodingConfig("sample", top_p=1e-6)):
        neg = an(model, cfg)(examples(), 3, gen(0))
        assert neg.ids == [[row[0]] * 3 for row in greedy]


def test_batch_size_does_not_change_greedy_output():
    model = make_tiny_llama()
    a = an(model, DecodingConfig("greedy"), batch_size=1)(examples(), 1, gen(0))
    b = an(model, DecodingConfig("greedy"), batch_size=16)(examples(), 1, gen(0))
    assert a == b


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_sampling_same_seed_same_negatives_other_seed_differs(backend):
    model = make_tiny_llama()
    g = an(model, DecodingConfig("sample", temperature=1.5), backend=backend)
    a, b, c = g(examples(), 3, gen(0)), g(examples(), 3, gen(0)), g(examples(), 3, gen(1))
    assert a == b
    assert a.ids != c.ids
    for row in a.ids:
        assert len({tuple(x) for x in row}) > 1  # K samples of one prefix differ from each other


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_rows_stop_at_eos_and_keep_it(backend):
    model = make_tiny_llama()
    bias_eos(model, 3.0)  # EOS is likely but not certain: rows end at different lengths
    neg = an(model, DecodingConfig("sample"), backend=backend, max_new_tokens=10)(examples(), 4, gen(0))
    rows = [x for row in neg.ids for x in row]
    ended = [x for x in rows if EOS in x]
    assert 4 <= len(ended) < len(rows) and len({len(x) for x in ended}) >= 3
    for x in rows:
        if EOS in x:
            assert x.index(EOS) == len(x) - 1  # nothing after EOS (no pad, no tokens)
        else:
            assert len(x) == 10


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_forced_eos_and_max_new_tokens(backend):
    model = make_tiny_llama()
    bias_eos(model, 100.0)
    neg = an(model, DecodingConfig("sample"), backend=backend)(examples(), 2, gen(0))
    assert neg.ids == [[[EOS], [EOS]]] * 4
    model = make_tiny_llama()
    bias_eos(model, -100.0)
    neg = an(model, DecodingConfig("sample"), backend=backend, max_new_tokens=6)(examples(), 2, gen(0))
    assert all(len(x) == 6 and EOS not in x for row in neg.ids for x in row)


def test_copies_of_the_gold_are_resampled_or_dropped():
    model = make_tiny_llama()
    bias_eos(model, 100.0)  # every sample is [EOS]
    neg = an(model, DecodingConfig("sample"), max_new_tokens=3)(examples([[EOS], [EOS], [7, EOS], [EOS]]), 2, gen(0))
    assert neg.valid == [[False, False], [False, False], [True, True], [False, False]]
    model = make_tiny_llama()
    bias_eos(model, 3.5)  # first token is EOS about 30% of the time
    golds = [[EOS]] * 4
    neg = an(model, DecodingConfig("sample"), max_tries=8, max_new_tokens=3)(examples(golds), 4, gen(0))
    assert all(all(row) for row in neg.valid)  # a copy survives eight tries with p = 0.3^8
    assert all(x != [EOS] for row in neg.ids for x in row)
    neg1 = an(model, DecodingConfig("sample"), max_tries=1, max_new_tokens=3)(examples(golds), 4, gen(0))
    assert not all(all(row) for row in neg1.valid)  # without retries some copies are kept, dropped


def test_greedy_copy_is_dropped():
    model = make_tiny_llama()
    golds = [hf_greedy(model, p, 10) for p in PREFIXES]
    neg = an(model, DecodingConfig("greedy"))(examples(golds), 1, gen(0))
    assert neg.valid == [[False]] * 4 and neg.ids == [[g] for g in golds]


def test_ranked_by_rouge():
    model = make_tiny_llama()
    g = an(model, DecodingConfig("sample", temperature=1.0, top_k=4))
    ex = examples()
    plain = g(ex, 4, gen(0))
    neg = g(ex, 4, gen(0), ranked=True)
    for e, row, scores, plain_row in zip(ex, neg.ids, neg.scores, plain.ids):
        assert sorted(row) == sorted(plain_row)  # same samples, reordered
        assert scores == pytest.approx([rouge_l_f(x, e.continuation_ids) for x in row])
        assert all(a >= b for a, b in zip(scores, scores[1:]))


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_ranked_by_temperature(backend):
    model = make_tiny_llama()
    greedy = an(model, DecodingConfig("greedy"))(examples(), 1, gen(0)).ids
    cfg = DecodingConfig("sample", temperatures=[3.0, 1e-4, 1.0])
    neg = an(model, cfg, backend=backend, rank_by="temperature")(examples(), 3, gen(0), ranked=True)
    assert neg.scores == [[-1e-4, -1.0, -3.0]] * 4
    assert [row[0] for row in neg.ids] == [row[0] for row in greedy]  # T -> 0 is greedy, ranked first


def test_beam_search_returns_the_best_beams_and_skips_a_copy_of_the_gold():
    model = make_tiny_llama()
    prefix = PREFIXES[0]
    ids = torch.tensor([prefix])
    beams = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3, num_return_sequences=3,
        max_new_tokens=6, eos_token_id=EOS, pad_token_id=TINY_PAD,
    )[:, len(prefix) :].tolist()
    beams = [b[: b.index(EOS) + 1] if EOS in b else b for b in beams]
    g = an(model, DecodingConfig("beam", num_beams=3), max_new_tokens=6)
    assert g.backend == "hf"
    neg = g([Example(prefix, [77, 78])], 2, gen(0))
    assert neg.ids == [beams[:2]] and neg.valid == [[True, True]]
    neg = g([Example(prefix, beams[0])], 2, gen(0))
    assert neg.ids == [beams[1:3]] and neg.valid == [[True, True]]


def test_decoding_config_validation():
    with pytest.raises(ValueError, match="greedy decoding .* k=3 .*strategy='beam'.*strategy='sample'"):
        DecodingConfig("greedy").check_k(3)
    DecodingConfig("greedy").check_k(1)
    with pytest.raises(ValueError, match="num_beams >= k"):
        DecodingConfig("beam", num_beams=2).check_k(3)
    with pytest.raises(ValueError, match="strategy must be one of"):
        DecodingConfig("nucleus")
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperatures needs strategy='sample'"):
        DecodingConfig("greedy", temperatures=[1.0])
    with pytest.raises(ValueError, match="rank_by='temperature' needs decoding.temperatures"):
        an(make_tiny_llama(), DecodingConfig(), rank_by="temperature")
    with pytest.raises(ValueError, match="greedy decoding"):
        an(make_tiny_llama(), DecodingConfig("greedy"))(examples(), 2, gen(0))
    with pytest.raises(ValueError, match="non-empty prefix"):
        an(make_tiny_llama())([Example([], [1, 2])], 1, gen(0))


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top-p 0.8: 0.5 + 0.3 reaches 0.8, so the two smallest go
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


class _Wrapped(torch.nn.Module):
    """A model seen through ``forward(*args, **kwargs)``, like the trainer's lazy / adapter-disabled views."""

    def __init__(self, model):
        super().__init__()
        self._inner = [model]  # not registered as a submodule

    def parameters(self, recurse: bool = True):
        return self._inner[0].parameters(recurse)

    def forward(self, *args, **kwargs):
        return self._inner[0](*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._inner[0].generate(*args, **kwargs)


def test_wrapped_model_gives_the_same_negatives_without_deprecated_kwargs():
    import warnings

    model = make_tiny_gpt2()
    cfg = DecodingConfig("sample", top_k=8)
    plain = an(model, cfg)(examples(), 2, gen(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = an(_Wrapped(model), cfg)(examples(), 2, gen(0))
    assert wrapped == plain
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
def test_model_in_train_mode_with_dropout_is_seeded_and_left_in_train_mode(backend):
    model = make_tiny_gpt2().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    g = an(model, DecodingConfig("sample"), backend=backend)
    state = torch.get_rng_state()
    a, b = g(examples(), 2, gen(0)), g(examples(), 2, gen(0))
    assert a == b and model.training
    assert torch.equal(torch.get_rng_state(), state)


# ---- one prefill for prefixes of one another (document anchors) ----------------------------------------------------

ROW = torch.randint(3, TINY_VOCAB, (36,), generator=torch.Generator().manual_seed(7)).tolist()
# anchors of one row, an unrelated prefix, a duplicate anchor: roots are ROW[:33] and UNRELATED
UNRELATED = [40, 41, 42, 43, 44, 45, 46]
ROW_PREFIXES = [ROW[:5], ROW[:12], UNRELATED, ROW[:33], ROW[:12], ROW[:20]]


def prefill_calls(model) -> list[tuple[int, int, int]]:
    """(rows, width, real tokens) of every forward with more than one input position (the prefills)."""
    calls = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] > 1:
            calls.append((ids.shape[0], ids.shape[1], int(mask[:, -ids.shape[1] :].sum())))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("cfg,k", [(DecodingConfig("greedy"), 1), (DecodingConfig("sample", temperature=1.5), 3)],
                         ids=["greedy", "sample"])
def test_prefixes_of_one_row_share_one_prefill_and_give_the_same_negatives(make, cfg, k):
    model = make_position_sensitive(make())
    expected = [hf_greedy(model, p, 8) for p in ROW_PREFIXES]  # the model's own greedy continuations
    calls = prefill_calls(model)
    exs = [Example(p, [77, 78, 79]) for p in ROW_PREFIXES]
    shared_gen = an(model, cfg, max_new_tokens=8)
    shared = shared_gen(exs, k, gen(3))
    assert calls == [(2, 33, 33 + len(UNRELATED))]  # the two roots only, each once
    assert shared_gen._kv_sliceable is True
    calls.clear()
    plain = an(model, cfg, max_new_tokens=8, share_prefix_kv=False)(exs, k, gen(3))
    assert calls == [(6, 33, sum(len(p) for p in ROW_PREFIXES))]
    assert shared == plain
    assert len({tuple(r[0]) for r in shared.ids}) >= 4  # the anchors' negatives are not all alike
    if cfg.strategy == "greedy":
        assert [r[0] for r in shared.ids] == expected  # the duplicate anchor included
    else:
        assert shared.ids[1] != shared.ids[4]  # a duplicate prefix still samples from its own generator


def test_prefix_roots():
    from seqcpo.negatives.prefix_kv import prefix_roots

    assert prefix_roots([[1, 2], [1, 2, 3], [4], [1, 2, 3], [1], [2, 1]]) == [1, 1, 2, 1, 1, 5]
    assert prefix_roots([[1], [2], [1, 3]]) == [2, 1, 2]
    assert prefix_roots([[1, 2], [1, 2]]) == [0, 0]  # identical prefixes: the first is the root


def test_sliding_window_cache_is_not_sliced_and_gives_the_same_negatives():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, max_position_embeddings=256, pad_token_id=TINY_PAD)).eval()
    calls = prefill_calls(model)
    exs = [Example(p, [77, 78, 79]) for p in ROW_PREFIXES]
    cfg = DecodingConfig("sample", temperature=1.5)
    g = an(model, cfg, max_new_tokens=8)
    with pytest.warns(UserWarning, match="cannot be sliced per prefix"):
        first = g(exs, 2, gen(3))
    assert g._kv_sliceable is False and calls[-1][0] == 6  # the roots' try, then every prefix
    calls.clear()
    assert g(exs, 2, gen(3)) == first and [c[0] for c in calls] == [6]  # later chunks do not try again
    assert first == an(model, cfg, max_new_tokens=8, share_prefix_kv=False)(exs, 2, gen(3))


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_sliced_cache_and_first_logits_equal_each_prefix_prefilled(make):
    model = make_position_sensitive(make())
    _, shared, logits, mask = an(model)._prefill(ROW_PREFIXES)
    _, plain, plain_logits, plain_mask = an(model, share_prefix_kv=False)._prefill(ROW_PREFIXES)
    assert torch.equal(mask, plain_mask)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    real = plain_mask.bool()  # (B, L): pad slots hold anything finite, masked out
    for a, b in zip(shared.layers, plain.layers):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)  # (B, H, L, D)
            assert x.shape == y.shape and torch.isfinite(x).all()
            torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
