"""Preference rows -> :class:`~seqcpo.types.Example` with the row's own rejected answers (``task: preference``).

The formats (TRL's field names; a row's format is read from its fields, so one file may mix them):

- **standard, explicit prompt**: ``{"prompt": str, "chosen": str, "rejected": str | [str, ...]}``;
- **standard, implicit prompt**: ``{"chosen": str, "rejected": str | [str, ...]}``: the prompt is the longest
  common beginning of chosen and every rejected answer (cut before a space it ends on, so the answers keep it);
- **conversational, explicit prompt**: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages] |
  [[messages], ...]}`` with messages ``{"role": ..., "content": ...}``;
- **conversational, implicit prompt**: ``{"chosen": [messages], "rejected": [messages] | [[messages], ...]}``: the
  prompt is the longest common run of leading messages;
- **ranked list**: ``{"prompt": str | [messages] (optional, implicit as above), "completions": [str | [messages],
  ...], "scores": [float, ...]}`` (higher = better) or ``"ranks": [int, ...]`` (1 = best, lower = better). The
  completions are sorted best first by a stable sort: the first is the gold, the rest the rejected answers, in
  that order. **Ties** keep the file's order (the first listed of the best is the gold); the scores travel with
  the example (``Example.scores``, ranks as negated ranks), so the label-aware losses (``lipo``, ``bt_pairs``,
  ``infonca``, ``nca``) treat tied answers as equal, while ``cpo``/``cpo_ranked`` only know the column order.

Tokens: standard prompts are tokenized as they are (no template; the tokenizer's own leading special tokens, e.g.
BOS, in front); conversational rows go through ``tokenizer.apply_chat_template``: the prefix is the prompt rendered
with ``add_generation_prompt=True`` and each answer is the rest of ``prompt + answer`` rendered whole (ending as the
template closes the turn, e.g. ``<|im_end|>``); standard answers end with EOS. The loss covers the answer tokens only
(they are the continuation).

Context: a prompt is never cut. It must leave room for one answer token and EOS in the context
(``max_context_tokens``, else the model's), else the row is an error (or skipped with ``overlong: skip``).
Answers keep their first ``min(max_continuation_tokens, context - prompt) - 1`` tokens + EOS (``overlong: cut``,
counted) or the row is skipped (``overlong: skip``). ``max_prefix_tokens`` does not apply to preference rows.

Errors name the file, the row and the field: a row that fits no format or gives two (``chosen`` and
``completions``, ``scores`` and ``ranks``), an empty answer, a chosen answer equal to a rejected one, a score no
float holds, a rank that is not a whole number >= 1, a string with an unpaired surrogate, a prompt that leaves no
room for the answer. A null field counts as absent (Parquet and Arrow rows carry every column of the file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.fields import _extract, _tokenize, check_unicode, leading_special_ids
from seqcpo.data.sources import Record
from seqcpo.types import Example

FORMAT_HELP = (
    'expected "chosen" + "rejected" (with or without "prompt"), or "completions" + "scores" or "ranks" '
    "(with or without \"prompt\")"
)


@dataclass
class PreferenceRow:
    """One row, parsed but not tokenized: ``answers[0]`` is the gold, the rest the rejected ones, best first.

    ``prompt`` and the answers are strings (standard) or message lists (``conversational``); ``scores`` are the
    data's scores of the answers (same order) or None."""

    prompt: Any
    answers: list[Any]
    conversational: bool
    scores: list[float] | None
    form: str  # "pairs" | "ranked"
    implicit: bool


def prompt_missing(fields: dict) -> bool:
    """No ``prompt`` field (or a null one): the prompt is implicit, the answers' common beginning."""
    return fields.get("prompt") is None


def is_preference_record(fields: dict) -> bool:
    """Whether a record's fields name a preference format (a non-null ``chosen`` or ``completions``)."""
    return fields.get("chosen") is not None or fields.get("completions") is not None


