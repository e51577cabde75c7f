"""Deterministic train/validation/test splits, and the one entry point :func:`load_splits`.

Each record id gets a key ``u = sha256(f"{split_seed}:{id}")`` read as a number in [0, 1). The same
config gives the same splits on any machine and Python version (no salted ``hash()``, no RNG state).

- Fractions (both sizes < 1): validation is ``u < validation_size``, test is the next ``test_size`` of
  [0, 1). A record's split depends on its own id only, so adding records never moves existing ones.
- Counts: validation is the ``validation_size`` records with the smallest ``u``, test the next
  ``test_size``. Adding records never moves an existing record *into* validation or test, and never
  out of train; at most as many existing evaluation records as were added move out at the boundary.

Splits are drawn over usable records (those that gave at least one example), so the evaluation sets have
exactly the requested size. With ``windows_per_document > 1`` a record's windows stay in one split and
validation/test keep only its first window (one independent item per document).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.examples import build_examples, describe_counts
from seqcpo.data.sources import read_records
from seqcpo.types import Example

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    """The three example lists, plus counts of what was read, skipped and truncated (``stats``)."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Splits(train={len(self.train)}, validation={len(self.validation)}, test={len(self.test)})"


def load_splits(cfg: DataConfig, tokenizer: Any, context_tokens: int | None = None) -> Splits:
    """Read ``cfg.dataset``, build (prefix, continuation) examples with ``tokenizer``, split them.

    Every ``Example.meta`` holds ``id``, ``prompt`` (the prefix as text), ``reference`` (the gold
    continuation as text, without EOS), ``category`` (or None) and ``source`` (the dataset name);
    continuation examples add ``window``; instruction examples add ``instruction``, ``context``,
    ``prefix_truncated`` and ``continuation_truncated``. ``context_tokens`` (the model's context) bounds
    every example by :func:`seqcpo.data.examples.context_limits`.
    """
    records, source = read_records(cfg)
    groups, stats = build_examples(records, cfg, tokenizer, source, context_tokens=context_tokens)
    ids = [g[0].meta["id"] for g in groups]
    assignment = assign_splits(ids, cfg.validation_size, cfg.test_size, cfg.split_seed, where=source)
    by_split: dict[str, list[list[Example]]] = {name: [] for name in SPLITS}
    for group, split in zip(groups, assignment):
        by_split[split].append(group)
    train_groups = by_split["train"]
    if cfg.max_examples is not None:
        train_groups = _cap(train_groups, cfg.max_examples, cfg.split_seed)
    splits = Splits(
        train=[ex for g in train_groups for ex in g],
        validation=[g[0] for g in by_split["validation"]],
        test=[g[0] for g in by_split["test"]],
        stats=dict(stats, source=source),
    )
    splits.stats.update(train=len(splits.train), validation=len(splits.validation), test=len(splits.test))
    notes = describe_counts(stats, cfg)
    logger.info(
        "data %s (task %s): %d records -> %d examples%s; train %d, validation %d, test %d",
        source,
        stats.get("task", cfg.task),
        stats["records"],
        stats["examples"],
        f" ({'; '.join(notes)})" if notes else "",
        len(splits.train),
        len(splits.validation),
        len(splits.test),
    )
    return splits


def split_key(seed: int, record_id: str) -> float:
    """A stable pseudo-random number in [0, 1) for (seed, id)."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    record_ids: Sequence[str], validation_size: float, test_size: float, seed: int = 0, where: str = "data"
) -> list[str]:
    """The split name ("train", "validation" or "test") of each id; see the module docstring for the rule."""
    n = len(record_ids)
    keys = [split_key(seed, str(i)) for i in record_ids]
    if uses_fractions(validation_size, test_size):  # each record on its own
        out = [fraction_split(u, validation_size, test_size) for u in keys]
    else:
        n_val, n_test = _count(validation_size, n), _count(test_size, n)
        if n_val + n_test >= n:
            raise DataError(
                f"{where}: validation_size + test_size = {n_val + n_test} records but only {n} usable records; "
                "lower validation_size/test_size (a fraction below 1 also works)"
            )
        order = sorted(range(n), key=lambda i: (keys[i], str(record_ids[i])))
        out = ["train"] * n
        for rank, i in enumerate(order[: n_val + n_test]):
            out[i] = "validation" if rank < n_val else "test"
    if "train" not in out:
        raise DataError(
            f"{where}: no record left for training with {n} usable records; lower validation_size/test_size"
        )
    return out


def uses_fractions(validation_size: float, test_size: float) -> bool:
    """True when both sizes are fractions (or 0): a record's split then follows from its own key alone."""
    return validation_size < 1 and test_size < 1


def fraction_split(u: float, validation_size: float, test_size: float) -> str:
    """The split of key ``u`` under fraction sizes: validation [0, v), test [v, v + t), train the rest."""
    lo, hi = float(validation_size), float(validation_size) + float(test_size)
    return "validation" if u < lo else "test" if u < hi else "train"


def export_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> str:
    """Write examples as JSON lines (id, prompt, reference, category, prefix_ids, continuation_ids).

    Atomic: a temporary file in the same folder is renamed over ``path``, so readers never see half a file.
    """
    from seqcpo.io import atomic_write_jsonl

    path = os.fspath(path)
    atomic_write_jsonl(
        path,
        (
            {
                "id": ex.meta.get("id"),
                "prompt": ex.meta.get("prompt"),
                "reference": ex.meta.get("reference"),
                "category": ex.meta.get("category"),
                "prefix_ids": list(ex.prefix_ids),
                "continuation_ids": list(ex.continuation_ids),
            }
            for ex in examples
        ),
    )
    return path


def _count(size: float, n: int) -> int:
    return int(size) if size >= 1 else int(round(size * n))


def _cap(groups: list[list[Example]], max_examples: int, seed: int) -> list[list[Example]]:
    """The first ``max_examples`` examples in hash order (a stable random subset), back in source order."""
    order = sorted(range(len(groups)), key=lambda i: split_key(seed + 1, str(groups[i][0].meta["id"])))
    kept: dict[int, list[Example]] = {}
    total = 0
    for i in order:
        if total >= max_examples:
            break
        kept[i] = groups[i][: max_examples - total]
        total += len(kept[i])
    return [kept[i] for i in sorted(kept)]
