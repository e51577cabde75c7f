"""The training system on a tiny random-init Llama saved to disk: steps that learn, resume, offline
negatives, checkpoints that plain transformers reloads, and config errors that name the field."""

import json
import os
import shutil

import pytest
import torch

from conftest import make_tiny_llama, make_toy_tokenizer
from seqcpo.training.config import ConfigError, load_config, parse_overrides


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread", "books", "fog"]
    data = root / "train.jsonl"
    with open(data, "w") as fh:
        for i in range(60):
            a, b = words[i % 10], words[(3 * i + 1) % 10]
            rec = {
                "id": f"r{i}",
                "instruction": f"Describe the {a} near the {b}.",
                "context": "",
                "response": f"The {a} is by the {b} and the {words[(i + 5) % 10]} is near.",
            }
            fh.write(json.dumps(rec) + "\n")
    return {"model": str(model_dir), "data": str(data), "root": root}


def _cfg(assets, tmp_path, **over):
    base = dict(
        model_name_or_path=assets["model"],
        dataset=assets["data"],
        task="instruction",
        prompt_template="plain",
        validation_size=4,
        test_size=4,
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        objective="cpo",
        num_negatives=2,
        negatives="tn:1,bn:1",
        beta=1.0,
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    base.update(over)
    return load_config(None, base)


def _losses(history):
    return [h["loss"] for h in history if "loss" in h and "eval_loss" not in h]


def test_cpo_steps_change_parameters_and_lower_loss_on_a_fixed_batch(assets, tmp_path):
    from seqcpo.data import load_splits
    from seqcpo.models import load_model, load_tokenizer
    from seqcpo.batching import ExampleDataset, candidate_batch
    from seqcpo.training.trainer import SeqCPOTrainer

    cfg = _cfg(assets, tmp_path, max_steps=8)
    tok = load_tokenizer(cfg.model_name_or_path)
    model = load_model(cfg.model_name_or_path)
    splits = load_splits(cfg.data_config(), tok)
    fixed = splits.train[:4] * 8  # one batch, seen every step: the loss on it must fall
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SeqCPOTrainer(model, cfg, train_dataset=ExampleDataset(fixed), processing_class=tok)

    negs = trainer.make_negatives(fixed[:4])
    batch = candidate_batch(fixed[:4], negs)
    from seqcpo.logps import sequence_logps
    from seqcpo.losses import cpo_loss, mle_loss, preference_metrics

    def fixed_batch_loss_and_metrics():
        with torch.no_grad():
            out = sequence_logps(model, batch)
            loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + cpo_loss(out.logps, ref, cfg.beta)
            return loss.item(), preference_metrics(out.logps, ref, cfg.beta)

    with torch.no_grad():
        ref = trainer.reference.logps(batch)
    loss0, m0 = fixed_batch_loss_and_metrics()
    trainer.train()
    loss1, m1 = fixed_batch_loss_and_metrics()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), "every parameter should move under full fine-tuning"
    assert loss1 < loss0 - 0.1, (loss0, loss1)
    assert m1["rewards/margins"] > m0["rewards/margins"] + 1e-3, (m0, m1)
    assert m1["logps/chosen"] > m0["logps/chosen"]
    assert len(_losses(trainer.state.log_history)) == 8


def test_resume_reproduces_the_uninterrupted_losses(assets, tmp_path):
    from seqcpo.training.run import train

    full = train(_cfg(assets, tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3))
    full_losses = _losses(full["trainer"].state.log_history)
    # an interrupted run: the same config stopped after 3 steps, then resumed from its checkpoint
    out_b = tmp_path / "b"
    train(_cfg(assets, out_b, max_steps=6, save_strategy="steps", save_steps=3, output_dir=str(out_b / "run")))
    ckpt3 = out_b / "run" / "checkpoint-3"
    assert ckpt3.is_dir()
    # remove what came after step 3, as if the run had died there
    import shutil

    shutil.rmtree(out_b / "run" / "checkpoint-6")
    resumed = train(
        _cfg(assets, out_b, max_steps=6, save_strategy="steps", save_steps=3, output_dir=str(out_b / "run"),
             resume_from_checkpoint=str(ckpt3))
    )
    resumed_losses = _losses(resumed["trainer"].state.log_history)
    assert len(full_losses) == 6
    assert resumed_losses[-3:] == pytest.approx(full_losses[-3:], rel=1e-5, abs=1e-6)
    # the run's mean loss is the whole run's, not the 3 steps after the resume; the gold watch's deltas are
    # measured from the run's start (the first gold_logp_window logged steps), not from the resume
    assert resumed["train_loss"] == full["train_loss"]
    info = json.load(open(out_b / "run" / "run_info.json"))
    assert info["train_loss"] == full["train_loss"] and info["steps"] == 6
    delta = [r.get("logps/chosen_delta") for r in full["trainer"].state.log_history if "loss" in r]
    assert delta[-1] is not None
    assert [r.get("logps/chosen_delta") for r in resumed["trainer"].state.log_history if "loss" in r] == delta


