"""Negative generators (docs/method.md, "Negatives"): TN, BN, MN, mixtures, the registry and ROUGE-L.

AN's decoding is tested in test_autoregressive.py; here AN only joins the contract checks shared by all
generators. Everything runs offline on tiny random-init models in seconds.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_EOS, TINY_PAD, make_tiny_llama
from seqcpo.negatives import (
    AutoregressiveNegatives,
    BatchNegatives,
    DecodingConfig,
    MeanFieldNegatives,
    MixtureNegatives,
    NegativeGenerator,
    TruncationNegatives,
    build_negative_generator,
    lcs_length,
    mean_field_negatives_from_logits,
    parse_spec,
    rouge_l_f,
)
from seqcpo.sampling import inverse_cdf_sample
from seqcpo.types import Example

EOS = TINY_EOS


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch() -> list[Example]:
    """Five examples: golds with and without a final EOS, one a one-token gold."""
    return [
        Example([5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, EOS]),
        Example([8], [20, 21, 22, 23, 24, 25]),  # no EOS: a window of running text
        Example([9, 9, 4], [30, 31, 32, 33, 34, 35, EOS]),
        Example([3, 4], [40, 41, 42, 43, 44, 45, 46, EOS]),
        Example([6], [50, 51, 52, 53, 54]),
    ]


# ---------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------


def _lcs_naive(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


@pytest.mark.parametrize(
    "a, b, lcs, f",
    [
        ([1, 2, 3, 4], [1, 3, 4, 5, 6], 3, 6 / 9),  # LCS 1 3 4: P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
        ([1, 2, 3], [1, 2, 3], 3, 1.0),
        ([1, 2, 3], [4, 5, 6], 0, 0.0),
        ([1, 1, 2], [1, 2, 1], 2, 4 / 6),
        ([7], [1, 7, 1, 1], 1, 2 / 5),  # P = 1, R = 1/4, F = 0.4
        ([3, 2, 1], [1, 2, 3], 1, 2 / 6),  # reversed: only one token can match in order
        ([], [1, 2], 0, 0.0),
        ([], [], 0, 0.0),
    ],
)
def test_rouge_l_f_hand_computed(a, b, lcs, f):
    assert lcs_length(a, b) == lcs
    assert rouge_l_f(a, b) == pytest.approx(f)
    assert rouge_l_f(b, a) == pytest.approx(f)  # F1 is symmetric


def test_lcs_matches_the_textbook_dp_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 15))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 15))]
        assert lcs_length(a, b) == _lcs_naive(a, b), (a, b)
    a = [rng.randrange(50) for _ in range(256)]
    b = [rng.randrange(50) for _ in range(256)]
    assert lcs_length(a, b) == _lcs_naive(a, b)


# ---------------------------------------------------------------------------------------------------
# Contract shared by all generators
# ---------------------------------------------------------------------------------------------------


def _factories():
    model = make_tiny_llama()
    return {
        "tn": lambda: TruncationNegatives(EOS),
        "bn": lambda: BatchNegatives(),
        "mn": lambda: MeanFieldNegatives(model, pad_token_id=TINY_PAD),
        "an": lambda: AutoregressiveNegatives(
            model, DecodingConfig("sample"), eos_token_id=EOS, pad_token_id=TINY_PAD, max_new_tokens=8
        ),
        "mix": lambda: MixtureNegatives([(TruncationNegatives(EOS), 2), (BatchNegatives(), 1)]),
    }


FACTORIES = _factories()


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("ranked", [False, True])
def test_contract_shapes_sources_validity_and_ranking(name, ranked):
    g = FACTORIES[name]()
    assert isinstance(g, NegativeGenerator)
    ex = batch()
    k = 3
    neg = g(ex, k, gen(0), ranked=ranked)
    assert len(neg) == len(ex) and neg.k == k
    for b, e in enumerate(ex):
        assert len(neg.ids[b]) == k and len(neg.valid[b]) == k and len(neg.sources[b]) == k
        for ids, ok in zip(neg.ids[b], neg.valid[b]):
            assert all(isinstance(t, int) for t in ids)
            if ok:
                assert ids != e.continuation_ids  # a valid negative is never the gold
    expected_sources = ["tn", "tn", "bn"] if name == "mix" else [name] * k
    assert all(row == expected_sources for row in neg.sources)
    if ranked:
        assert neg.scores is not None and all(len(row) == k for row in neg.scores)
        for row in neg.scores:
            assert all(x >= y for x, y in zip(row, row[1:])), row
    else:
        assert neg.scores is None


@pytest.mark.parametrize("name", list(FACTORIES))
def test_contract_same_seed_same_negatives_other_seed_differs(name):
    g = FACTORIES[name]()
    ex = batch()
    a = g(ex, 3, gen(0), ranked=True)
    b = g(ex, 3, gen(0), ranked=True)
    c = g(ex, 3, gen(1), ranked=True)
    assert a == b
    assert a.ids != c.ids


@pytest.mark.parametrize("name", list(FACTORIES))
def test_contract_leaves_the_global_rng_alone(name):
    g = FACTORIES[name]()
    state = torch.get_rng_state()
    g(batch(), 3, gen(0))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------
# TN
# ---------------------------------------------------------------------------------------------------


def test_tn_cuts_are_distinct_strict_prefixes_ending_in_eos():
    for gold in ([10, 11, 12, 13, EOS], [10, 11, 12, 13]):
        neg = TruncationNegatives(EOS)([Example([1], gold)], 3, gen(0))
        # body [10, 11, 12, 13] has cuts j = 1, 2, 3: with k = 3 each appears once.
        assert sorted(neg.ids[0], key=len) == [[10, EOS], [10, 11, EOS], [10, 11, 12, EOS]]
        assert neg.valid == [[True, True, True]]


def test_tn_more_negatives_than_cuts_uses_every_cut_then_repeats():
    neg = TruncationNegatives(EOS)([Example([1], [10, 11, 12, EOS])], 5, gen(0))
    lengths = [len(x) for x in neg.ids[0]]
    assert set(lengths) == {2, 3}  # cuts 1 and 2 only
    assert lengths.count(2) >= 1 and lengths.count(3) >= 1 and len(lengths) == 5


def test_tn_ranked_longer_kept_part_first_with_score_j():
    neg = TruncationNegatives(EOS)([Example([1], [10, 11, 12, 13, 14, EOS])], 4, gen(3), ranked=True)
    assert neg.ids[0] == [[10, 11, 12, 13, EOS], [10, 11, 12, EOS], [10, 11, EOS], [10, EOS]]
    assert neg.scores == [[4.0, 3.0, 2.0, 1.0]]


def test_tn_min_keep():
    neg = TruncationNegatives(EOS, min_keep=3)([Example([1], list(range(10, 20)))], 6, gen(0))
    assert all(len(x) >= 4 and x[-1] == EOS for x in neg.ids[0])


@pytest.mark.parametrize("gold", [[7, EOS], [7], [EOS], []])
def test_tn_one_token_gold_is_dropped_not_copied(gold):
    neg = TruncationNegatives(EOS)([Example([1], gold)], 2, gen(0), ranked=True)
    assert neg.valid == [[False, False]]
    assert len(neg.ids[0]) == 2 and len(neg.scores[0]) == 2


def test_tn_uniform_cut_distribution():
    neg = TruncationNegatives(EOS)([Example([1], list(range(10, 15)))] * 400, 1, gen(0))
    counts = [sum(len(row[0]) - 1 == j for row in neg.ids) for j in (1, 2, 3, 4)]
    assert all(70 <= c <= 130 for c in counts), counts  # 100 expected each


# ---------------------------------------------------------------------------------------------------
# BN
# ---------------------------------------------------------------------------------------------------


def test_bn_negatives_are_other_golds_without_repeats():
    ex = batch()
    golds = [e.continuation_ids for e in ex]
    neg = BatchNegatives()(ex, 4, gen(0))
    for b, row in enumerate(neg.ids):
        # k = B - 1: every other gold appears exactly once
        assert sorted(row) == sorted(g for i, g in enumerate(golds) if i != b)
    assert all(all(v) for v in neg.valid)


def test_bn_skips_examples_that_share_the_gold():
    same = [1, 2, 3, EOS]
    ex = [Example([1], same), Example([2], same), Example([3], [4, 5]), Example([4], [6, 7])]
    neg = BatchNegatives()(ex, 2, gen(0))
    assert sorted(neg.ids[0]) == [[4, 5], [6, 7]]  # example 1's gold is the same, so never used
    assert sorted(neg.ids[1]) == [[4, 5], [6, 7]]
    assert same in neg.ids[2] and same in neg.ids[3]  # others may use it, once (no duplicate negatives)


def test_bn_short_batch_drops_the_missing_negatives():
    """A short last batch (or repeated golds) gives fewer than k other golds: the rest are dropped columns."""
    ex = batch()[:3]
    neg = BatchNegatives()(ex, 3, gen(0))
    for b, row in enumerate(neg.ids):
        assert len(row) == 3 and neg.valid[b] == [True, True, False]
        assert row[2] == ex[b].continuation_ids  # the placeholder is the gold itself, never valid
    ranked = BatchNegatives()(ex, 3, gen(0), ranked=True)
    assert all(v == [True, True, False] for v in ranked.valid)
    assert all(s[2] < s[1] for s in ranked.scores)
    dup = [Example([1], [5, 6]), Example([2], [5, 6]), Example([3], [7, 8])]
    neg = BatchNegatives()(dup, 2, gen(0))
    assert [sum(v) for v in neg.valid] == [1, 1, 1]
    with pytest.raises(ValueError, match="raise the batch size"):
        BatchNegatives()([Example([1], [5, 6]), Example([2], [5, 6])], 1, gen(0))  # no other gold at all


def test_bn_ranked_by_rouge_to_the_gold():
    gold = [1, 2, 3, 4]
    ex = [
        Example([9], gold),
        Example([9], [1, 2, 3, 5]),  # LCS 3: F = 6/8
        Example([9], [7, 7, 7, 7]),  # F = 0
        Example([9], [1, 9, 9, 4]),  # LCS 2: F = 4/8
    ]
    neg = BatchNegatives()(ex, 3, gen(0), ranked=True)
    assert neg.ids[0] == [[1, 2, 3, 5], [1, 9, 9, 4], [7, 7, 7, 7]]
    assert neg.scores[0] == pytest.approx([0.75, 0.5, 0.0])


# ---------------------------------------------------------------------------------------------------
# MN
# ---------------------------------------------------------------------------------------------------


def _peaked_logits(targets: list[int], vocab: int = 96) -> torch.Tensor:
    """(T, V) logits whose argmax (and, practically, every sample) at row t is targets[t]."""
    lg = torch.full((len(targets), vocab), -50.0)
    lg[torch.arange(len(targets)), torch.tensor(targets)] = 50.0
    return lg


@pytest.mark.parametrize("sample", [False, True])
def test_mn_c_one_takes_the_prediction_everywhere(sample):
    gold = [10, 11, 12, 13]
    pred = [60, 61, 62, 63]
    neg = mean_field_negatives_from_logits(
        [gold], [_peaked_logits(pred)], 2, c=1.0, sample=sample, generator=gen(0)
    )
    assert neg.ids == [[pred, pred]] and neg.valid == [[True, True]]
    assert neg.sources == [["mn", "mn"]] and neg.scores is None


def test_mn_c_zero_is_always_a_copy_and_dropped():
    gold = [10, 11, 12]
    neg = mean_field_negatives_from_logits([gold], [_peaked_logits([60, 61, 62])], 3, c=0.0, generator=gen(0))
    assert neg.ids == [[gold] * 3] and neg.valid == [[False] * 3]


def test_mn_replaced_fraction_matches_c():
    T, k = 200, 8
    gold = [10] * T
    neg = mean_field_negatives_from_logits([gold], [_peaked_logits([70] * T)], k, c=0.3, sample=False, generator=gen(0))
    replaced = sum(t == 70 for row in neg.ids[0] for t in row) / (T * k)
    assert 0.25 < replaced < 0.35
    assert all(set(row) <= {10, 70} for row in neg.ids[0])


def test_mn_prediction_equal_to_gold_forces_resampling():
    # The model predicts the gold at positions 0-2 and token 70 only at position 3, with c = 0.2: a draw is a
    # copy unless position 3 is chosen (p = 0.2); eight draws leave a copy with probability 0.8^8 = 0.17.
    gold = [10, 11, 12, 13]
    neg = mean_field_negatives_from_logits(
        [gold] * 50, [_peaked_logits([10, 11, 12, 70])] * 50, 1, c=0.2, sample=False, generator=gen(0), max_tries=8
    )
    valid = [row[0] for row in neg.valid]
    for ids, ok in zip(neg.ids, valid):
        assert ids[0] == ([10, 11, 12, 70] if ok else gold)
    assert 25 <= sum(valid) <= 50  # expected 83% valid; with one try it would be about 20%
    one_try = mean_field_negatives_from_logits(
        [gold] * 50, [_peaked_logits([10, 11, 12, 70])] * 50, 1, c=0.2, sample=False, generator=gen(0), max_tries=1
    )
    assert sum(row[0] for row in one_try.valid) < 20


def test_mn_sampling_follows_the_softmax():
    # Two candidate tokens with probabilities 0.8 / 0.2 at temperature 1.
    T = 400
    lg = torch.full((T, 96), -1e4)
    lg[:, 60] = 0.0
    lg[:, 61] = -torch.log(torch.tensor(4.0))
    neg = mean_field_negatives_from_logits([[10] * T], [lg], 1, c=1.0, sample=True, generator=gen(0))
    share = neg.ids[0][0].count(61) / T
    assert 0.14 < share < 0.26


def test_inverse_cdf_sampling_for_logits_off_the_generator_device():
    probs = torch.tensor([[0.0, 0.5, 0.3, 0.2], [0.0, 0.0, 0.0, 2.0]])  # row 1 unnormalised
    u = torch.tensor([[0.0, 0.49, 0.5, 0.79, 0.81, 0.999], [0.0, 0.3, 0.6, 0.9, 0.95, 0.999]])
    assert inverse_cdf_sample(probs, u).tolist() == [[1, 1, 2, 2, 3, 3], [3] * 6]
    draws = inverse_cdf_sample(probs[:1].expand(4000, 4), torch.rand((4000, 1), generator=gen(0))).flatten()
    share = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(share, probs[0], atol=0.03)


def test_mn_ranked_spreads_c_and_scores_minus_c():
    model = make_tiny_llama()
    mn = MeanFieldNegatives(model, pad_token_id=TINY_PAD)
    neg = mn(batch(), 4, gen(0), ranked=True)
    for row in neg.scores:
        assert row == pytest.approx([-0.05, -0.2, -0.35, -0.5])
    neg = mn(batch(), 4, gen(0))
    assert neg.scores is None


def test_mn_forward_uses_the_right_positions_and_keeps_model_mode():
    model = make_tiny_llama()
    ex = [Example([5, 6, 7], [10, 11, 12, 13]), Example([8], [20, 21, 22, 23, 24, 25, EOS]), Example([], [30, 31, 32])]
    mn = MeanFieldNegatives(model, c=1.0, sample=False, pad_token_id=TINY_PAD)
    model.train()
    neg = mn(ex, 1, gen(0))
    assert model.training
    model.eval()
    neg_eval = mn(ex, 1, gen(0))
    assert not model.training
    with torch.no_grad():
        for e, row in zip(ex[:2], neg_eval.ids):
            seq = torch.tensor([e.prefix_ids + e.continuation_ids])
            logits = model(input_ids=seq).logits[0]  # unpadded pass, one example
            P = len(e.prefix_ids)
            expected = logits[P - 1 : P - 1 + len(e.continuation_ids)].argmax(-1).tolist()
            assert row[0] == expected
    # With an empty prefix nothing predicts token 0, so MN keeps it.
    assert neg_eval.ids[2][0][0] == 30
    assert len(neg.ids[1][0]) == 7


def test_mn_validates_arguments():
    with pytest.raises(ValueError, match="c_range"):
        MeanFieldNegatives(make_tiny_llama(), c_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="values of c"):
        mean_field_negatives_from_logits([[1, 2]], [_peaked_logits([3, 4])], 2, c=[0.1], generator=gen(0))
    with pytest.raises(ValueError, match="rows"):
        mean_field_negatives_from_logits([[1, 2]], [_peaked_logits([3])], 1, generator=gen(0))


# ---------------------------------------------------------------------------------------------------
# Mixtures
# ---------------------------------------------------------------------------------------------------


def test_mixture_concatenates_groups_in_order_with_the_shared_generator():
    tn, bn = TruncationNegatives(EOS), BatchNegatives()
    mix = MixtureNegatives([(tn, 2), (bn, 2)])
    assert mix.name == "mix" and mix.k == 4 and not mix.needs_model
    ex = batch()
    neg = mix(ex, 4, gen(0), ranked=True)
    g = gen(0)
    a, b = tn(ex, 2, g, ranked=True), bn(ex, 2, g, ranked=True)
    for i in range(len(ex)):
        assert neg.ids[i] == a.ids[i] + b.ids[i]
        assert neg.valid[i] == a.valid[i] + b.valid[i]
        assert neg.sources[i] == ["tn", "tn", "bn", "bn"]
        row = neg.scores[i]
        assert all(x >= y for x, y in zip(row, row[1:]))
        assert min(row[:2]) > max(row[2:])  # the group listed first ranks above the second
        # within-group differences survive the shift
        assert row[0] - row[1] == pytest.approx(a.scores[i][0] - a.scores[i][1])
        assert row[2:] == pytest.approx(b.scores[i])  # the last group keeps its own scores


def test_mixture_lists_the_better_group_first_even_when_its_raw_scores_are_lower():
    # BN's ROUGE scores (<= 1) sit below TN's cut lengths; listed first, BN must still rank first.
    mix = MixtureNegatives([(BatchNegatives(), 1), (TruncationNegatives(EOS), 2)])
    neg = mix(batch(), 3, gen(0), ranked=True)
    for row, src in zip(neg.scores, neg.sources):
        assert src == ["bn", "tn", "tn"]
        assert row[0] > row[1] >= row[2]


def test_mixture_k_must_equal_the_sum_of_counts():
    mix = MixtureNegatives([(TruncationNegatives(EOS), 2), (BatchNegatives(), 1)])
    with pytest.raises(ValueError, match=r"k=4 must equal the sum of the counts \(tn:2, bn:1 = 3\)"):
        mix(batch(), 4, gen(0))
    with pytest.raises(ValueError, match="positive integer"):
        MixtureNegatives([(TruncationNegatives(EOS), 0)])
    assert MixtureNegatives([(MeanFieldNegatives(make_tiny_llama()), 1)]).needs_model


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def test_parse_spec():
    assert parse_spec("tn", 4) == [("tn", 4)]
    assert parse_spec("an:4", 4) == [("an", 4)]
    assert parse_spec(" AN:2, tn:1 ,bn:1", 4) == [("an", 2), ("tn", 1), ("bn", 1)]


@pytest.mark.parametrize(
    "spec, k, match",
    [
        ("tn:2,bn:1", 4, r"sum to 3, but num_negatives \(K\) = 4"),
        ("an:3", 4, r"sum to 3, but num_negatives \(K\) = 4"),
        ("xn", 2, r"unknown negative generator 'xn'.*\('tn', 'bn', 'mn', 'an', 'data'\)"),
        ("tn,bn", 2, "needs a count for every generator"),
        ("tn:2,tn:2", 4, "appears twice"),
        ("tn:two", 2, "not an integer"),
        ("tn:0,bn:2", 2, ">= 1"),
        ("tn:2,", 2, "empty generator"),
        ("", 2, "empty generator"),
    ],
)
def test_parse_spec_errors(spec, k, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec, k)


def test_build_single_and_mixture_with_options():
    model = make_tiny_llama()
    tn = build_negative_generator("tn", 4, eos_token_id=EOS, pad_token_id=TINY_PAD, options={"tn_min_keep": 3, "max_tries": 5})
    assert isinstance(tn, TruncationNegatives) and tn.min_keep == 3 and tn.max_tries == 5 and tn.eos_token_id == EOS
    mix = build_negative_generator(
        "an:2,mn:1,bn:1", 4, model=model, eos_token_id=EOS, pad_token_id=TINY_PAD,
        options={"an_top_k": 7, "an_temperature": 0.7, "an_max_new_tokens": 5, "an_backend": "hf", "mn_c": 0.3, "mn_sample": False},
    )
    assert isinstance(mix, MixtureNegatives) and mix.needs_model
    (an, n_an), (mn, n_mn), (bn, n_bn) = mix.parts
    assert (an.name, n_an, mn.name, n_mn, bn.name, n_bn) == ("an", 2, "mn", 1, "bn", 1)
    assert an.decoding == DecodingConfig("sample", temperature=0.7, top_k=7)
    assert an.max_new_tokens == 5 and an.backend == "hf" and an.eos_token_id == EOS
    assert mn.c == 0.3 and mn.sample is False and mn.pad_token_id == TINY_PAD
    neg = mix(batch(), 4, gen(0), ranked=True)
    assert neg.sources[0] == ["an", "an", "mn", "bn"]
    assert all(len(x) <= 5 for row in neg.ids for x in row[:2])


def test_build_errors():
    kw = dict(eos_token_id=EOS, pad_token_id=TINY_PAD)
    with pytest.raises(ValueError, match=r"unknown negatives option\(s\) \['tn_minkeep'\]; valid options: .*tn_min_keep"):
        build_negative_generator("tn", 2, options={"tn_minkeep": 2}, **kw)
    for name in ("mn", "an", "tn:1,an:1"):
        with pytest.raises(ValueError, match="runs a model: pass model="):
            build_negative_generator(name, 2, **kw)
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="greedy decoding .* k=2 .*beam"):
        build_negative_generator("an:2,tn:1", 3, model=model, options={"an_strategy": "greedy"}, **kw)
    # greedy is fine for a single AN negative inside a mixture
    ok = build_negative_generator("an:1,tn:2", 3, model=model, options={"an_strategy": "greedy"}, **kw)
    assert ok.parts[0][0].decoding.strategy == "greedy"
    with pytest.raises(ValueError, match="num_beams >= k"):
        build_negative_generator("an", 4, model=model, options={"an_strategy": "beam", "an_num_beams": 2}, **kw)
    with pytest.raises(ValueError, match="needs decoding.temperatures"):
        build_negative_generator("an", 2, model=model, options={"an_rank_by": "temperature"}, **kw)
    with pytest.raises(ValueError, match="has 3 values for k=2"):
        build_negative_generator("an", 2, model=model, options={"an_temperatures": [0.5, 1.0, 2.0]}, **kw)
    with pytest.raises(ValueError, match="backend must be one of"):
        build_negative_generator("an", 2, model=model, options={"an_backend": "tgi"}, **kw)
    from seqcpo.negatives.vllm_backend import vllm_available

    if not vllm_available():
        with pytest.raises(ValueError, match="needs the vllm package"):
            build_negative_generator("an", 2, model=model, options={"an_backend": "vllm", "an_vllm_model": "m"}, **kw)


def test_mn_with_dropout_in_train_mode_is_reproducible():
    model = make_tiny_llama().train()
    model.config.attention_dropout = 0.5  # read at call time by the attention
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    mn = MeanFieldNegatives(model, c=1.0, sample=False, pad_token_id=TINY_PAD)
    a, b = mn(batch(), 2, gen(0)), mn(batch(), 2, gen(0))
    c = mn(batch(), 2, gen(5))
    assert a == b and model.training
    assert a.ids != c.ids  # argmax at c = 1 differs only through the dropout masks, so dropout is active
