"""Corpus-scale data (``streaming: true``): records read lazily, tokenized on the fly, never all held.

The data flow is the in-memory one (:func:`seqcpo.data.load_splits`), one read batch at a time:

    stream_row_batches (row_batches.py) -> this process's records -> split by record id -> record_examples
    (examples.py) -> items {"prefix_ids", "continuation_ids", "id", "epoch"}

1. **Splits: the same rule as in memory** (:mod:`seqcpo.data.splits`), so a record lands in the same split
   streamed or not. Fractions: a record's split follows from its own key ``split_key(split_seed, id)``. Counts:
   validation and test are the usable records with the smallest keys; :func:`plan_splits` finds them in one pass
   that reads the id column alone and tokenizes only the records whose key could still make the cut (a bounded
   heap: about ``k ln(n / k)`` records for k evaluation records among n), then training skips them by id.
   Validation and test are held in memory, capped by ``max_eval_examples``.
2. **Shards**: process ``r`` of ``w`` takes the training records whose 0-based index ``t`` among the training
   records (in source order; validation and test records are known by their id alone) has ``t % w == r``:
   disjoint, and together they cover the corpus. Every process parses the whole stream and hashes every id
   (cheap) but converts and tokenizes its own records only. An optimizer step of ``w`` processes therefore
   covers the same training records as one process with a ``w`` times larger batch, exactly when every training
   record gives one example (no malformed or too-short record, ``windows_per_document: 1``); otherwise a process
   that skips a record takes its next one, and the step's records differ slightly between world sizes.
3. **Epochs**: the stream never ends; after the last record the next pass starts (``epoch`` + 1), so every
   process yields batches in lockstep and ``max_steps`` ends the run (it is required).
4. **Resume without replay**: :class:`seqcpo.data.stream_resume.StreamPositionCallback` stores, in the checkpoint's ``trainer_state.json``,
   each process's position after the examples its optimizer steps consumed (pass, record index, window). A
   resumed run starts reading at that record: the position carries the ``datasets`` reader state of the record's
   read batch, so whole data files (shards) before it are not read again, and the records before it in its file
   are passed over as Arrow tables, never converted or tokenized. The Trainer's own batch skipping is off
   (``ignore_data_skip``). Resuming with another number of processes is refused (the shards would differ).

Not held: the set of ids (duplicate ids are not detected when streaming), the training examples, a length
(``len()`` is undefined). Order: source order (no shuffle buffer), the same in every pass.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch.utils.data import IterableDataset

from seqcpo.batching import row_fits
from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.examples import describe_counts, record_examples
from seqcpo.data.row_batches import stream_row_batches, stream_source
from seqcpo.data.splits import fraction_split, split_key, uses_fractions
from seqcpo.types import Example

logger = logging.getLogger(__name__)

#: How many recent (examples consumed -> position) pairs a stream keeps for the checkpoint callback: more
#: than the batches the DataLoader can have read ahead of the optimizer.
POSITION_HISTORY = 8192
#: Records tokenized together by a training stream (batched tokenization, bounded memory).
TOKENIZE_CHUNK = 64
#: Log the streamed counts every this many records read by a process.
LOG_EVERY_RECORDS = 200_000


@dataclass
class SplitPlan:
    """Which split a record id belongs to, decided without holding the corpus.

    Fractions: by the id's own key. Counts: ``evaluation`` holds the ids chosen for validation and test.
    """

    validation_size: float
    test_size: float
    seed: int
    evaluation: dict[str, str] = field(default_factory=dict)  # id -> "validation" | "test" (counts only)

    def split_of(self, record_id: str) -> str:
        if uses_fractions(self.validation_size, self.test_size):
            return fraction_split(split_key(self.seed, record_id), self.validation_size, self.test_size)
        return self.evaluation.get(record_id, "train")


@dataclass
class StreamingData:
    """What :func:`load_streaming` returns: the split plan, the held evaluation examples and the counts of the
    planning pass (``stats``)."""

    cfg: DataConfig
    source: str
    plan: SplitPlan
    validation: list[Example]
    test: list[Example]
    stats: dict[str, Any]
    context_tokens: Optional[int] = None

    def train(self, tokenizer: Any, process_index: int = 0, world_size: int = 1,
              offline: dict | None = None) -> "StreamingExamples":
        """This process's training stream."""
        return StreamingExamples(self, tokenizer, process_index, world_size, offline)


