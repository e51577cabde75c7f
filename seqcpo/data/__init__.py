"""Data: raw records -> (prefix, continuation) :class:`~seqcpo.types.Example` -> train/validation/test.

    from seqcpo.data import DataConfig, load_splits
    splits = load_splits(DataConfig(dataset="wiki", task="continuation"), tokenizer)

Each arrow is one function: :func:`read_records` (sources.py), :func:`build_examples` (examples.py),
:func:`assign_splits` (splits.py); :func:`load_splits` composes them. ``streaming: true`` reads the same
way one batch at a time (:mod:`seqcpo.data.streaming`, imported on demand: it needs torch).
"""

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.examples import (
    PLAIN_TEMPLATE,
    build_examples,
    context_limits,
    leading_special_ids,
    model_context_tokens,
    render_prompt,
)
from seqcpo.data.sources import Record, read_records, wiki_path
from seqcpo.data.splits import Splits, assign_splits, export_jsonl, load_splits, split_key

__all__ = [
    "DataConfig",
    "DataError",
    "PLAIN_TEMPLATE",
    "Record",
    "Splits",
    "assign_splits",
    "build_examples",
    "context_limits",
    "model_context_tokens",
    "export_jsonl",
    "leading_special_ids",
    "load_splits",
    "read_records",
    "render_prompt",
    "split_key",
    "wiki_path",
]
