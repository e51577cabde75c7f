"""Generation quality while training (seqcpo.training.quality): ``--eval_steps N`` logs quality/* metrics that
move when the model does, leaves the trained weights alone, and refuses an empty slice with one line."""

import json

import pytest
import torch

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.training.config import ConfigError, load_config
from seqcpo.training.quality import generation_quality


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread", "books", "fog"]
    with open(root / "train.jsonl", "w") as fh:
        for i in range(48):
            a, b = words[i % 10], words[(3 * i + 1) % 10]
            fh.write(json.dumps({"id": f"r{i}", "instruction": f"Describe the {a} near the {b}.", "context": "",
                                 "response": f"The {a} is by the {b} and the {a} is near."}) + "\n")
    return {"model": str(root / "tiny"), "data": str(root / "train.jsonl")}


def _cfg(assets, out, **over):
    base = dict(model_name_or_path=assets["model"], dataset=assets["data"], task="instruction",
                prompt_template="plain", validation_size=6, test_size=4, output_dir=str(out),
                per_device_train_batch_size=4, max_steps=6, learning_rate=3e-2, lr_scheduler_type="constant",
                warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", objective="mle", seed=0,
                dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    return load_config(None, {**base, **over})


def _quality(history):
    return [h for h in history if "quality/rouge_l" in h]


def test_generation_quality_by_hand():
    """ROUGE-L of an exact copy is 1; 'a b a b a b' repeats 1 of 3 4-grams; distinct-2 pools bigrams."""
    q = generation_quality(["the cat sat", "a b a b a b"], ["the cat sat", "x y"], embeddings=False)
    assert q["quality/repetition"] == pytest.approx(1 / 3, abs=1e-6)  # the 3-word text has no 4-gram
    # bigrams: (the cat)(cat sat) + ab ba ab ba ab: 4 unique of 7
    assert q["quality/distinct_2"] == pytest.approx(4 / 7, abs=1e-6)
    assert q["quality/rouge_l"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="2 generations but 1 golds"):
        generation_quality(["a", "b"], ["a"], embeddings=False)


def test_eval_steps_logs_quality_that_moves_with_the_model_and_keeps_the_weights(assets, tmp_path):
    from seqcpo.training.run import train

    quiet = train(_cfg(assets, tmp_path / "quiet"))
    watched = train(_cfg(assets, tmp_path / "watched", eval_steps=3, quality_examples=6, quality_embeddings=True))
    rows = _quality(watched["trainer"].state.log_history)
    assert [r["step"] for r in rows] == [0, 3, 6]
    for r in rows:
        assert set(r) >= {"quality/rouge_l", "quality/similarity", "quality/repetition", "quality/distinct_2"}
        assert 0.0 <= r["quality/rouge_l"] <= 1.0 and -1.0 <= r["quality/similarity"] <= 1.0
    # the model learned the responses' pattern: its continuations move toward the gold
    assert rows[-1]["quality/rouge_l"] != rows[0]["quality/rouge_l"]
    assert rows[-1]["quality/rouge_l"] > rows[0]["quality/rouge_l"]
    # generating in between steps changes nothing in training
    a = dict(quiet["trainer"].model.named_parameters())
    for name, p in watched["trainer"].model.named_parameters():
        torch.testing.assert_close(p, a[name], rtol=0, atol=0)
    samples = [json.loads(line) for line in open(tmp_path / "watched" / "quality_samples.jsonl")]
    assert {s["step"] for s in samples} == {0, 3, 6} and all(s["gold"] and "generation" in s for s in samples)


def test_quality_on_an_empty_split_is_one_line(assets, tmp_path):
    from seqcpo.training.run import train

    with pytest.raises(ValueError, match="quality_split 'validation' has no examples"):
        train(_cfg(assets, tmp_path / "e", validation_size=0, eval_steps=2))
    with pytest.raises(ConfigError, match="quality_split"):
        _cfg(assets, tmp_path / "x", quality_split="train")


def test_an_interrupted_run_leaves_each_step_of_the_samples_once(assets, tmp_path):
    """Defect: quality_samples.jsonl was appended to by a resumed run from its checkpoint on, so the steps that an
    interrupted run had already passed were written twice. Now the resumed run drops them first: the file equals
    the uninterrupted run's, and a fresh run into the folder starts it empty."""
    import shutil

    from seqcpo.training.quality import SAMPLES_FILE, keep_samples_up_to
    from seqcpo.training.run import train

    over = dict(eval_steps=1, quality_examples=2, quality_samples=1, quality_embeddings=False,
                save_strategy="steps", save_steps=2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(_cfg(assets, whole, **over))
    train(_cfg(assets, cut, **over))
    # as if killed at step 5: the last checkpoint is step 4, the samples file already has steps 5 and 6
    for gone in ("checkpoint-6", "final"):
        shutil.rmtree(cut / gone, ignore_errors=True)
    with open(cut / SAMPLES_FILE, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "id": "half-written')  # and its last line was cut short
    train(_cfg(assets, cut, resume_from_checkpoint="true", **over))
    rows = [json.loads(line) for line in open(cut / SAMPLES_FILE, encoding="utf-8")]
    assert [r["step"] for r in rows] == list(range(7))
    assert (cut / SAMPLES_FILE).read_text("utf-8") == (whole / SAMPLES_FILE).read_text("utf-8")
    keep_samples_up_to(str(cut / SAMPLES_FILE), 0)  # a run started again from step 0
    assert (cut / SAMPLES_FILE).read_text("utf-8") == ""