def check_streaming_args(max_steps: int) -> None:
    """The Trainer setting streaming needs; a clear error instead of the Trainer's own."""
    if max_steps is None or max_steps <= 0:
        raise DataError(
            "streaming=true reads a corpus with no length, so the run needs max_steps: set --max_steps N "
            "(num_train_epochs cannot be counted without reading the whole corpus)"
        )


def load_streaming(cfg: DataConfig, tokenizer: Any, context_tokens: int | None = None,
                   need_validation: bool = True, need_test: bool = False) -> StreamingData:
    """Plan the splits of ``cfg.dataset`` and hold its (capped) evaluation examples, reading lazily.

    Counts (validation_size/test_size >= 1) always read the id column once (see the module docstring);
    fractions read only as far as needed to collect the requested evaluation splits (nothing when neither is
    requested).
    """
    source = stream_source(cfg)
    t0 = time.time()
    if uses_fractions(cfg.validation_size, cfg.test_size):
        plan = SplitPlan(cfg.validation_size, cfg.test_size, cfg.split_seed)
        wanted = {s for s, on in (("validation", need_validation), ("test", need_test)) if on}
        validation, test, stats = _collect_fraction_splits(cfg, tokenizer, source, plan, wanted, context_tokens)
    else:
        plan, validation, test, stats = plan_splits(cfg, tokenizer, source, context_tokens)
    stats = dict(stats, source=source, validation=len(validation), test=len(test),
                 planning_seconds=round(time.time() - t0, 1))
    logger.info(
        "streaming data %s (task %s): validation %d, test %d held (planning read %d records in %.1f s)%s; training "
        "examples are read and tokenized on the fly",
        source, stats.get("task", cfg.task), len(validation), len(test), stats.get("records_read", 0),
        stats["planning_seconds"],
        f" ({'; '.join(describe_counts(stats, cfg))})" if describe_counts(stats, cfg) else "",
    )
    return StreamingData(cfg, source, plan, validation, test, stats, context_tokens)


def plan_splits(cfg: DataConfig, tokenizer: Any, source: str, context_tokens: int | None = None):
    """Counts: the ``validation_size + test_size`` usable records with the smallest (key, id), in one pass.

    Returns (plan, validation examples, test examples, stats), each split in source order, exactly the records
    :func:`seqcpo.data.splits.assign_splits` picks from the whole corpus in memory.
    """
    n_val, n_test = int(cfg.validation_size), int(cfg.test_size)
    k = n_val + n_test
    heap: list[tuple] = []  # (-key, _neg(id), index, id, example): a max-heap on (key, id)
    read, task = 0, cfg.task
    for batch in stream_row_batches(cfg):
        ids = batch.ids(cfg.id_field)
        keys = [split_key(cfg.split_seed, i) for i in ids]
        read += batch.num_rows
        if k == 0:
            continue
        bound = _heap_bound(heap, k)
        offsets = [j for j, u in enumerate(keys) if (u, ids[j]) < bound]
        if not offsets:
            continue
        pairs, built = record_examples(batch.select(offsets, cfg.id_field), cfg, tokenizer, source,
                                       context_tokens=context_tokens)
        task = built.get("task", task)  # "preference" when the rows say so (examples.effective_task)
        for record, group in pairs:
            entry = (-split_key(cfg.split_seed, record.id), _neg(record.id), record.index, record.id, group[0])
            if len(heap) < k:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    if k and len(heap) >= read:
        raise DataError(
            f"{source}: validation_size + test_size = {k} records but only {len(heap)} usable records and none "
            "left for training; lower validation_size/test_size (a fraction below 1 also works)"
        )
    if len(heap) < k:
        raise DataError(
            f"{source}: validation_size + test_size = {k} records but only {len(heap)} usable records; lower "
            "validation_size/test_size (a fraction below 1 also works)"
        )
    ranked = sorted(heap, key=lambda e: (-e[0], e[3]))
    validation = sorted(ranked[:n_val], key=lambda e: e[2])
    test = sorted(ranked[n_val:], key=lambda e: e[2])
    plan = SplitPlan(cfg.validation_size, cfg.test_size, cfg.split_seed)
    plan.evaluation = {e[3]: "validation" for e in validation}
    plan.evaluation.update({e[3]: "test" for e in test})
    stats = {"records_read": read, "task": task}
    return plan, [e[4] for e in validation], [e[4] for e in test], stats


def _heap_bound(heap, k: int) -> tuple[float, str]:
    """Records at or above this (key, id) cannot enter the k smallest any more."""
    if len(heap) < k:
        return (2.0, "")
    return (-heap[0][0], heap[0][3])


