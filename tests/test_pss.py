"""PSS (parallel scheduled sampling): the mixing rate, gold targets, gradient through the last pass only,
the warm-up schedule, and a training run with ``objective: pss``."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.pss import pss_loss, pss_mix_probability
from seqcpo.types import Example


def _examples(n=4, prefix=(3, 5, 1, 4), cont=(6, 4, 7, 5), vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c = prefix[i % len(prefix)], cont[i % len(cont)]
        ids = torch.randint(3, vocab, (p + c,), generator=g).tolist()
        out.append(Example(prefix_ids=ids[:p], continuation_ids=ids[p:], meta={"id": i}))
    return out


def _record_forwards(model, monkeypatch):
    """Wrap model.forward; return the list of (grad enabled, input_ids) per call."""
    calls = []
    original = model.forward

    def forward(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs["input_ids"].clone()))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return calls


def test_mix_probability_schedule():
    assert pss_mix_probability(0, 0.5, 0) == 0.5
    assert pss_mix_probability(7, 0.5, 0) == 0.5
    assert pss_mix_probability(0, 0.5, 10) == 0.0
    assert pss_mix_probability(5, 0.5, 10) == pytest.approx(0.25)
    assert pss_mix_probability(10, 0.5, 10) == pytest.approx(0.5)
    assert pss_mix_probability(1000, 0.2, 10) == pytest.approx(0.8)
    assert pss_mix_probability(3, 1.0, 10) == 0.0  # p_gold = 1: never mix
    with pytest.raises(ValueError):
        pss_mix_probability(0, 1.5, 0)


def test_p_zero_is_exactly_the_mle_loss():
    from seqcpo.logps import sequence_logps
    from seqcpo.losses import mle_loss
    from seqcpo.batching import candidate_batch

    model = make_tiny_llama()
    examples = _examples()
    loss, frac = pss_loss(model, examples, p_model=0.0, passes=2, generator=torch.Generator().manual_seed(0),
                          pad_token_id=0)
    out = sequence_logps(model, candidate_batch(examples, None))
    torch.testing.assert_close(loss, mle_loss(out.summed[:, 0], out.token_counts[:, 0]), rtol=1e-5, atol=1e-5)
    assert frac == 0.0


@pytest.mark.parametrize("sample", [True, False])
def test_mix_fraction_matches_p_model(sample):
    model = make_tiny_llama()
    examples = _examples(n=8, prefix=(4, 2), cont=(400, 380))  # 3,120 continuation tokens
    _, frac = pss_loss(model, examples, p_model=0.3, passes=1, generator=torch.Generator().manual_seed(1),
                       pad_token_id=0, sample=sample)
    assert abs(frac - 0.3) < 0.04, frac  # 5 standard deviations


def test_targets_are_gold_and_prefix_stays_gold(monkeypatch):
    model = make_tiny_llama()
    examples = _examples(n=4)
    calls = _record_forwards(model, monkeypatch)
    loss, frac = pss_loss(model, examples, p_model=0.5, passes=1, generator=torch.Generator().manual_seed(3),
                          pad_token_id=0)
    assert len(calls) == 2
    mixed = calls[-1][1]  # the input of the scored pass
    assert 0 < frac < 1
    n_diff = 0
    manual_logits, manual_targets = [], []
    for b, ex in enumerate(examples):
        P, T = len(ex.prefix_ids), len(ex.continuation_ids)
        row = mixed[b, : P + T].tolist()
        assert row[:P] == ex.prefix_ids  # the prefix is never mixed
        n_diff += sum(x != y for x, y in zip(row[P:], ex.continuation_ids))
        out = model(input_ids=mixed[b : b + 1, : P + T]).logits[0]  # (P+T, V), this row alone
        manual_logits.append(out[P - 1 : P + T - 1])
        manual_targets.append(torch.tensor(ex.continuation_ids))
    assert n_diff > 0, "some continuation tokens should have been replaced"
    manual = F.cross_entropy(torch.cat(manual_logits).float(), torch.cat(manual_targets))
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_gradient_flows_through_the_last_pass_only(monkeypatch, passes):
    model = make_tiny_llama()
    calls = _record_forwards(model, monkeypatch)
    loss, _ = pss_loss(model, _examples(), p_model=0.5, passes=passes, generator=torch.Generator().manual_seed(0),
                       pad_token_id=0)
    assert [grad for grad, _ in calls] == [False] * passes + [True]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # each pass predicts from the previous mixed input: the inputs differ from pass to pass
    assert not torch.equal(calls[0][1], calls[-1][1])


def test_same_generator_seed_same_loss():
    model = make_tiny_llama()
    ex = _examples()
    a = pss_loss(model, ex, p_model=0.5, passes=2, generator=torch.Generator().manual_seed(5), pad_token_id=0)
    b = pss_loss(model, ex, p_model=0.5, passes=2, generator=torch.Generator().manual_seed(5), pad_token_id=0)
    assert a[0].item() == b[0].item() and a[1] == b[1]


def test_empty_prefix_first_token_is_never_mixed_nor_scored():
    model = make_tiny_llama()
    ex = [Example(prefix_ids=[], continuation_ids=[5, 6, 7, 8]), Example(prefix_ids=[4], continuation_ids=[9, 10])]
    loss, frac = pss_loss(model, ex, p_model=1.0, passes=1, generator=torch.Generator().manual_seed(0), pad_token_id=0)
    assert math.isfinite(loss.item()) and frac == 1.0  # 3 + 2 scored tokens, all replaced at p = 1


def test_training_run_with_objective_pss(tmp_path):
    from seqcpo.training.config import load_config
    from seqcpo.training.run import train

    tok = make_toy_tokenizer()
    model_dir = tmp_path / "tiny"
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    with open(data, "w") as fh:
        for i in range(24):
            fh.write(json.dumps({"id": f"r{i}", "instruction": f"Name {i}.", "context": "",
                                 "response": f"The number {i} is by the river."}) + "\n")
    cfg = load_config(None, dict(
        model_name_or_path=str(model_dir), dataset=str(data), task="instruction", prompt_template="plain",
        validation_size=2, test_size=2, output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
        max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
        objective="pss", pss_p_gold=0.5, pss_passes=2, pss_warmup_steps=2, seed=0, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    ))
    out = train(cfg)
    logs = [h for h in out["trainer"].state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["pss/mix_fraction"] == 0.0  # warm-up: step 0 mixes nothing
    assert logs[-1]["pss/mix_fraction"] > 0


@pytest.mark.parametrize("sample", [True, False])
def test_per_example_generators_make_the_batch_sum_the_sum_of_its_examples(sample):
    """Each example mixes with its own generator: the batch's summed loss and replaced tokens are those of
    its examples run one at a time (what makes a PSS step independent of how the batch is split)."""
    from seqcpo.seeding import example_generators

    model = make_tiny_llama()
    ex = _examples(n=4, prefix=(3, 8, 1, 5), cont=(2, 30, 7, 12))
    ids = [str(e.meta["id"]) for e in ex]
    kw = dict(p_model=0.5, passes=2, pad_token_id=0, sample=sample, reduction="sum")
    batch, frac = pss_loss(model, ex, generator=example_generators(0, ids, 0, "pss"), **kw)
    alone = [pss_loss(model, [e], generator=example_generators(0, [i], 0, "pss"), **kw) for e, i in zip(ex, ids)]
    torch.testing.assert_close(batch, sum(loss for loss, _ in alone), rtol=1e-5, atol=1e-4)
    n = [len(e.continuation_ids) for e in ex]
    assert round(frac * sum(n)) == sum(round(f * t) for (_, f), t in zip(alone, n))
    with pytest.raises(ValueError, match="reduction"):
        pss_loss(model, ex, generator=torch.Generator(), p_model=0.5, passes=1, pad_token_id=0, reduction="none")
