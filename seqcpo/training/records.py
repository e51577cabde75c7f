"""The TRL user's path: a ``datasets.Dataset`` of raw records handed to the trainer.

``SeqCPOTrainer(model=..., args=SeqCPOConfig(...), train_dataset=Dataset, processing_class=tokenizer)``: the
records are in any format ``seqcpo train`` reads (a ``text`` field for ``task: continuation``;
``instruction`` / ``context`` / ``response`` for ``task: instruction``; field names mapped by the config's
``*_field`` options), and become (prefix, continuation) examples by the same code as ``seqcpo train``
(:func:`seqcpo.data.examples.record_examples`, docs/method.md "Tasks"), through ``Dataset.map`` (batched,
cached by ``datasets`` under the dataset's fingerprint and the function's hash, which covers the tokenizer and
the data settings; lazy on an ``IterableDataset``, whose rows are split over the processes). Items already
tokenized (``prefix_ids``, ``continuation_ids``, ``id``) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from seqcpo.data.config import DataConfig
from seqcpo.data.examples import model_context_tokens, record_examples
from seqcpo.data.sources import Record, record_id
from seqcpo.hf_model import unwrap_model

#: the columns of a tokenized item (what :func:`seqcpo.batching.collate_examples` reads)
ITEM_COLUMNS = ("prefix_ids", "continuation_ids", "id")


def example_items(dataset, cfg, tokenizer, model, name: str = "train_dataset"):
    """``dataset`` as items the collator reads: raw records of a ``datasets.Dataset`` / ``IterableDataset`` are
    tokenized and windowed by ``cfg``'s data settings; anything else (an ``ExampleDataset``, a streamed corpus,
    tokenized rows) is returned as it is.

    Raises ValueError naming ``name`` when the records need a tokenizer and none was given, or when fixed
    negatives (``negatives_path``) are asked for with raw records (they are attached by example id by
    ``seqcpo train``; make the examples with :func:`seqcpo.data.load_splits` and an ``ExampleDataset``).
    """
    columns = _columns(dataset)
    if columns is None or "prefix_ids" in columns:
        return dataset
    if tokenizer is None:
        raise ValueError(f"{name} holds raw records ({', '.join(columns)}): pass processing_class=tokenizer to "
                         "tokenize them")
    if getattr(cfg, "negatives_path", None) and cfg.uses_negatives:
        raise ValueError(f"{name}: negatives_path (fixed negatives) needs the examples seqcpo made them for; "
                         "train with `seqcpo train`, or pass ExampleDataset(examples, rows)")
    context = model_context_tokens(getattr(unwrap_model(model), "config", None))
    to_items = RecordsToItems(cfg.data_config(), tokenizer, context, name)
    if _is_map_style(dataset):
        return dataset.map(to_items, batched=True, with_indices=True, remove_columns=list(columns),
                           desc=f"{name}: records -> examples")
    from datasets.distributed import split_dataset_by_node

    items = dataset.map(to_items, batched=True, with_indices=True, remove_columns=list(columns))
    return ProcessShard(split_dataset_by_node(items, rank=cfg.process_index, world_size=cfg.world_size))


class ProcessShard(torch.utils.data.IterableDataset):
    """This process's share of an ``IterableDataset`` of items, read in this process: the trainer hands it to a
    plain DataLoader (``is_process_shard``), as a streamed corpus, since accelerate's dispatching of iterable
    datasets needs tensor batches and ours are :class:`~seqcpo.types.Example` lists."""

    is_process_shard = True

    def __init__(self, items):
        super().__init__()
        self.items = items

    def __iter__(self):
        return iter(self.items)


class RecordsToItems:
    """A batched ``datasets.map`` function: raw rows -> tokenized items (one row per example; a continuation
    document gives up to ``windows_per_document`` rows). A record's id is its ``id_field`` value, else its row
    index; a malformed record raises :class:`~seqcpo.data.DataError` naming ``<name> row <i>`` and the field
    (or is skipped with ``skip_bad_records``)."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, context_tokens: int | None, name: str):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        self.name = name

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        records = []
        for i, index in enumerate(indices):
            fields = {k: v[i] for k, v in batch.items()}
            where = f"{self.name} row {index}"
            rid = record_id(fields.get(self.cfg.id_field), self.cfg.id_field, str(index), where)
            records.append(Record(id=rid, fields=fields, where=where, index=index))
        pairs, _ = record_examples(records, self.cfg, self.tokenizer, self.name, context_tokens=self.context_tokens,
                                   decode=False)
        examples = [e for _, group in pairs for e in group]
        return {
            "prefix_ids": [list(e.prefix_ids) for e in examples],
            "continuation_ids": [list(e.continuation_ids) for e in examples],
            "id": [str(e.meta["id"]) for e in examples],
        }


def _is_map_style(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _columns(dataset) -> list[str] | None:
    """The columns of a ``datasets`` dataset (an ``IterableDataset`` without known features: its first row's),
    or None for any other dataset."""
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return None
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first is not None else None