def test_checkpoint_reloads_with_plain_transformers(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqcpo.training.run import train

    out = train(_cfg(assets, tmp_path, max_steps=2))
    final = out["final_checkpoint"]
    assert os.path.exists(os.path.join(final, "model.safetensors"))
    card = open(os.path.join(final, "README.md")).read()
    assert "cpo" in card and "tn:1,bn:1" in card
    cfg_dump = open(os.path.join(tmp_path / "run", "seqcpo_config.yaml")).read()
    assert "beta: 1.0" in cfg_dump and "hub_token" not in cfg_dump
    assert "max_prefix_tokens: 256" in cfg_dump and "an_max_new_tokens" in cfg_dump  # counts are not secrets
    from seqcpo.training.separation import separation_onset

    info = json.load(open(tmp_path / "run" / "run_info.json"))
    history = json.load(open(tmp_path / "run" / "log_history.json"))
    assert "separated_at_step" in info and info["separated_at_step"] == separation_onset(history).step
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("### Instruction:\nDescribe the river", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    trained = out["trainer"].model.state_dict()
    for n, p in model.state_dict().items():
        assert torch.equal(p, trained[n]), n


def test_offline_negatives_resume_and_train_with_precomputed_reference(assets, tmp_path):
    from seqcpo.training.offline_reader import read_offline_negatives
    from seqcpo.training.run import make_negatives, train

    cfg = _cfg(assets, tmp_path, negatives="tn:1,mn:1")
    out_dir = str(tmp_path / "neg")
    info = make_negatives(cfg, out_dir, shard_size=16)
    shards = sorted(f for f in os.listdir(out_dir) if f.startswith("shard-"))
    assert len(shards) == info["shards"] > 1
    first = open(os.path.join(out_dir, shards[0]), "rb").read()
    # interrupt: lose the last shard and the completion flag, then resume
    os.remove(os.path.join(out_dir, shards[-1]))
    man = json.load(open(os.path.join(out_dir, "manifest.json")))
    man["complete"] = False
    json.dump(man, open(os.path.join(out_dir, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="incomplete"):
        read_offline_negatives(out_dir, cfg)
    mtime = os.path.getmtime(os.path.join(out_dir, shards[0]))
    make_negatives(cfg, out_dir, shard_size=16)
    assert os.path.getmtime(os.path.join(out_dir, shards[0])) == mtime, "finished shards are not redone"
    assert open(os.path.join(out_dir, shards[0]), "rb").read() == first
    rows, meta = read_offline_negatives(out_dir, cfg)
    row = next(iter(rows.values()))
    assert len(row["negatives"]) == 2 and len(row["ref_logps"]) == 3
    # the stored reference log-probs are the starting model's
    out = train(_cfg(assets, tmp_path / "t", negatives="tn:1,mn:1", negatives_path=out_dir, max_steps=2))
    assert out["trainer"].reference.name == "precomputed"
    assert out["steps"] == 2
    # a training run whose data settings differ from the folder's: refused, its reference log-probs would not match
    with pytest.raises(ValueError, match=r"\(data.max_prefix_tokens: 256 in the folder, 64 now\)"):
        read_offline_negatives(out_dir, _cfg(assets, tmp_path, negatives="tn:1,mn:1", max_prefix_tokens=64))
    # other settings: refused, not overwritten
    with pytest.raises(ValueError, match="other settings"):
        make_negatives(_cfg(assets, tmp_path, negatives="tn:2"), out_dir, shard_size=16)


def test_evaluation_negatives_are_fixed_and_leave_training_seeds_alone(assets, tmp_path):
    """Eval draws its own seeds, the same at every evaluation; training seeds do not move when eval runs."""
    from seqcpo.training.run import train

    quiet = train(_cfg(assets, tmp_path / "q", max_steps=4))
    evald = train(_cfg(assets, tmp_path / "e", max_steps=4, eval_strategy="steps", eval_steps=2,
                       per_device_eval_batch_size=4))
    assert _losses(evald["trainer"].state.log_history) == pytest.approx(_losses(quiet["trainer"].state.log_history))
    tr = evald["trainer"]
    ex = tr.eval_dataset.examples[:4]
    first = tr.make_negatives(ex, training=False).ids
    tr.state.global_step += 7
    tr._epoch += 1
    assert tr.make_negatives(ex, training=False).ids == first


def test_mle_dpo_ranked_and_lora_run(assets, tmp_path):
    from seqcpo.training.run import train

    for i, over in enumerate(
        [
            dict(objective="mle"),
            dict(objective="dpo", num_negatives=1, negatives="tn"),
            dict(objective="cpo_ranked", negatives="tn:1,mn:1"),
            dict(negatives="an:1,tn:1", an_max_new_tokens=6),
            dict(negatives="an:1,mn:1", negatives_model="policy", negatives_refresh_steps=2, an_max_new_tokens=6),
            dict(lora=True, lora_r=4, learning_rate=1e-2, gradient_checkpointing=True, negatives="tn:1,mn:1"),
        ]
    ):
        out = train(_cfg(assets, tmp_path / str(i), max_steps=2, **over))
        assert out["steps"] == 2
        losses = _losses(out["trainer"].state.log_history)
        assert all(l == l for l in losses)  # no NaN
    assert out["trainer"].reference.name == "adapter_disabled"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out["final_checkpoint"])
    assert type(merged).__name__ == "LlamaForCausalLM"


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("beta: 0.3\nnum_negatives: 2\nnegatives: tn\nlearning_rate: 1.0e-4\nreport_to: none\n")
    cfg = load_config(p, parse_overrides(["--beta", "0.5", "--lora", "--max_steps=7", "--mn_c", "0.2"]))
    assert cfg.beta == 0.5 and cfg.num_negatives == 2 and cfg.lora is True and cfg.max_steps == 7
    assert cfg.learning_rate == 1e-4 and cfg.mn_c == 0.2


@pytest.mark.parametrize(
    "text, over, match",
    [
        ("betta: 0.1\n", {}, r"c.yaml: unknown field 'betta' \(did you mean 'beta'\?\)"),
        ("beta: [1, 2]\n", {}, r"c.yaml: field 'beta'"),
        ("beta: 0.1\n  bad: indent\n", {}, r"c.yaml line 2: not valid YAML"),
        ("objective: ppo\n", {}, r"objective='ppo': choose one of"),
        ("", {"num_negatives": "four"}, r"command line: field 'num_negatives'"),
        ("objective: dpo\n", {}, r"num_negatives=4: objective dpo uses exactly one negative"),
        ("reference: precomputed\n", {}, r"reference='precomputed'.*seqcpo negatives"),
        ("negatives: bn:4\nper_device_train_batch_size: 4\n", {}, r"per_device_train_batch_size=4: 4 batch negatives"),
        ("negatives: tn:2,bn:1\n", {}, r"negatives='tn:2,bn:1': the counts .* sum to 3, but num_negatives \(K\) = 4"),
        ("negatives_path: /x\neval_strategy: steps\n", {}, r"eval_strategy='steps': fixed negatives"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, over, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p, over)


def test_cli_reports_bad_data_with_file_and_line(assets, tmp_path, capsys):
    from seqcpo.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": \n')
    rc = main(["train", "--model_name_or_path", assets["model"], "--dataset", str(bad), "--task", "instruction",
               "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--use_cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl line 2" in err and "JSON" in err
    rc = main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert rc == 2 and "missing.yaml: no such config file" in capsys.readouterr().err
    rc = main(["train", "--model_name_or_path", str(tmp_path / "no-such-model"), "--report_to", "none",
               "--output_dir", str(tmp_path / "o"), "--use_cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-model: no such model folder" in err and "Traceback" not in err


def test_config_reference_is_current():
    from pathlib import Path

    from seqcpo.training.config_reference import config_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert doc.read_text() == config_reference(), "regenerate: python -m seqcpo.training.config_reference > docs/CONFIG.md"


def test_shipped_training_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = [p for p in root.glob("*.yaml") if "grid" not in p.name]
    assert paths
    for p in paths:
        first = p.read_text().splitlines()[0]
        assert first.startswith("# seqcpo "), f"{p.name} must start with the command that runs it"
        load_config(p, {"output_dir": "/tmp/seqcpo-config-check", "report_to": "none", "bf16": False, "use_cpu": True})


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_flag_trains_to_the_eager_losses(assets, tmp_path):
    """``torch_compile: true`` (TrainingArguments' flag) compiles the policy's forward and backward; the
    prefix-shared masks, the chunked head and the losses go through unchanged, so the losses are eager's."""
    from seqcpo.training.run import train

    eager = train(_cfg(assets, tmp_path / "e", max_steps=2))
    compiled = train(_cfg(assets, tmp_path / "c", max_steps=2, torch_compile=True))
    model = compiled["trainer"].model_wrapped
    assert hasattr(model, "_orig_mod") or hasattr(getattr(model, "module", None), "_orig_mod"), type(model)
    assert _losses(compiled["trainer"].state.log_history) == pytest.approx(
        _losses(eager["trainer"].state.log_history), rel=1e-4)


def _raw_records(task: str) -> list[dict]:
    words = ["river", "market", "bridge", "city", "wool", "salt", "square", "bread", "books", "fog"]
    if task == "instruction":
        return [{"id": f"r{i}", "instruction": f"Describe the {words[i % 10]}.", "context": "",
                 "response": f"The {words[i % 10]} is near the {words[(3 * i + 1) % 10]}."} for i in range(12)]
    # continuation: documents under another field name (mapped by text_field), no id field (row index)
    return [{"body": " ".join(words[(i + j) % 10] for j in range(40))} for i in range(6)]


@pytest.mark.parametrize("task,iterable", [("instruction", False), ("continuation", False), ("instruction", True)])
def test_trl_path_trains_on_a_datasets_dataset_of_raw_records(assets, tmp_path, task, iterable):
    """SeqCPOTrainer(model=..., args=SeqCPOConfig(...), train_dataset=datasets.Dataset, processing_class=tok):
    the raw records become the examples seqcpo's own pipeline makes, and training moves every parameter."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqcpo import SeqCPOConfig, SeqCPOTrainer
    from seqcpo.data import DataConfig, build_examples
    from seqcpo.data.sources import Record

    data = dict(task="instruction", prompt_template="plain") if task == "instruction" else dict(
        task="continuation", text_field="body", prefix_tokens=8, continuation_tokens=8, windows_per_document=2)
    records = _raw_records(task)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    args = SeqCPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-3,
        objective="cpo", num_negatives=2, negatives="tn:1,bn:1", beta=1.0, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0, **data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = datasets.Dataset.from_list(records)
    trainer = SeqCPOTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=dataset.to_iterable_dataset() if iterable else dataset)

    # the same examples as seqcpo train's pipeline, in order
    cfg = DataConfig(**{k: getattr(args, k) for k in DataConfig.__dataclass_fields__})
    ids = [r.get("id", str(i)) for i, r in enumerate(records)]
    groups, _ = build_examples([Record(id=i, fields=r, where="x") for i, r in zip(ids, records)], cfg, tok, "x")
    want = [(e.prefix_ids, e.continuation_ids, e.meta["id"]) for g in groups for e in g]
    got = [(row["prefix_ids"], row["continuation_ids"], row["id"]) for row in trainer.train_dataset]
    assert got == want and len(got) == 12  # 12 records; 6 documents x 2 windows

    trainer.train()
    losses = _losses(trainer.state.log_history)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_trl_path_names_a_bad_record(assets, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqcpo import SeqCPOConfig, SeqCPOTrainer
    from seqcpo.data import DataError

    tok = AutoTokenizer.from_pretrained(assets["model"])
    args = SeqCPOConfig(output_dir=str(tmp_path / "bad"), task="instruction", report_to="none", use_cpu=True)
    rows = _raw_records("instruction")
    rows[2] = {"id": "r2", "instruction": "Say it.", "context": "", "response": None}
    with pytest.raises(DataError, match=r'train_dataset row 2: null field "response".*response_field'):
        SeqCPOTrainer(model=AutoModelForCausalLM.from_pretrained(assets["model"]), args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    with pytest.raises(ValueError, match="processing_class"):
        SeqCPOTrainer(model=AutoModelForCausalLM.from_pretrained(assets["model"]), args=args,
                      train_dataset=datasets.Dataset.from_list(rows))


def test_dry_run_prints_the_plan_of_a_gpu_config_without_training(assets, tmp_path, capsys):
    """--dry-run with bf16 (a GPU setting) on this CPU machine: the plan, the model's exact parameter count from
    its config, the split sizes, the first batch with its negatives, a memory estimate; nothing written."""
    from transformers import AutoModelForCausalLM

    from seqcpo.cli import main

    out_dir = tmp_path / "never"
    rc = main(["train", "--dry-run", "--model_name_or_path", assets["model"], "--dataset", assets["data"],
               "--task", "instruction", "--prompt_template", "plain", "--validation_size", "4", "--test_size", "4",
               "--output_dir", str(out_dir), "--bf16", "true", "--per_device_train_batch_size", "4",
               "--max_steps", "5", "--objective", "cpo", "--negatives", "tn:1,an:1", "--num_negatives", "2",
               "--report_to", "none"])
    text = capsys.readouterr().out
    assert rc == 0, text
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(assets["model"]).parameters())
    assert f"{n_params:,} parameters" in text
    assert "52 train / 4 validation / 4 test examples" in text  # 60 records
    assert "5 optimizer steps x 4 examples" in text and "= 20 examples" in text
    assert "tn x1 (made), an x1 (longest length)" in text
    assert "memory" in text and "reference" in text and "autocast: True" in text
    if not torch.cuda.is_available():
        assert "device check skipped" in text
    assert not out_dir.exists()


def test_model_card_names_the_upstream_hub_model_and_links_no_missing_page(assets, tmp_path):
    from seqcpo.training.model_card import base_model_id, write_model_card

    assert base_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF's upstream
    assert base_model_id("openlm-research/open_llama_3b") == "openlm-research/open_llama_3b"
    assert base_model_id(str(tmp_path / "no-such-folder")) is None and base_model_id("a/b/c") is None
    # a local folder: the Hub id in its config.json, else nothing; a seqcpo checkpoint: its own starting model
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "config.json").write_text(json.dumps({"_name_or_path": "gpt2-org/gpt2-xl"}))
    assert base_model_id(str(downloaded)) == "gpt2-org/gpt2-xl"
    assert base_model_id(assets["model"]) is None  # saved from a random init: no Hub id
    ckpt = tmp_path / "run" / "final"
    ckpt.mkdir(parents=True)
    (ckpt / "seqcpo_config.yaml").write_text(f"model_name_or_path: {downloaded}\n")
    assert base_model_id(str(ckpt)) == "gpt2-org/gpt2-xl"

    for start, line in ((str(ckpt), "base_model: gpt2-org/gpt2-xl"), (assets["model"], None)):
        card = open(write_model_card(str(tmp_path), _cfg(assets, tmp_path, model_name_or_path=start))).read()
        assert "pypi.org" not in card and "](http" not in card
        assert (line in card.splitlines()) if line else "base_model" not in card


def test_report_to_a_missing_tracker_is_refused_in_one_line_naming_the_extra(assets, tmp_path, capsys):
    import importlib.util

    from seqcpo.cli import main

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"report_to='wandb'.*pip install 'seqcpo\[wandb\]'"):
        _cfg(assets, tmp_path, report_to="wandb")
    rc = main(["train", "--model_name_or_path", assets["model"], "--output_dir", str(tmp_path / "w"),
               "--report_to", "wandb"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "seqcpo[wandb]" in err


def test_the_scoring_step_reuses_the_gold_pass_by_one_rule_and_makes_the_same_numbers():
    """mn_source: the reference's gold pass feeds MN when the layout may run two passes and the reference is a
    model; score_examples then gives the same negatives and reference log-probs as MN's own pass."""
    from conftest import TINY_EOS, TINY_PAD, make_tiny_llama

    from seqcpo.negatives import build_negative_generator
    from seqcpo.reference import FrozenCopyReference, PrecomputedReference
    from seqcpo.seeding import example_generators
    from seqcpo.training.scoring import mn_source, score_examples
    from seqcpo.types import Example

    model = make_tiny_llama(3).eval()
    mn = build_negative_generator([("tn", 1), ("mn", 1)], 2, model=model, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)
    tn = build_negative_generator("tn", 1, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD)
    ref = FrozenCopyReference(model, copy_model=False, layout="shared", pad_token_id=TINY_PAD)
    assert mn_source(mn, layout="auto", reference=ref) == "reference"
    assert mn_source(mn, layout="two_pass", reference=ref) == "reference"
    assert mn_source(mn, layout="shared", reference=ref) is None  # a one-pass layout forced
    assert mn_source(tn, layout="auto", reference=ref) is None  # nothing draws from gold logits
    assert mn_source(mn, layout="auto", reference=PrecomputedReference()) is None  # no reference model
    assert mn_source(mn, layout="auto", reference=ref, head_in_forward=True) is None  # FSDP / ZeRO-3
    assert mn_source(mn, layout="auto", negatives_model="policy", policy_two_pass=True) == "policy"
    assert mn_source(mn, layout="auto", negatives_model="policy", policy_two_pass=False) is None

    g = torch.Generator().manual_seed(5)
    examples = [Example(torch.randint(3, 96, (4 + i,), generator=g).tolist(),
                        torch.randint(3, 96, (6,), generator=g).tolist() + [TINY_EOS], {"id": f"e{i}"}) for i in range(3)]

    def make(exs, gold_logits=None):
        rngs = example_generators(0, [e.meta["id"] for e in exs], 0, "negatives")
        return mn(exs, 2, rngs, **({"gold_logits": gold_logits} if gold_logits is not None else {}))

    with torch.no_grad():
        fused = score_examples(examples, make, ref, source="reference")
        alone = score_examples(examples, make, ref, source=None)
    assert fused.negatives.ids == alone.negatives.ids
    assert fused.batch.candidate_ids == alone.batch.candidate_ids
    torch.testing.assert_close(fused.ref_logps, alone.ref_logps, rtol=1e-4, atol=1e-4)
    assert fused.ref_logps.shape == (3, 3) and fused.policy is None
    # fixed rows read from disk: their negatives and stored reference log-probs, no generator called
    rows = [{"negatives": n, "valid": v, "scores": None, "sources": s, "ref_logps": r.tolist()} for n, v, s, r in
            zip(alone.negatives.ids, alone.negatives.valid, alone.negatives.sources, alone.ref_logps)]
    fixed = score_examples(examples, None, PrecomputedReference(), offline_rows=rows)
    assert fixed.batch.candidate_ids == alone.batch.candidate_ids
    torch.testing.assert_close(fixed.ref_logps, alone.ref_logps)


def test_negatives_cli_takes_the_training_config_and_its_reference_dtype(assets, tmp_path, capsys):
    """Defects (campaign 2): `seqcpo negatives` refused the config that trains on them (`reference: precomputed`,
    "make them with `seqcpo negatives`"), and ignored `reference_dtype` (float32 log-probs) while repeating it in
    the training command it printed."""
    import yaml

    from seqcpo.cli import main
    from seqcpo.training.offline_reader import read_offline_negatives

    over = dict(model_name_or_path=assets["model"], dataset=assets["data"], task="instruction",
                prompt_template="plain", validation_size=4, test_size=4, per_device_train_batch_size=4,
                objective="cpo", num_negatives=2, negatives="tn:1,mn:1", seed=0, use_cpu=True, report_to="none",
                reference="precomputed", max_steps=2, save_strategy="no", disable_tqdm=True,
                output_dir=str(tmp_path / "run"))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(over))
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"neg-{dtype}"
        assert main(["negatives", "--config", str(config), "--out", str(out), "--reference_dtype", dtype]) == 0
        printed = capsys.readouterr().out
        assert f"--reference_dtype {dtype} --negatives_path {out}" in printed
        cfg = load_config(str(config), {"reference_dtype": dtype, "negatives_path": str(out)})
        rows[dtype], meta = read_offline_negatives(str(out), cfg)
    some = sorted(rows["float32"])[0]
    assert rows["float32"][some]["ref_logps"] != rows["bfloat16"][some]["ref_logps"]  # scored at the asked dtype
    # the printed command trains on them with the precomputed reference
    cmd = printed.split("Train on them with: ", 1)[1].split()
    assert main(cmd[1:]) == 0