def parse_row(record: Record) -> PreferenceRow:
    """The row's prompt and answers (gold first), by the format its fields name; :class:`DataError` naming the
    row and the field otherwise."""
    where = record.where
    f = {k: v for k, v in record.fields.items() if v is not None}  # null = absent (Arrow rows carry every column)
    both = [k for k in ("chosen", "rejected") if k in f]
    if both and "completions" in f:
        raise DataError(f'{where}: fields "{both[0]}" and "completions" both given: a row has one format '
                        f"({FORMAT_HELP})")
    if "chosen" in f:
        if "rejected" not in f:
            raise DataError(f'{where}: field "chosen" without "rejected" ({FORMAT_HELP})')
        rejected = f["rejected"]
        several = isinstance(rejected, list) and (not rejected or not _is_message(rejected[0]))
        rejected = list(rejected) if several else [rejected]
        answers, names = [f["chosen"], *rejected], ["chosen"] + [
            f"rejected[{i}]" if several else "rejected" for i in range(len(rejected))]
        scores, form = None, "pairs"
    elif "completions" in f:
        answers, scores = _ranked(f, where)
        names = [f"completions[{i}]" for i in range(len(answers))]
        order = sorted(range(len(answers)), key=lambda i: -scores[i])  # stable: ties keep the file's order
        answers, names, scores = [answers[i] for i in order], [names[i] for i in order], [scores[i] for i in order]
        form = "ranked"
    else:
        present = ", ".join(map(str, f)) or "none"
        raise DataError(f"{where}: no preference format fits this row ({FORMAT_HELP}); fields present: {present}")
    if len(answers) < 2:
        raise DataError(f'{where}: field "{"rejected" if form == "pairs" else "completions"}" gives no rejected answer')
    conversational = _is_conversation(answers[0])
    for a, name in zip(answers, names):
        _check_answer(a, name, conversational, where)
    prompt, implicit = f.get("prompt"), prompt_missing(f)
    if implicit:
        prompt = _implicit_prompt(answers, conversational, where)
        answers = [a[len(prompt):] for a in answers]
        for a, name in zip(answers, names):
            _check_answer(a, name, conversational, where)  # what is left after the common beginning
    elif conversational != _is_conversation(prompt) or (not conversational and not isinstance(prompt, str)):
        if conversational and isinstance(prompt, list):
            _check_messages(prompt, "prompt", where)
        kind = "a list of messages" if conversational else "a string"
        raise DataError(f'{where}: field "prompt" must be {kind}, like the answers, got {_kind(prompt)}')
    elif conversational:
        _check_messages(prompt, "prompt", where)
    if not conversational and not prompt.strip():
        raise DataError(f'{where}: field "prompt" is empty')
    if not implicit:
        _check_unicode_value(prompt, where, "prompt")
    gold = _canonical(answers[0], conversational)
    for a, name in zip(answers[1:], names[1:]):
        if _canonical(a, conversational) == gold:
            raise DataError(f'{where}: field "{name}" equals the chosen answer ("{names[0]}"); a negative must differ')
    return PreferenceRow(prompt, answers, conversational, scores, form, implicit)


