"""Reading the fields of records, shared by every task's example builder (:mod:`seqcpo.data.examples`,
:mod:`seqcpo.data.documents`): typed text fields with errors that name the record, the skip-and-count rule for
malformed records, batched tokenization, and the special tokens a tokenizer puts before a plain string."""

from __future__ import annotations

import logging
from typing import Any

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.sources import Record

logger = logging.getLogger("seqcpo.data.examples")


def leading_special_ids(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before a plain string (e.g. Llama's BOS); [] for GPT-2/SmolLM2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _extract(records: list[Record], cfg: DataConfig, fields: Any) -> tuple[list[Record], list[tuple], int]:
    """Apply ``fields(record)`` to every record; a malformed record raises, or is skipped and counted when
    ``cfg.skip_bad_records``. Returns (kept records, their field tuples, number skipped)."""
    kept, values, problems = [], [], []
    for r in records:
        try:
            values.append(fields(r))
        except DataError as e:
            if not cfg.skip_bad_records:
                raise
            problems.append(str(e))
            continue
        kept.append(r)
    if problems:
        shown = "; ".join(problems[:3])
        logger.warning("skipped %d malformed records (skip_bad_records=True): %s%s", len(problems), shown,
                       "; ..." if len(problems) > 3 else "")
    return kept, values, len(problems)


def _text(record: Record, cfg: DataConfig, option: str, required: bool, allow_empty: bool = False) -> str:
    """The string field that ``cfg.<option>`` names, stripped; "" for a missing optional one.

    Errors name the record's location, the field, and the option that maps another name.
    """
    name = getattr(cfg, option)
    fields = record.fields
    if fields.get(name) is None:
        if not required:
            return ""
        present = ", ".join(map(str, fields)) or "none"
        state = "missing field" if name not in fields else "null field"
        raise DataError(
            f'{record.where}: {state} "{name}" (fields present: {present}); map another name with {option}'
            + _task_hint(fields, cfg)
        )
    value = fields[name]
    if not isinstance(value, str):
        raise DataError(f'{record.where}: field "{name}" must be a string, got {type(value).__name__}')
    check_unicode(value, record.where, name)
    value = value.strip()
    if required and not value and not allow_empty:
        raise DataError(f'{record.where}: field "{name}" is empty')
    return value


def _task_hint(fields: dict, cfg: DataConfig) -> str:
    """``", or ..."`` when the record's fields look like another task's (the default field names)."""
    present = {k for k, v in fields.items() if v is not None}
    if cfg.task != "instruction" and {"instruction", "response"} <= present:
        return ", or set task: instruction (--task instruction): this record has instruction and response fields"
    if cfg.task not in ("continuation", "document") and "text" in present and len(present - {"id"}) == 1:
        return ", or set task: continuation (--task continuation): this record has a text field alone"
    return ""


def check_unicode(value: str, where: str, name: str) -> None:
    """Refuse a string the tokenizer cannot take: JSON's ``\\ud800``-style escapes give Python strings with an
    unpaired surrogate, which no UTF-8 tokenizer accepts (it raised a TypeError deep inside tokenization)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f'{where}: field "{name}" holds an unpaired surrogate ({value[e.start:e.end]!r} at character {e.start}), '
            "not valid Unicode text; surrogate escapes must come in pairs"
        ) from None


def text_records(records: list[Record], cfg: DataConfig) -> tuple[list[Record], list[tuple], int]:
    """:func:`_extract` of the plain-text tasks (windows, documents): each record's ``(text, category or None)``."""
    return _extract(
        records,
        cfg,
        lambda r: (
            _text(r, cfg, "text_field", required=True, allow_empty=True),
            _text(r, cfg, "category_field", required=False) or None,
        ),
    )


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