class _neg(str):
    """A string that sorts in reverse, so a heap of (-key, _neg(id)) pops the largest (key, id) first."""

    def __lt__(self, other):
        return str.__gt__(self, other)

    def __gt__(self, other):
        return str.__lt__(self, other)

    def __le__(self, other):
        return str.__ge__(self, other)

    def __ge__(self, other):
        return str.__le__(self, other)


def _collect_fraction_splits(cfg, tokenizer, source, plan, wanted, context_tokens):
    """Fractions: the first ``max_eval_examples`` validation/test examples in source order."""
    held: dict[str, list[Example]] = {"validation": [], "test": []}
    read, task = 0, cfg.task
    if wanted:
        cap = cfg.max_eval_examples
        for batch in stream_row_batches(cfg):
            splits = [plan.split_of(i) for i in batch.ids(cfg.id_field)]
            read += batch.num_rows
            offsets = [j for j, s in enumerate(splits) if s in wanted and len(held[s]) < cap]
            if offsets:
                pairs, built = record_examples(batch.select(offsets, cfg.id_field), cfg, tokenizer, source,
                                               context_tokens=context_tokens)
                task = built.get("task", task)
                for record, group in pairs:
                    split = plan.split_of(record.id)
                    if len(held[split]) < cap:
                        held[split].append(group[0])
            if all(len(held[s]) >= cap for s in wanted):
                logger.info("streaming: evaluation splits capped at max_eval_examples=%d", cap)
                break
    return held["validation"], held["test"], {"records_read": read, "task": task}