def preference_pairs(records: list[Record], cfg: DataConfig, tokenizer: Any, source: str,
                     context_tokens: int | None = None) -> tuple[list[tuple[Record, list[Example]]], dict[str, int]]:
    """(record, [its example]) for every usable row, in order, and the counts (like the other tasks' builders)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; task=preference ends every answer with EOS")
    total = len(records)
    records, rows, bad = _extract(records, cfg, parse_row)
    texts = [_render(r, rec, tokenizer) for r, rec in zip(rows, records)]
    lead = leading_special_ids(tokenizer)
    prompt_ids = _tokenize(tokenizer, [t[0] for t in texts])
    flat = _tokenize(tokenizer, [a for t in texts for a in t[1]])
    limits = [v for v in (cfg.max_context_tokens, context_tokens) if v]
    pairs: list[tuple[Record, list[Example]]] = []
    cut = skipped_long = rejected = 0
    pos = 0
    for rec, row, (prompt_text, answer_texts, chat), x in zip(records, rows, texts, prompt_ids):
        answers = flat[pos:pos + len(answer_texts)]
        pos += len(answer_texts)
        prefix = x if chat else lead + x
        room = min(cfg.max_continuation_tokens, min(limits) - len(prefix)) if limits else cfg.max_continuation_tokens
        if room < 2:
            if cfg.overlong == "skip":
                skipped_long += 1
                continue
            raise DataError(
                f'{rec.where}: field "prompt" is {len(prefix)} tokens and leaves no room for an answer in the '
                f"context of {min(limits)} tokens (max_context_tokens or the model's); shorten it, or set "
                "overlong: skip"
            )
        empty = [i for i, a in enumerate(answers) if not a]
        if empty:
            raise DataError(f"{rec.where}: answer {empty[0]} (0 = the chosen one) tokenizes to nothing")
        if not chat:  # a chat answer ends as the template closes the turn (TRL adds no EOS there either)
            answers = [a if a[-1:] == [eos] else a + [eos] for a in answers]
        over = any(len(a) > room for a in answers)
        if over and cfg.overlong == "skip":
            skipped_long += 1
            continue
        cut += over
        answers = [a if len(a) <= room else a[:room - 1] + [eos] for a in answers]
        rejected += len(answers) - 1
        meta = {
            "id": rec.id, "prompt": prompt_text, "reference": answer_texts[0], "category": None, "source": source,
            "format": f"{'conversational' if row.conversational else 'standard'}/{row.form}"
                      f"{'/implicit' if row.implicit else ''}",
            "continuation_truncated": over,
        }
        ex = Example(prefix_ids=list(prefix), continuation_ids=answers[0], meta=meta, rejected_ids=answers[1:],
                     scores=[float(s) for s in row.scores] if row.scores is not None else None)
        pairs.append((rec, [ex]))
    stats = {
        "task": "preference", "records": total, "skipped_bad": bad, "examples": len(pairs), "continuation_truncated": cut,
        "skipped_long": skipped_long, "rejected_answers": rejected,
        "max_continuation_tokens": cfg.max_continuation_tokens,
    }
    return pairs, stats


# -- helpers


def _ranked(f: dict, where: str) -> tuple[list[Any], list[float]]:
    completions = f["completions"]
    if not isinstance(completions, list):
        raise DataError(f'{where}: field "completions" must be a list of answers, got {type(completions).__name__}')
    key = "scores" if f.get("scores") is not None else "ranks" if f.get("ranks") is not None else None
    if key is None:
        raise DataError(f'{where}: field "completions" needs "scores" (higher = better) or "ranks" (1 = best)')
    if key == "scores" and f.get("ranks") is not None:
        raise DataError(f'{where}: fields "scores" and "ranks" both given; give one (which would decide the order?)')
    values = f[key]
    if not isinstance(values, list) or len(values) != len(completions):
        n = len(values) if isinstance(values, list) else type(values).__name__
        raise DataError(f'{where}: field "{key}" must be a list of {len(completions)} numbers (one per completion), got {n}')
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
            raise DataError(f'{where}: field "{key}[{i}]" must be a finite number, got {_short(v)}')
        if key == "ranks" and (v < 1 or v != int(v)):
            raise DataError(f'{where}: field "ranks[{i}]" must be a whole number >= 1 (1 = best), got {v!r}')
    scores = [float(v) for v in values] if key == "scores" else [-float(v) for v in values]
    return list(completions), scores


def _finite(v: int | float) -> bool:
    """A float64 can hold it (a JSON integer may have hundreds of digits) and it is not NaN or infinite."""
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _kind(v: Any) -> str:
    """``str``, ``list of int``, ``empty list``, ...: what a field holds, for an error."""
    if isinstance(v, list):
        kinds = sorted({type(m).__name__ for m in v})
        return f"a list of {' and '.join(kinds)}" if kinds else "an empty list"
    return type(v).__name__


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check_unicode_value(value: Any, where: str, name: str) -> None:
    """:func:`check_unicode` on a string, or on every message's role and content."""
    if isinstance(value, str):
        check_unicode(value, where, name)
        return
    for i, m in enumerate(value):
        for key in ("role", "content"):
            if isinstance(m[key], str):
                check_unicode(m[key], where, f"{name}[{i}].{key}")


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and "role" in m and "content" in m


