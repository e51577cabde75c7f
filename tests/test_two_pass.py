"""The two-pass layout (seqcpo.two_pass): the naive layout's values and gradients; MN drawn from its gold pass
equals MN running its own pass; the trainer uses it so that MN costs no forward pass, with unchanged losses."""

import pytest
import torch
from torch.testing import assert_close

from conftest import make_tiny_gpt2, make_tiny_llama
from seqcpo.logps import sequence_logps
from seqcpo.negatives import MeanFieldNegatives, MixtureNegatives, TruncationNegatives
from seqcpo.negatives import mean_field
from seqcpo.two_pass import gold_pass, negatives_pass, two_pass_sequence_logps
from seqcpo.types import CandidateBatch, Example
from test_fast_paths import _assert_same, _batch, _run
from test_training import _cfg, _losses, assets  # noqa: F401  (module-scoped fixture)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_two_pass_matches_naive_values_and_gradients(make, attn):
    model = make()
    model.config._attn_implementation = attn
    batch = _batch(seed=5, B=3, K=3)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    _assert_same(_run(model, batch, "two_pass", w, chunk_size=4), _run(model, batch, "naive", w))


def test_two_pass_with_empty_negatives_and_length_normalisation():
    model = make_tiny_llama()
    batch = CandidateBatch(
        prefix_ids=[[5, 6, 7], [8]],
        candidate_ids=[[[9, 10], [], [11, 12, 13]], [[14], [15, 16], []]],
        candidate_mask=[[True, False, True], [True, True, False]],
    )
    for norm in (False, True):
        a = two_pass_sequence_logps(model, batch, length_normalize=norm)
        b = sequence_logps(model, batch, layout="naive", length_normalize=norm)
        assert_close(a.logps, b.logps, atol=1e-5, rtol=1e-5)
        assert a.token_counts.tolist() == [[2, 0, 3], [1, 2, 0]]
        assert a.summed[0, 1] == 0 and a.summed[1, 2] == 0


