"""Equal to TRL where TRL overlaps: one standard-format preference batch, seqcpo's ``objective: dpo`` with
``negatives: data`` against TRL's ``DPOTrainer`` (sigmoid loss) on the same tiny model: the same tokens, the same
loss and the same rewards within 1e-5. Skipped when TRL (the ``test`` extra) is not installed."""

import pytest
import torch

trl = pytest.importorskip("trl")

from conftest import make_tiny_llama, make_toy_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "The quick", "chosen": " brown fox jumps", "rejected": " lazy dog"},
    {"prompt": "Paris is", "chosen": " the capital of France", "rejected": " a bread"},
    {"prompt": "Machine learning", "chosen": " models are trained on data", "rejected": " is salt"},
    {"prompt": "Wikipedia is", "chosen": " a free online encyclopedia", "rejected": " the river market"},
]
BETA = 0.1


def test_dpo_with_data_negatives_equals_trl(tmp_path):
    from datasets import Dataset

    from seqcpo.batching import ExampleDataset, collate_examples
    from seqcpo.data import DataConfig
    from seqcpo.data.examples import record_examples
    from seqcpo.data.sources import Record
    from seqcpo.training.config import load_config
    from seqcpo.training.trainer import SeqCPOTrainer

    torch.manual_seed(0)
    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ref_dir = tmp_path / "ref"  # a reference other than the policy: the rewards are not all zero
    make_tiny_llama(seed=1, vocab_size=len(tok)).save_pretrained(ref_dir)
    from transformers import AutoModelForCausalLM

    # TRL: its own tokenization, batch, loss and reward metrics
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, per_device_train_batch_size=len(ROWS),
                         report_to="none", use_cpu=True, loss_type=["sigmoid"], max_length=None,
                         bf16=False)  # TRL's default autocasts its reference to bf16 on CPU
    trl_trainer = trl.DPOTrainer(model=str(model_dir), ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    trl_trainer.model.eval()
    rows = [trl_trainer.train_dataset[i] for i in range(len(ROWS))]
    batch = trl_trainer._prepare_inputs(next(iter(trl_trainer.get_train_dataloader())))
    with torch.no_grad():
        trl_loss = trl_trainer.compute_loss(trl_trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trl_trainer._metrics["eval"].items()}

    # seqcpo: the same rows read as preference data, DPO with the row's rejected answer as the negative
    pairs, _ = record_examples([Record(str(i), r, f"row {i}") for i, r in enumerate(ROWS)], DataConfig(), tok, "rows")
    examples = [g[0] for _, g in pairs]
    by_prompt = {tuple(r["prompt_ids"]): r for r in rows}
    for ex in examples:  # the same tokens as TRL's
        r = by_prompt[tuple(ex.prefix_ids)]
        assert ex.continuation_ids == r["chosen_ids"] and ex.rejected_ids == [r["rejected_ids"]]
    cfg = load_config(None, dict(model_name_or_path=str(model_dir), dataset="unused", output_dir=str(tmp_path / "s"),
                                 objective="dpo", num_negatives=1, negatives="data", beta=BETA, mle_weight=0.0,
                                 use_cpu=True, report_to="none", per_device_train_batch_size=len(ROWS)))
    ours = SeqCPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), cfg,
                         reference_model=AutoModelForCausalLM.from_pretrained(ref_dir), train_dataset=ExampleDataset(examples),
                         processing_class=tok)
    ours.model.eval()
    with torch.no_grad():
        loss = ours.compute_loss(ours.model, collate_examples([ExampleDataset(examples)[i] for i in range(len(ROWS))]))
    _, (sums, counts) = ours.metrics.pooled("eval", "cpu")
    pooled = {n: t / c for n, t, c in zip(ours.metrics.names, sums.tolist(), counts.tolist()) if c}
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert pooled[name] == pytest.approx(metrics[name], abs=1e-5), name