def _is_conversation(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_message(m) for m in v)


def _message_problem(m: Any) -> str | None:
    """What keeps ``m`` from being a chat message ``{"role": str, "content": str}``, or None."""
    if not isinstance(m, dict):
        return f'is {type(m).__name__}, not a message {{"role", "content"}}'
    for key in ("role", "content"):
        if key not in m:
            return f'is a message without "{key}"'
        if not isinstance(m[key], str):
            return f'has "{key}" {_short(m[key])}; it must be a string'
    return None


def _check_messages(a: list, name: str, where: str) -> None:
    """Every item of a list of messages is one (its index named otherwise)."""
    for i, m in enumerate(a):
        problem = _message_problem(m)
        if problem:
            raise DataError(f'{where}: field "{name}[{i}]" {problem}')


def _check_answer(a: Any, name: str, conversational: bool, where: str) -> None:
    if conversational:
        if not isinstance(a, list) or not a:
            raise DataError(f'{where}: field "{name}" must be a list of messages {{"role", "content"}}, like "chosen"')
        _check_messages(a, name, where)
        if not any(m["content"].strip() for m in a):
            raise DataError(f'{where}: field "{name}" is empty')
        _check_unicode_value(a, where, name)
        return
    if isinstance(a, list) and any(isinstance(m, dict) for m in a):
        _check_messages(a, name, where)  # meant as messages: say which one is not
    if not isinstance(a, str):
        raise DataError(f'{where}: field "{name}" must be a string (or every answer a list of messages '
                        f'{{"role", "content"}}), got {_kind(a)}')
    _check_unicode_value(a, where, name)
    if not a.strip():
        raise DataError(f'{where}: field "{name}" is empty')


def _implicit_prompt(answers: list[Any], conversational: bool, where: str) -> Any:
    if conversational:
        n = 0
        while all(len(a) > n + 1 for a in answers) and all(a[n] == answers[0][n] for a in answers):
            n += 1
        if n == 0:
            raise DataError(f'{where}: no field "prompt", and the answers share no leading message to take as it')
        return answers[0][:n]
    n = 0
    shortest = min(len(a) for a in answers)
    while n < shortest and all(a[n] == answers[0][n] for a in answers):
        n += 1
    if n < shortest and n > 0 and answers[0][n - 1] == " ":
        n -= 1  # the answers keep the space before their first word
    if n == 0 or not answers[0][:n].strip():
        raise DataError(f'{where}: no field "prompt", and chosen and rejected share no beginning to take as it')
    if any(len(a) == n for a in answers):
        raise DataError(f'{where}: no field "prompt", and one answer is the others\' common beginning (it would be empty)')
    return answers[0][:n]


def _canonical(a: Any, conversational: bool) -> Any:
    if conversational:
        return tuple((m["role"], str(m["content"]).strip()) for m in a)
    return a.strip()


def _render(row: PreferenceRow, record: Record, tokenizer: Any) -> tuple[str, list[str], bool]:
    """(prompt text, answer texts, chat?) of one row: plain strings, or the chat template's rendering."""
    if not row.conversational:
        return row.prompt, list(row.answers), False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{record.where}: a conversational row needs a tokenizer with a chat template; this one has none")
    prompt_text = tokenizer.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)
    answers = []
    for a in row.answers:
        full = tokenizer.apply_chat_template(list(row.prompt) + list(a), tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{record.where}: the chat template does not render the prompt (with the generation prompt) as the "
                "beginning of prompt + answer, so the answer tokens cannot be told apart"
            )
        answers.append(full[len(prompt_text):])
    return prompt_text, answers, True