def _gold_sharing_batch(seed=0, B=3):
    """Negatives that share beginnings with the gold: truncations + EOS, one-token changes, the gold itself, a
    prefix of the gold, an unrelated one, an empty one."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    prefixes, cands = [], []
    for b in range(B):
        gold = ids(6 + b)
        changed = list(gold)
        changed[2] = (changed[2] + 1 - 3) % 93 + 3
        prefixes.append(ids(2 + b))
        cands.append([gold, gold[:3] + [2], gold[:1] + [2], changed, list(gold), gold[:4], ids(5), []])
    return CandidateBatch(prefix_ids=prefixes, candidate_ids=cands, candidate_mask=[[True] * 8] * B)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_negatives_sharing_the_gold_match_naive_values_and_gradients(make, attn):
    model = make()
    model.config._attn_implementation = attn
    batch = _gold_sharing_batch()
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    _assert_same(_run(model, batch, "two_pass", w, chunk_size=5), _run(model, batch, "naive", w))


def test_two_pass_runs_only_what_a_negative_does_not_share_and_auto_picks_it():
    from seqcpo.logps import choose_layout
    from seqcpo.two_pass import two_pass_tokens

    gold = [10, 11, 12, 13]
    batch = CandidateBatch(prefix_ids=[[5, 6, 7]], candidate_ids=[[gold, [10, 11, 2], [20, 21, 22]]],
                           candidate_mask=[[True] * 3])
    # prefix-shared row: 3 + 4 + 3 + 3; two passes: 3 + 4, the truncation nothing, the other its first 2 tokens
    assert two_pass_tokens(batch) == (13, 9)
    model = make_tiny_llama()
    assert choose_layout(model, batch) == "two_pass"
    assert choose_layout(model, batch, head_in_forward=True) == "shared"
    model.config.sliding_window = 16  # a sliding-window cache drops old keys: one pass instead
    assert choose_layout(model, batch) == "shared"
    model.config.sliding_window = None
    unrelated = CandidateBatch(prefix_ids=[[5, 6, 7]], candidate_ids=[[list(range(10, 20))] + [list(range(30 + i, 40 + i)) for i in range(3)]],
                               candidate_mask=[[True] * 4])
    assert two_pass_tokens(unrelated) == (43, 40)  # only the last token of each negative is saved
    assert choose_layout(model, unrelated) == "shared"
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert choose_layout(model, batch) == "shared"  # no KV cache under checkpointing in training
    auto = sequence_logps(model, batch, layout="auto")
    assert_close(auto.logps, sequence_logps(model, batch, layout="naive").logps, atol=1e-5, rtol=1e-5)


def test_a_gold_pass_cache_serves_one_negatives_pass():
    model = make_tiny_llama()
    gp = gold_pass(model, [[5, 6]], [[7, 8]])
    negatives_pass(model, gp, [[[9, 10]]])
    with pytest.raises(RuntimeError, match="already used"):
        negatives_pass(model, gp, [[[9, 10]]])


def _examples(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    return [Example(prefix_ids=ids(2 + b), continuation_ids=ids(6 + 2 * b)) for b in range(B)]


@pytest.mark.parametrize("ranked", [False, True])
def test_mn_from_the_gold_pass_equals_mn_running_its_own_pass(ranked):
    model = make_tiny_llama()
    examples = _examples()
    gp = gold_pass(model, [e.prefix_ids for e in examples], [e.continuation_ids for e in examples], want_logits=True)
    own_logits = mean_field.continuation_logits(model, examples, 0)
    for a, b in zip(gp.gold_logits, own_logits):
        assert_close(a, b.float(), atol=1e-5, rtol=1e-5)
    mn = MeanFieldNegatives(model, c=0.4)
    own = mn(examples, 3, torch.Generator().manual_seed(7), ranked=ranked)
    reused = mn(examples, 3, torch.Generator().manual_seed(7), ranked=ranked, gold_logits=gp.gold_logits)
    assert reused.ids == own.ids and reused.valid == own.valid and reused.scores == own.scores
    # a mixture hands the logits to its MN part only
    mix = MixtureNegatives([(TruncationNegatives(eos_token_id=2), 1), (mn, 2)])
    assert mix.uses_gold_logits
    assert mix(examples, 3, torch.Generator().manual_seed(3), gold_logits=gp.gold_logits).ids == mix(
        examples, 3, torch.Generator().manual_seed(3)).ids


def _count_tokens(model):
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("source", ["reference", "policy"])
def test_trainer_draws_mn_from_the_gold_pass_with_unchanged_losses(assets, tmp_path, monkeypatch, source):  # noqa: F811
    """auto layout: MN's own forward never runs, the reference processes fewer tokens, the losses are those of the
    one-pass layout (same negatives, same numbers)."""
    from seqcpo.training.run import train

    over = dict(negatives="tn:1,mn:1", max_steps=2)
    if source == "policy":
        over.update(negatives_model="policy")
    shared = train(_cfg(assets, tmp_path / "s", logps_layout="shared", **over))
    assert shared["trainer"].mn_source is None

    def no_own_pass(*a, **k):
        raise AssertionError("MN ran its own forward pass")

    monkeypatch.setattr(mean_field, "continuation_logits", no_own_pass)
    fused = train(_cfg(assets, tmp_path / "f", **over))
    assert fused["trainer"].mn_source == source
    assert _losses(fused["trainer"].state.log_history) == pytest.approx(
        _losses(shared["trainer"].state.log_history), rel=1e-4, abs=1e-5)
    monkeypatch.undo()

    if source == "reference":
        # one step of each on the same batch: the fused reference never re-reads a prefix
        from seqcpo.batching import collate_examples

        counts = {}
        for name, out in (("shared", shared), ("fused", fused)):
            tr = out["trainer"]
            seen = _count_tokens(tr.reference.model)
            inputs = collate_examples([tr.train_dataset[i] for i in range(4)])
            with torch.no_grad():
                tr.compute_loss(tr.model, inputs)
            counts[name] = sum(seen)
        assert counts["fused"] < counts["shared"], counts


def test_two_pass_refuses_gradient_checkpointing(assets, tmp_path):  # noqa: F811
    from seqcpo.training.run import train

    with pytest.raises(ValueError, match="gradient checkpointing"):
        train(_cfg(assets, tmp_path, logps_layout="two_pass", gradient_checkpointing=True, max_steps=1))
    out = train(_cfg(assets, tmp_path / "a", negatives="tn:1,mn:1", negatives_model="policy",
                     gradient_checkpointing=True, max_steps=1))
    assert out["trainer"].mn_source is None  # falls back to MN's own pass


def test_offline_mn_negatives_are_the_same_fused_or_not(assets, tmp_path):  # noqa: F811
    from seqcpo.training.offline import read_offline_negatives
    from seqcpo.training.run import make_negatives

    rows = {}
    for layout in ("auto", "shared"):
        cfg = _cfg(assets, tmp_path, negatives="tn:1,mn:1", logps_layout=layout)
        make_negatives(cfg, str(tmp_path / layout), shard_size=64)
        rows[layout], _ = read_offline_negatives(str(tmp_path / layout), cfg)
    assert rows["auto"].keys() == rows["shared"].keys()
    for key, a in rows["auto"].items():
        b = rows["shared"][key]
        assert a["negatives"] == b["negatives"]
        assert a["ref_logps"] == pytest.approx(b["ref_logps"], abs=1e-4)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_truncation_negatives_train_in_two_passes_to_the_one_pass_losses(assets, tmp_path, lora):  # noqa: F811
    """tn negatives share all but their EOS with the gold: auto runs them in two passes (policy and reference,
    also for a LoRA policy with its adapter-off reference), with the losses of the one-pass layout."""
    from seqcpo.logps import choose_layout
    from seqcpo.training.run import train

    over = dict(negatives="tn:2", max_steps=2)
    if lora:
        over.update(lora=True, lora_r=4, learning_rate=1e-2, lora_dropout=0.0)  # dropout draws differ per layout
    shared = train(_cfg(assets, tmp_path / "s", logps_layout="shared", **over))
    auto = train(_cfg(assets, tmp_path / "a", **over))
    tr = auto["trainer"]
    from seqcpo.batching import candidate_batch

    examples = tr.train_dataset.examples[:4]
    batch = candidate_batch(examples, tr.make_negatives(examples))
    assert choose_layout(tr.model, batch) == "two_pass"
    assert _losses(auto["trainer"].state.log_history) == pytest.approx(
        _losses(shared["trainer"].state.log_history), rel=1e-4, abs=1e-5)
