"""A run's step does not depend on how it was split: one SGD step on four examples of 2 to 60
response tokens gives the same parameter update, the same logged metrics and the same negatives as batch 4 x
accumulation 1, batch 2 x accumulation 2, and 2 processes (gloo DDP) x batch 2, for MLE, PSS, DPO (TN) and CPO
(TN + MN); an example's negatives are the same across batch size, accumulation, world size, epochs seen and
resume, at the generator level and through the trainer.

Before per-step normalisation the MLE-only update differed by tens of percent between 4x1 and 2x2 (the token
mean was taken per micro-batch, then divided by the accumulation steps).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import TINY_EOS, TINY_PAD, make_tiny_llama, free_port
from seqcpo.negatives import build_negative_generator
from seqcpo.seeding import example_generators, example_seed
from seqcpo.types import Example
from split_step import OBJECTIVES, one_step, split_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads cost more than they give

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("loss", "loss/mle", "loss/cpo", "pss/mix_fraction", "rewards/chosen", "rewards/rejected",
           "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "negatives/dropped")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "tiny"
    make_tiny_llama().save_pretrained(path)
    return str(path)



def _assert_same_step(name, got, ref, where):
    assert ref["update"].norm() > 1e-3, f"{name}: the update must be measurable"
    rel = _relative(got["update"], ref["update"])
    assert rel < 1e-5, f"{name} {where}: parameter update differs from 4x1 by {rel:.2e} (relative norm)"
    for key in METRICS:
        if key in ref["log"]:
            assert got["log"][key] == pytest.approx(ref["log"][key], rel=1e-4, abs=1e-5), f"{name} {where}: {key}"


@pytest.fixture(scope="module")
def batch_4x1(one_torch_thread, model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one"))
    return {name: one_step(model_dir, out, name, batch=4, accumulation=1) for name in OBJECTIVES}


def test_one_step_is_the_same_for_4x1_and_2x2(model_dir, batch_4x1, tmp_path):
    for name in OBJECTIVES:
        acc = one_step(model_dir, str(tmp_path), name, batch=2, accumulation=2)
        _assert_same_step(name, acc, batch_4x1[name], "2x2")
        # every example's negatives: the same whichever micro-batch made them
        if name in ("dpo", "cpo"):
            assert len(batch_4x1[name]["negatives"]) == 4
            assert acc["negatives"] == batch_4x1[name]["negatives"], name


@pytest.mark.integration  # about 40 s on two busy cores: one `accelerate launch` of two gloo processes
def test_one_step_is_the_same_for_2_processes_x_2(model_dir, batch_4x1, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", free_port(),
         os.path.join(ROOT, "tests", "split_step.py"), model_dir, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    for name in OBJECTIVES:
        for r, rank in enumerate(ranks):
            _assert_same_step(name, rank["results"][name], batch_4x1[name], f"2 processes x 2 (rank {r})")
        if name in ("dpo", "cpo"):
            # each process made the negatives of its own two examples: together, those of the one-process run
            negs = [rank["results"][name]["negatives"] for rank in ranks]
            assert len(negs[0]) == len(negs[1]) == 2
            assert {**negs[0], **negs[1]} == batch_4x1[name]["negatives"], name


def _ids(examples):
    return [e.meta["id"] for e in examples]


@pytest.mark.parametrize("spec", ["tn", "mn", "an", "an:1,mn:1,tn:1"])
def test_an_examples_negatives_do_not_depend_on_its_batch(spec):
    """Generator level: each example drawn alone, in a batch of 4, or in another order gives the same
    negatives from its own (seed, id, epoch) generator; another epoch or id gives other ones."""
    model = make_tiny_llama()
    k = 3 if "," in spec else 2
    gen = build_negative_generator(spec, k, model=model, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD,
                                   options={"an_max_new_tokens": 12, "an_batch_size": 2})
    examples = split_examples()
    rngs = lambda exs, epoch=0: example_generators(0, _ids(exs), epoch, "negatives")  # noqa: E731
    together = gen(examples, k, rngs(examples))
    for b, ex in enumerate(examples):
        alone = gen([ex], k, rngs([ex]))
        assert alone.ids[0] == together.ids[b] and alone.valid[0] == together.valid[b], (spec, b)
    order = [2, 0, 3, 1]
    shuffled = [examples[i] for i in order]
    again = gen(shuffled, k, rngs(shuffled))
    assert [again.ids[j] for j in sorted(range(4), key=order.__getitem__)] == together.ids
    assert gen(examples, k, rngs(examples, epoch=1)).ids != together.ids


def test_example_seed_keys_on_seed_id_epoch_and_purpose():
    base = example_seed(0, "a", 0, "negatives")
    assert base == example_seed(0, "a", 0, "negatives")
    others = {example_seed(1, "a", 0, "negatives"), example_seed(0, "b", 0, "negatives"),
              example_seed(0, "a", 1, "negatives"), example_seed(0, "a", 0, "pss")}
    assert base not in others and len(others) == 4


def test_bn_depends_on_its_batch_but_leaves_the_other_parts_of_a_mixture_alone():
    """BN draws other golds from its batch (documented); TN listed after it in a mixture does not move."""
    gen = build_negative_generator("bn:1,tn:1", 2, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)
    examples = split_examples()
    rngs = lambda exs: example_generators(0, _ids(exs), 0, "negatives")  # noqa: E731
    four = gen(examples, 2, rngs(examples))
    two = gen(examples[:2], 2, rngs(examples[:2]))
    assert [row[1] for row in two.ids] == [row[1] for row in four.ids[:2]]  # the TN column


def test_negatives_follow_the_epoch_and_survive_a_resume(tmp_path):
    """Through the trainer: two epochs of one step each; an example's epoch-1 negatives differ from its
    epoch-0 ones, and a run resumed after step 1 makes the same epoch-1 negatives as the uninterrupted run."""
    from transformers import AutoModelForCausalLM

    from seqcpo.batching import ExampleDataset
    from seqcpo.training.config import load_config
    from seqcpo.training.trainer import SeqCPOTrainer

    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)

    def run(out, resume=None):
        cfg = load_config(None, dict(
            model_name_or_path=str(model_dir), dataset="unused", output_dir=str(out), per_device_train_batch_size=4,
            num_train_epochs=2, learning_rate=1e-3, save_strategy="steps", save_steps=1, report_to="none", seed=0,
            objective="cpo", num_negatives=2, negatives="tn:1,mn:1", dataloader_num_workers=0, use_cpu=True,
            disable_tqdm=True, logging_steps=1,
        ))
        trainer = SeqCPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), cfg,
                                train_dataset=ExampleDataset(split_examples()))
        made = []
        inner = trainer.make_negatives

        def recording(examples, *args, **kwargs):
            neg = inner(examples, *args, **kwargs)
            made.append({e.meta["id"]: neg.ids[b] for b, e in enumerate(examples)})
            return neg

        trainer.make_negatives = recording
        trainer.train(resume_from_checkpoint=resume)
        return made

    full = run(tmp_path / "full")
    assert len(full) == 2 and full[0].keys() == full[1].keys()
    assert full[0] != full[1], "epoch 1 draws new negatives"
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-1"))
    assert resumed == [full[1]]


def test_a_final_partial_step_divides_by_what_it_holds(model_dir, tmp_path):
    """Five examples, one epoch: 4x1 runs steps of 4 and 1 examples, 2x2 runs 2+2 micro-batches then a lone
    short one; both end at the same parameters and log the same last-step loss."""
    from seqcpo.types import Example

    examples = split_examples() + [Example(prefix_ids=[7, 8], continuation_ids=[9, 10, 11, TINY_EOS], meta={"id": "ex4"})]
    runs = [one_step(model_dir, str(tmp_path / f"{b}x{a}"), "mle", batch=b, accumulation=a, examples=examples,
                     max_steps=-1, num_train_epochs=1) for b, a in ((4, 1), (2, 2))]
    assert [len(r["logs"]) for r in runs] == [2, 2]
    assert _relative(runs[1]["update"], runs[0]["update"]) < 1e-5
    assert runs[1]["logs"][1]["loss/mle"] == pytest.approx(runs[0]["logs"][1]["loss/mle"], rel=1e-5)


def test_trainer_step_counts_and_logged_metrics_pool_over_micro_batches(model_dir, tmp_path):
    """2x2: the logged loss/mle is the step's token mean (the sum of all gold token losses over all gold
    tokens), not the last micro-batch's."""
    from seqcpo.batching import candidate_batch
    from seqcpo.logps import sequence_logps
    from transformers import AutoModelForCausalLM

    res = one_step(model_dir, str(tmp_path), "mle", batch=2, accumulation=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        out = sequence_logps(model, candidate_batch(split_examples(), None))
    token_mean = float(-out.summed[:, 0].sum() / out.token_counts[:, 0].sum())
    assert res["log"]["loss/mle"] == pytest.approx(token_mean, rel=1e-5)
    assert res["log"]["loss"] == pytest.approx(token_mean, rel=1e-5)


def test_metrics_logged_every_two_steps_average_the_steps_like_the_loss(model_dir, tmp_path):
    """logging_steps 2 over 2x2 steps: loss/mle is the mean of the two steps' token means, as ``loss`` is."""
    res = one_step(model_dir, str(tmp_path), "mle", batch=2, accumulation=2, max_steps=2, logging_steps=2)
    (row,) = res["logs"]
    assert row["loss/mle"] == pytest.approx(row["loss"], rel=1e-5)
