"""One SGD step of each objective on four examples of very different lengths, as one process or under
``accelerate launch`` (gloo DDP): the parameter update, the logged metrics and every example's negatives.

Used by tests/test_split_invariance.py, in-process for 4x1 and 2x2 (batch x accumulation) and as
``accelerate launch --num_processes 2 tests/split_step.py MODEL_DIR OUT_DIR`` for 2 processes x 2; with a third
argument ``documents``, the document-rows step (:data:`DOCUMENT`, :func:`document_examples`) as 2 processes x 1
(tests/test_distributed.py).
"""

from __future__ import annotations

import os
import sys

import torch

#: objective name -> config overrides (cpo mixes TN with MN drawn from the reference's gold pass)
OBJECTIVES = {
    "mle": dict(objective="mle"),
    "pss": dict(objective="pss", pss_p_gold=0.5, pss_warmup_steps=0),
    "dpo": dict(objective="dpo", num_negatives=1, negatives="tn"),
    "cpo": dict(objective="cpo", num_negatives=2, negatives="tn:1,mn:1"),
}

#: (prefix length, continuation length): responses of 2 to 60 tokens, so a token mean per micro-batch would
#: weigh the short ones far more than the step's token mean does
LENGTHS = [(3, 2), (9, 60), (5, 5), (12, 33)]


def split_examples(vocab: int = 96, eos: int = 2):
    from seqcpo.types import Example

    g = torch.Generator().manual_seed(11)
    out = []
    for i, (p, c) in enumerate(LENGTHS):
        ids = torch.randint(3, vocab, (p + c - 1,), generator=g).tolist()
        out.append(Example(prefix_ids=ids[:p], continuation_ids=ids[p:] + [eos], meta={"id": f"ex{i}"}))
    return out


#: document rows (``task: document``), CPO at anchors with TN + MN negatives; see :func:`document_examples`
DOCUMENT = dict(task="document", max_length=64, continuation_tokens=4, anchors_per_row=3, objective="cpo",
                num_negatives=2, negatives="tn:1,mn:1", cpo_lambda=0.5)
#: the same with batch negatives (BN): the other anchors' golds of the micro-batch, so only splits with the same
#: micro-batches (2 processes x 1 and 1 process x 1 x accumulation 2) must agree
DOCUMENT_BN = {**DOCUMENT, "negatives": "tn:1,bn:1"}


def document_examples(vocab: int = 96):
    """Two document rows as the data stage hands them over (first token, the rest): 40 tokens with 3 anchors and
    6 tokens with 2 (``anchor_count(6, 4, 3)``), so each process's own token and anchor means differ from the step's."""
    from seqcpo.types import Example

    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (40, 6)]
    return [Example(prefix_ids=r[:1], continuation_ids=r[1:], meta={"id": f"doc{i}#{i}"}) for i, r in enumerate(rows)]


def one_step(model_dir: str, out_dir: str, name: str, batch: int, accumulation: int, examples=None, **over) -> dict:
    """Train one SGD step (lr 1, no clipping, no weight decay) of objective ``name`` on ``examples`` (default
    :func:`split_examples`); ``over`` overrides config fields (e.g. ``max_steps=-1`` for a whole epoch).

    Returns the flat parameter update, the log rows (``log`` the first) and ``{example id: negatives}`` made in
    the run (this process's examples)."""
    from transformers import AutoModelForCausalLM

    from seqcpo.batching import ExampleDataset
    from seqcpo.training.config import load_config
    from seqcpo.training.trainer import SeqCPOTrainer

    settings = dict(
        model_name_or_path=model_dir, dataset="unused", output_dir=os.path.join(out_dir, f"{name}-{batch}x{accumulation}"),
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=True, beta=1.0,
    )
    cfg = load_config(None, {**settings, **OBJECTIVES[name], **over})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer = SeqCPOTrainer(model, cfg, train_dataset=ExampleDataset(examples or split_examples()))
    made: dict[str, list] = {}
    if trainer.generator is not None:
        inner = trainer.make_negatives

        def recording(examples, *args, **kwargs):
            neg = inner(examples, *args, **kwargs)
            made.update({e.meta["id"]: [neg.ids[b], neg.valid[b]] for b, e in enumerate(examples)})
            return neg

        trainer.make_negatives = recording
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"update": after - before, "log": logs[0], "logs": logs, "negatives": made}


def main(model_dir: str, out_dir: str, case: str = "windows") -> None:
    """Every objective as 2 processes x batch 2 (``case`` windows), or the document-rows CPO steps (TN + MN, TN + BN) as 2
    processes x batch 1 (``case`` documents); each rank writes its results to ``out_dir/rank<r>.pt``."""
    if case == "documents":
        results = {name: one_step(model_dir, os.path.join(out_dir, name), "cpo", batch=1, accumulation=1,
                                  examples=document_examples(), **over)
                   for name, over in (("documents", DOCUMENT), ("documents_bn", DOCUMENT_BN))}
    else:
        results = {name: one_step(model_dir, out_dir, name, batch=2, accumulation=1) for name in OBJECTIVES}
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.save({"world_size": world, "results": results}, os.path.join(out_dir, f"rank{rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