class StreamingExamples(IterableDataset):
    """One process's training examples, read and tokenized on the fly, as the trainer's item dicts:
    ``{"prefix_ids": list[int], "continuation_ids": list[int], "id": str, "epoch": int}`` (+ ``"offline"``
    when fixed negatives are given). Endless: pass after pass over this process's shard.

    ``is_process_shard`` tells the trainer that this stream is already this process's share, so it must not
    be sharded or dispatched again (see ``SeqCPOTrainer.get_train_dataloader``).
    """

    is_process_shard = True

    def __init__(self, data: StreamingData, tokenizer: Any, process_index: int = 0, world_size: int = 1,
                 offline: dict | None = None):
        if not 0 <= process_index < world_size:
            raise ValueError(f"process_index={process_index} outside world_size={world_size}")
        self.data = data
        self.cfg = data.cfg
        self.tokenizer = tokenizer
        self.process_index = process_index
        self.world_size = world_size
        self.offline = offline
        self._start = {"epoch": 0, "record": 0, "window": 0, "examples": 0, "train_index": 0, "reader": None}
        self._history: deque[tuple[int, dict]] = deque(maxlen=POSITION_HISTORY)
        self.counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self._next_log = LOG_EVERY_RECORDS

    # -- positions
    def position(self, examples: int) -> dict:
        """Where to restart after this process's first ``examples`` training examples (counted from the start
        of training, across resumes). Only the recent past is kept (:data:`POSITION_HISTORY`)."""
        if examples == self._start["examples"]:
            return self._stamp(dict(self._start))
        for count, pos in reversed(self._history):
            if count == examples:
                return self._stamp(dict(pos, examples=count))
        raise RuntimeError(
            f"stream position after {examples} examples is not known (read up to "
            f"{self._history[-1][0] if self._history else self._start['examples']}); the DataLoader read too far "
            "ahead of training"
        )

    def _stamp(self, pos: dict) -> dict:
        return dict(pos, process_index=self.process_index, world_size=self.world_size)

    def resume(self, position: dict) -> None:
        """Start at a stored :meth:`position` (from a checkpoint) instead of the beginning."""
        if position.get("world_size") != self.world_size:
            raise DataError(
                f"this checkpoint's stream was read by {position.get('world_size')} processes, this run has "
                f"{self.world_size}: streaming resumes need the same number of processes (each reads its own shard)"
            )
        self._start = {k: int(position[k]) for k in ("epoch", "record", "window", "examples", "train_index")}
        self._start["reader"] = position.get("reader")  # the datasets reader state of the record's read batch
        self._history.clear()
        logger.info(
            "streaming: process %d resumes at pass %d, record %d (window %d) after %d examples, without replaying "
            "them", self.process_index, self._start["epoch"], self._start["record"], self._start["window"],
            self._start["examples"],
        )

    # -- reading
    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg, data = self.cfg, self.data
        epoch, record, window = self._start["epoch"], self._start["record"], self._start["window"]
        reader = self._start.get("reader")
        t = self._start["train_index"]  # index of the next training record among all processes' (this pass)
        count = self._start["examples"]
        self._history.clear()
        while True:
            yielded = 0
            for batch in stream_row_batches(cfg, start=record, resume=reader):
                ids = batch.ids(cfg.id_field)
                mine, train_index = [], {}
                for j, rid in enumerate(ids):
                    if data.plan.split_of(rid) != "train":
                        continue
                    if t % self.world_size == self.process_index:
                        mine.append(j)
                        train_index[batch.start + j] = t
                    t += 1
                for c in range(0, len(mine), TOKENIZE_CHUNK):  # a few records at a time: little held, fast start
                    chunk = mine[c:c + TOKENIZE_CHUNK]
                    self._count("records_read", len(chunk))
                    pairs, stats = record_examples(batch.select(chunk, cfg.id_field), cfg, self.tokenizer,
                                                   data.source, context_tokens=data.context_tokens, decode=False)
                    self._note(stats)
                    for rec, group in pairs:
                        for j, ex in enumerate(group):
                            if rec.index == record and j < window:
                                continue  # consumed before the resume
                            item = {
                                "prefix_ids": ex.prefix_ids,
                                "continuation_ids": ex.continuation_ids,
                                "id": str(ex.meta["id"]),
                                "epoch": epoch,
                            }
                            if ex.rejected_ids is not None:  # preference rows: their own negatives
                                item["rejected_ids"] = ex.rejected_ids
                            if ex.scores is not None:
                                item["scores"] = ex.scores
                            if self.offline is not None:
                                if item["id"] not in self.offline:
                                    raise DataError(
                                        f"negatives_path has no negatives for training example {item['id']!r} "
                                        f"({rec.where}); re-run `seqcpo negatives` with the same data settings"
                                    )
                                item["offline"] = self.offline[item["id"]]
                                if not row_fits(item["offline"], ex.prefix_ids, ex.continuation_ids,
                                                ex.rejected_ids):
                                    raise DataError(
                                        f"negatives_path {getattr(self.offline, 'path', '')}: its row for training "
                                        f"example {item['id']!r} ({rec.where}) was made from other token ids (data "
                                        "file or tokenizer changed since?); its reference log-probs would not "
                                        "match. Make a folder for this run: seqcpo negatives --config FILE.yaml "
                                        "--out NEW_DIR"
                                    )
                            count += 1
                            yielded += 1
                            self._history.append(
                                (count, {"epoch": epoch, "record": rec.index, "window": j + 1,
                                         "train_index": train_index[rec.index], "reader": batch.resume})
                            )
                            yield item
            if yielded == 0 and record == 0 and window == 0:
                raise DataError(
                    f"{data.source}: process {self.process_index} of {self.world_size} found no training example in "
                    "its shard (every record is short, malformed, or in validation/test)"
                )
            self.log_counts(f"pass {epoch} done")
            epoch, record, window, reader, t = epoch + 1, 0, 0, None, 0

    def _count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if key == "records_read" and self.counts[key] >= self._next_log:
            self._next_log += LOG_EVERY_RECORDS
            self.log_counts("progress")

    def _note(self, stats: dict[str, Any]) -> None:
        for key in ("examples", "skipped_bad", "skipped_short", "text_beyond_windows", "prefix_truncated",
                    "continuation_truncated", "skipped_long", "documents_chunked"):
            if stats.get(key):
                self.counts[key] = self.counts.get(key, 0) + int(stats[key])
                if key != "examples" and key not in self._warned:
                    self._warned.add(key)  # the first cut or skip of each kind is said at once, totals later
                    caps = {k: v for k, v in stats.items() if k.startswith("max_")}
                    # cutting or dropping over-long text is a warning; short or windowed documents are the norm
                    level = logging.INFO if key in ("skipped_short", "text_beyond_windows", "documents_chunked") else logging.WARNING
                    logger.log(level, "streaming (first read batch with it; totals follow): %s",
                               "; ".join(describe_counts({key: stats[key], **caps}, self.cfg)))
        for key in ("max_prefix_tokens", "max_continuation_tokens"):
            if key in stats:
                self.counts[key] = stats[key]

    def log_counts(self, when: str) -> None:
        c = self.counts
        notes = describe_counts(c, self.cfg)
        logger.info(
            "streaming (%s): process %d read %d records -> %d training examples%s",
            when, self.process_index, c.get("records_read", 0), c.get("examples", 0),
            f" ({'; '.join(notes)})" if notes else "",
        )
