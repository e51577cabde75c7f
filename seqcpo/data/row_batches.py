"""Reading a source lazily (``streaming: true``): one batch of records at a time, as an Arrow table or as records
already built, from any record on; memory holds one batch whatever the corpus size."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.sources import (
    FILE_EXTENSIONS, WIKI, Record, _iter_jsonl, _iter_txt, _record, read_json, read_wiki, record_id,
)

#: Records read per batch in streaming mode (one Arrow table or list at a time).
STREAM_BATCH_ROWS = 1000


@dataclass
class RowBatch:
    """Consecutive records ``[start, start + num_rows)`` of a source, as read and not yet converted: an Arrow
    ``table`` (files and Hub datasets through ``datasets``) or already built ``records`` (.txt, "wiki")."""

    start: int
    num_rows: int
    where: str
    table: Any = None
    records: list[Record] | None = None
    resume: dict | None = None  # {"state", "start"}: puts a new reader back at this batch (stream_row_batches)

    def ids(self, id_field: str) -> list[str]:
        """The record ids, read from the id column alone (positions where it is missing, null or empty)."""
        if self.records is not None:
            return [r.id for r in self.records]
        values = (
            _python_column(self.table, id_field)
            if id_field in self.table.column_names
            else [None] * self.num_rows
        )
        return [
            record_id(v, id_field, str(self.start + k), f"{self.where} {self.start + k}")
            for k, v in enumerate(values)
        ]

    def select(self, offsets: list[int], id_field: str) -> list[Record]:
        """The records at these offsets (0-based within the batch), converted to Python."""
        if self.records is not None:
            return [self.records[k] for k in offsets]
        rows = _python_rows(self.table.take(offsets)) if offsets else []
        return [
            _record(row, id_field, str(self.start + k), f"{self.where} {self.start + k}", self.start + k)
            for k, row in zip(offsets, rows)
        ]


def stream_source(cfg: DataConfig) -> str:
    """The source name of ``cfg.dataset`` for ``meta["source"]``; raises :class:`DataError` for a missing file."""
    name = cfg.dataset
    path = os.path.expanduser(name)
    if name != WIKI and not os.path.exists(path):
        if name.lower().endswith(FILE_EXTENSIONS) or name.startswith(("/", "./", "../", "~")):
            raise DataError(f"{name}: no such file (dataset= takes a local file, a Hub dataset id, or \"wiki\")")
    return name


def stream_row_batches(
    cfg: DataConfig, start: int = 0, batch_rows: int | None = None, resume: dict | None = None
) -> Iterator[RowBatch]:
    """Read ``cfg.dataset`` lazily from record ``start`` on, one :class:`RowBatch` at a time.

    Local .jsonl/.json/.parquet files and Hub datasets go through ``datasets.load_dataset(..., streaming=True)``
    (Hub datasets are streamed, never downloaded whole), a dataset folder saved by ``datasets`` is memory-mapped,
    .txt files are read paragraph by paragraph. Records before ``start`` are passed over as Arrow tables,
    never converted or tokenized. Memory holds one batch at a time, whatever the corpus size.

    ``resume``: a batch's ``resume`` (``{"state": datasets state_dict, "start": its first record}``) at or before
    ``start``: the reader is put back there by ``datasets``' ``load_state_dict``, so the data files (shards)
    before it are not read again (datasets may reopen the one just before, to pass over its end); without it,
    reading starts at the first record.
    """
    name = stream_source(cfg)
    path = os.path.expanduser(name)
    batch_rows = batch_rows or STREAM_BATCH_ROWS
    if name == WIKI:
        yield from _list_batches(iter(read_wiki()), start, batch_rows, "wiki entry")
        return
    ext = os.path.splitext(path)[1].lower() if os.path.isfile(path) else None
    if ext == ".txt":
        if cfg.task != "continuation":
            raise DataError(f"{path}: a .txt file holds plain documents; it only serves task=continuation")
        yield from _list_batches(_iter_txt(path, cfg.text_field), start, batch_rows, f"{path} paragraph")
        return
    # JSON files are read by the same parser as without streaming: datasets' JSON reader turns a field whose type
    # varies across rows (a string here, a list there) into JSON text ('["a", "b"]'), and gives every row every
    # column (null where absent), so the streamed records would differ from the file's
    if ext == ".jsonl":
        yield from _list_batches(_iter_jsonl(path, cfg.id_field, start), start, batch_rows, f"{path} line",
                                 skipped=True)
        return
    if ext == ".json":  # a JSON document is parsed whole, streamed or not: use .jsonl for a large corpus
        yield from _list_batches(iter(read_json(path, cfg.id_field)), start, batch_rows, f"{path} record")
        return
    yield from _arrow_batches(_open_stream(name, path, cfg), name, cfg, start, batch_rows, resume)


def _open_stream(name: str, path: str, cfg: DataConfig):
    import datasets

    try:
        if os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
        ):  # written by Dataset.save_to_disk: memory-mapped Arrow, not read into memory
            ds = datasets.load_from_disk(path)
            return ds[cfg.dataset_split] if isinstance(ds, datasets.DatasetDict) else ds
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in (".jsonl", ".json", ".parquet"):
                raise DataError(
                    f"{path}: unknown file extension {ext or '(none)'!r}; use one of {', '.join(FILE_EXTENSIONS)}"
                )
            builder = "parquet" if ext == ".parquet" else "json"
            return datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
        return datasets.load_dataset(name, cfg.dataset_config, split=cfg.dataset_split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # network, unknown id, missing split: all end the same way for the user
        raise DataError(
            f"{name}: could not open it as a streamed dataset (split {cfg.dataset_split!r}): {type(e).__name__}: "
            f"{e}. Check the id and your network, or pass a local .jsonl/.json/.parquet/.txt file"
        ) from None


# datasets' JSON reader gives a field whose type varies across rows (a string here, a list there, an id that is
# sometimes a number) Arrow's JSON type, whose values are JSON text ('"x"', '["a", "b"]'); they are decoded here,
# at any depth, so that a streamed record equals the record read without streaming


def _python_rows(table) -> list[dict]:
    if not any(_has_json(f.type) for f in table.schema):
        return table.to_pylist()
    columns = {name: _python_column(table, name) for name in table.column_names}
    return [{name: columns[name][k] for name in table.column_names} for k in range(table.num_rows)]


def _python_column(table, name: str) -> list:
    kind = table.schema.field(name).type
    values = table.column(name).to_pylist()
    return [_from_json(v, kind) for v in values] if _has_json(kind) else values


def _has_json(kind) -> bool:
    if getattr(kind, "extension_name", None) == "arrow.json":
        return True
    return any(_has_json(kind.field(i).type) for i in range(kind.num_fields))  # struct fields, list items


def _from_json(value: Any, kind) -> Any:
    if value is None:
        return None
    if getattr(kind, "extension_name", None) == "arrow.json":
        return json.loads(value)
    if isinstance(value, list):  # a list type: its single field is the item
        return [_from_json(v, kind.field(0).type) for v in value]
    if isinstance(value, dict):  # a struct
        types = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        return {k: _from_json(v, types[k]) if k in types else v for k, v in value.items()}
    return value


def _arrow_batches(ds, name: str, cfg: DataConfig, start: int, batch_rows: int,
                   resume: dict | None) -> Iterator[RowBatch]:
    where = f"{name} record" if os.path.exists(os.path.expanduser(name)) else f"{name} [{cfg.dataset_split}] row"
    ds = ds.with_format("arrow")
    stateful = hasattr(ds, "state_dict") and hasattr(ds, "load_state_dict")  # streamed, not memory-mapped
    offset = 0
    if resume and stateful and resume.get("state") is not None and resume.get("start", start + 1) <= start:
        ds.load_state_dict(resume["state"])
        offset = int(resume["start"])
    tables = iter(ds.iter(batch_size=batch_rows))
    while True:
        state = ds.state_dict() if stateful else None  # where this table starts, for a later resume
        try:
            table = next(tables)
        except StopIteration:
            return
        except Exception as e:  # a row that breaks the schema, bad JSON, a dropped connection
            raise DataError(
                f"{name}: could not read the records from record {offset} on ({type(e).__name__}: {str(e)[:300]}); "
                "the row number is within that read batch: streaming=false names the file line"
            ) from None
        n = table.num_rows
        if offset + n > start:
            cut = max(0, start - offset)
            if cut:
                table = table.slice(cut)
            yield RowBatch(start=offset + cut, num_rows=n - cut, where=where, table=table,
                           resume={"state": state, "start": offset} if stateful else None)
        offset += n


def _list_batches(records: Iterator[Record], start: int, batch_rows: int, where: str,
                  skipped: bool = False) -> Iterator[RowBatch]:
    """``records`` from the ``start``-th on in batches (``skipped``: the iterator already starts there)."""
    batch: list[Record] = []
    first = start
    for i, r in enumerate(records, start=start if skipped else 0):
        if i < start:
            continue
        r.index = i
        batch.append(r)
        if len(batch) == batch_rows:
            yield RowBatch(start=first, num_rows=len(batch), where=where, records=batch)
            first, batch = i + 1, []
    if batch:
        yield RowBatch(start=first, num_rows=len(batch), where=where, records=batch)
