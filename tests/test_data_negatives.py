"""The ``data`` negative source: the row's rejected answers fill the first slots, synthetic ones the rest, in the
documented order; labels for the list losses; training end to end on preference files (every list objective,
reference-free), split invariance and offline negatives with ``data``."""

import json
import os

import pytest
import torch

from conftest import TINY_EOS, TINY_PAD, make_tiny_llama, make_toy_tokenizer
from seqcpo.negatives import build_negative_generator
from seqcpo.negatives.data import NO_TARGET, candidate_labels
from seqcpo.seeding import example_generators
from seqcpo.types import Example

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for i, n_rej in enumerate([3, 1, 0, 2]):
        ids = torch.randint(3, 90, (14,), generator=g).tolist()
        rejected = [torch.randint(3, 90, (4 + j,), generator=g).tolist() + [TINY_EOS] for j in range(n_rej)]
        out.append(Example(prefix_ids=ids[:5], continuation_ids=ids[5:] + [TINY_EOS], meta={"id": f"e{i}"},
                           rejected_ids=rejected))
    return out


def _rngs(examples):
    return example_generators(0, [e.meta["id"] for e in examples], 0, "negatives")


@pytest.mark.parametrize("ranked", [False, True])
def test_data_fills_the_first_slots_and_synthetic_ones_the_rest(ranked):
    exs = _examples()
    gen = build_negative_generator("data:2,tn:2", 4, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)
    neg = gen(exs, 4, _rngs(exs), ranked=ranked)
    assert neg.ids[0][:2] == exs[0].rejected_ids[:2] and neg.sources[0] == ["data", "data", "tn", "tn"]
    # one rejected answer: the second data slot is filled by the first synthetic generator (tn)
    assert neg.ids[1][0] == exs[1].rejected_ids[0] and neg.sources[1] == ["data", "tn", "tn", "tn"]
    assert neg.sources[2] == ["tn"] * 4 and all(neg.valid[2])
    if ranked:  # gold > data (in the data's order) > synthetic: the scores never rise along a row
        assert all(row[i] >= row[i + 1] for row in neg.scores for i in range(3))
    # a short row's synthetic columns are those of the same row with a full data share (fill draws from a fork)
    full = Example(exs[1].prefix_ids, exs[1].continuation_ids, dict(exs[1].meta), rejected_ids=exs[0].rejected_ids)
    again = gen([full], 4, _rngs([full]), ranked=ranked)
    assert again.ids[0][2:] == neg.ids[1][2:]


def test_data_alone_masks_missing_slots_and_data_last_ranks_them_below():
    exs = _examples()
    neg = build_negative_generator("data", 2, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)(exs, 2, _rngs(exs))
    assert neg.valid[0] == [True, True] and neg.valid[1] == [True, False] and neg.valid[2] == [False, False]
    last = build_negative_generator("tn:2,data:1", 3, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)
    neg = last(exs, 3, _rngs(exs), ranked=True)
    assert neg.sources[0] == ["tn", "tn", "data"] and neg.ids[0][2] == exs[0].rejected_ids[0]
    with pytest.raises(ValueError, match="needs preference examples"):
        plain = [Example([5, 6], [7, TINY_EOS], {"id": "x"})]
        build_negative_generator("data", 1, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)(plain, 1, _rngs(plain))


def test_candidate_labels_follow_columns_data_scores_and_ties():
    ex = Example([1], [2], {"id": "a"}, rejected_ids=[[3], [4]], scores=[3.0, 3.0, 1.0])
    labels, targets = candidate_labels([ex], [["data", "data", "tn", "tn"]], ranked=False)
    assert labels == [[0.0, 0.0, -2.0, -3.0, -3.0]]  # rejected 0 tied with the gold; unranked synthetic tied
    assert targets == [[3.0, 3.0, 1.0, NO_TARGET, NO_TARGET]]
    labels, targets = candidate_labels([Example([1], [2], {}, rejected_ids=[[3]])], [["data", "tn"]], ranked=True)
    assert labels == [[0.0, -1.0, -2.0]] and targets == [[0.0, NO_TARGET, NO_TARGET]]


# -- training end to end


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    tok = make_toy_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    model_dir = root / "tiny"
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread", "books", "fog"]
    files = {}
    rows = {"standard": [], "conversational": [], "ranked": []}
    for i in range(24):
        a, b, c = words[i % 10], words[(3 * i + 1) % 10], words[(7 * i + 2) % 10]
        prompt = f"Describe the {a}."
        gold, bad1, bad2 = f"The {a} is by the {b}.", f"{c} {c} {c}", f"The {b} {a}"
        rows["standard"].append({"id": f"s{i}", "prompt": prompt, "chosen": gold, "rejected": [bad1, bad2][: 1 + i % 2]})
        user = [{"role": "user", "content": prompt}]
        rows["conversational"].append({"id": f"c{i}", "prompt": user,
                                       "chosen": [{"role": "assistant", "content": gold}],
                                       "rejected": [{"role": "assistant", "content": bad1}]})
        rows["ranked"].append({"id": f"r{i}", "prompt": prompt, "completions": [bad1, gold, bad2],
                               "scores": [0.1, 0.9, 0.1 if i % 2 else 0.5]})
    for name, content in rows.items():
        path = root / f"prefs_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
        files[name] = str(path)
    return {"model": str(model_dir), "files": files, "root": root}


def _cfg(assets, tmp_path, data="standard", **over):
    from seqcpo.training.config import load_config

    base = dict(model_name_or_path=assets["model"], dataset=assets["files"][data], validation_size=0, test_size=0,
                output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-3,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
                objective="cpo_ranked", num_negatives=4, negatives="data:1,tn:3", beta=1.0, seed=0,
                dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    base.update(over)
    return load_config(None, base)


@pytest.mark.parametrize("data", ["standard", "conversational", "ranked"])
def test_cpo_ranked_trains_on_every_preference_format(assets, tmp_path, data):
    from seqcpo.training.run import train

    out = train(_cfg(assets, tmp_path, data))
    logs = [h for h in out["trainer"].state.log_history if "loss" in h]
    assert out["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["negatives/dropped"] == 0.0


@pytest.mark.parametrize("objective, over", [
    ("lipo", {}), ("bt_pairs", {}), ("infonca", {}), ("nca", {}),
    ("dpo", {"num_negatives": 1, "negatives": "data"}),
    ("cpo", {"reference": "none", "target_margin": 0.5, "beta": 2.0}),
])
def test_list_objectives_and_reference_free_train(assets, tmp_path, objective, over):
    from seqcpo.training.run import train

    cfg = _cfg(assets, tmp_path, "ranked", objective=objective, mle_weight=0.0, **over)
    out = train(cfg)
    trainer = out["trainer"]
    logs = [h for h in trainer.state.log_history if "loss/cpo" in h]
    assert logs and all(h["loss/cpo"] > 0 for h in logs), objective
    if over.get("reference") == "none":
        assert trainer.reference.name == "none" and not hasattr(trainer.reference, "model")
        # reference-free: the logged gold reward is beta times the gold's mean token log-prob (negative)
        assert logs[0]["rewards/chosen"] < 0


def test_split_invariance_with_data_negatives(tmp_path):
    """One SGD step with data + TN negatives on rows with 0 to 3 rejected answers: the same update, metrics and
    negatives for batch 4 x accumulation 1 and batch 2 x accumulation 2."""
    from split_step import one_step, split_examples

    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    exs = split_examples()
    for e, ref in zip(exs, _examples()):
        e.rejected_ids = ref.rejected_ids
    over = dict(objective="cpo_ranked", num_negatives=3, negatives="data:2,tn:1")
    ref = one_step(str(model_dir), str(tmp_path / "a"), "cpo", 4, 1, examples=exs, **over)
    two = one_step(str(model_dir), str(tmp_path / "b"), "cpo", 2, 2, examples=exs, **over)
    rel = float((two["update"] - ref["update"]).norm() / ref["update"].norm())
    assert ref["update"].norm() > 1e-3 and rel < 1e-5
    for key in ("loss", "loss/cpo", "rewards/accuracies", "negatives/dropped"):
        assert two["log"][key] == pytest.approx(ref["log"][key], rel=1e-4, abs=1e-5), key
    assert two["negatives"] == ref["negatives"]
    assert ref["negatives"]["ex0"][0][:2] == exs[0].rejected_ids[:2]


def test_offline_negatives_with_data(assets, tmp_path):
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives, train

    cfg = _cfg(assets, tmp_path, "standard", negatives="data:1,tn:3")
    out_dir = str(tmp_path / "neg")
    make_negatives(cfg, out_dir, shard_size=8)
    rows, meta = read_offline_negatives(out_dir, cfg)
    row = rows["s1"]  # two rejected answers: the first one fills the data slot
    assert row["sources"] == ["data", "tn", "tn", "tn"] and len(row["ref_logps"]) == 5
    tok = make_toy_tokenizer()
    assert row["negatives"][0] == tok("fog fog fog", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out = train(_cfg(assets, tmp_path / "t", "standard", negatives="data:1,tn:3", negatives_path=out_dir))
    assert out["trainer"].reference.name == "precomputed" and out["steps"] == 2


def test_offline_folder_is_keyed_by_the_rejected_answers(assets, tmp_path):
    """The same file changed in place (other rejected answers, same gold): the folder no longer fits."""
    from seqcpo.data import load_splits
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives

    path = tmp_path / "prefs.jsonl"
    text = open(assets["files"]["standard"]).read()
    path.write_text(text)
    cfg = _cfg(assets, tmp_path, "standard", dataset=str(path), negatives="data:1,tn:3")
    make_negatives(cfg, str(tmp_path / "neg"), shard_size=32)
    path.write_text(text.replace("fog fog fog", "salt salt salt"))
    tok = make_toy_tokenizer()
    train_split = load_splits(cfg.data_config(), tok).train
    with pytest.raises(ValueError, match="made from"):
        read_offline_negatives(str(tmp_path / "neg"), cfg, train_split)


def test_data_negatives_without_preference_data_are_refused_by_the_dry_run_and_before_training(assets, tmp_path,
                                                                                              capsys):
    """Defect (campaign 3): `--negatives data:4` on plain text passed `--dry-run` (rc 0, "data x4") and the real
    run refused it only at its first step; with task instruction it could be refused from the config alone."""
    from seqcpo.cli import main
    from seqcpo.training.config import ConfigError
    from seqcpo.training.run import train

    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread", "books", "fog"]
    text = tmp_path / "plain.jsonl"
    text.write_text("".join(json.dumps({"id": f"t{i}", "text": " ".join(words[(i + j) % 10] for j in range(30))})
                            + "\n" for i in range(12)))
    over = dict(dataset=str(text), task="continuation", prefix_tokens=6, continuation_tokens=6,
                objective="cpo", negatives="data:1,tn:3")
    with pytest.raises(ValueError, match="negatives 'data' needs preference examples"):
        train(_cfg(assets, tmp_path, **over))
    assert not (tmp_path / "run" / "final").exists() and not list((tmp_path / "run").glob("checkpoint-*"))
    args = ["train", "--dry-run"] + [a for k, v in {**over, "model_name_or_path": assets["model"],
                                                    "output_dir": str(tmp_path / "dry"), "use_cpu": True,
                                                    "report_to": "none", "max_steps": 2,
                                                    "validation_size": 0, "test_size": 0}.items()
                                     for a in (f"--{k}", str(v))]
    assert main(args) == 2
    assert "negatives 'data' needs preference examples" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^negatives='data:1,tn:3': 'data' negatives .* task instruction has none"):
        _cfg(assets, tmp_path, **{**over, "task": "instruction"})


def test_a_folder_row_fits_only_the_example_it_was_made_from():
    """The streamed run's check of each row (seqcpo.batching.row_fits): prefix, gold and every "data" negative."""
    from seqcpo.batching import row_fits

    row = {"prefix_ids": [1, 2], "gold_ids": [3, 2], "negatives": [[4, 2], [5, 2]], "sources": ["data", "tn"],
           "valid": [True, True]}
    assert row_fits(row, [1, 2], [3, 2], [[4, 2], [6, 2]])
    assert not row_fits(row, [1, 9], [3, 2], [[4, 2]])  # another prefix
    assert not row_fits(row, [1, 2], [3, 9, 2], [[4, 2]])  # another gold
    assert not row_fits(row, [1, 2], [3, 2], [[7, 2]])  # its rejected answer changed
    assert row_fits({**row, "sources": ["tn", "tn"]}, [1, 2], [3, 2], None)  # no data negatives: none to match
