"""Records -> :class:`Example` (prefix ids, continuation ids) for the two tasks of docs/method.md.

- ``continuation`` (Wikidump setting): tokenize each document, cut non-overlapping windows of
  ``prefix_tokens`` + ``continuation_tokens``; the prefix is ``x``, the continuation ``y_0``. No EOS:
  the document goes on. Documents shorter than one window are skipped and counted.
- ``instruction`` (Dolly setting): render instruction (+ context) with a prompt template; the
  continuation is the response tokens followed by EOS, so the loss covers the response only.
- ``preference`` (chosen / rejected answers, ranked lists): :mod:`seqcpo.data.preference`; chosen
  automatically when ``task`` is left at its default and the records have preference fields.

Both tasks tokenize text with ``add_special_tokens=False`` and put in front of each prefix the special
tokens the tokenizer itself would put in front of a plain string (a BOS for Llama tokenizers, nothing
for GPT-2 or SmolLM2): the model sees the same start of sequence as in pre-training.
"""

from __future__ import annotations

import logging
from typing import Any

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.fields import _extract, _text, _tokenize, leading_special_ids, text_records  # noqa: F401 (re-exported)
from seqcpo.data.sources import Record
from seqcpo.types import Example

logger = logging.getLogger(__name__)

#: The "plain" prompt template (Alpaca-like). The Input block is left out when the context is empty.
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PLAIN_TEMPLATE_NO_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"


def build_examples(
    records: list[Record], cfg: DataConfig, tokenizer: Any, source: str, context_tokens: int | None = None
) -> tuple[list[list[Example]], dict[str, int]]:
    """Turn records into examples, grouped per record (one group per usable record, in source order).

    ``context_tokens``: the model's context (its ``max_position_embeddings``); with ``cfg.max_context_tokens``
    it bounds every example by :func:`context_limits`. Returns (groups, stats). Raises :class:`DataError` on a
    malformed record or when nothing is usable.
    """
    pairs, stats = record_examples(records, cfg, tokenizer, source, context_tokens=context_tokens)
    groups = [group for _, group in pairs]
    if not groups:
        if stats["skipped_bad"]:
            raise DataError(
                f"{source}: no usable examples: {stats['skipped_bad']} of {len(records)} records are malformed "
                "and were skipped (skip_bad_records=True), the rest gave no example"
            )
        if effective_task(cfg, records) == "continuation":
            need = cfg.prefix_tokens + cfg.continuation_tokens
            raise DataError(
                f"{source}: no usable examples: all {len(records)} documents are shorter than prefix_tokens + "
                f"continuation_tokens = {need} tokens; lower prefix_tokens or continuation_tokens"
            )
        if cfg.task == "document":
            from seqcpo.data.documents import no_documents_error

            raise no_documents_error(source, len(records))
        raise DataError(f"{source}: no usable examples from {len(records)} records")
    return groups, stats


def record_examples(
    records: list[Record],
    cfg: DataConfig,
    tokenizer: Any,
    source: str,
    context_tokens: int | None = None,
    decode: bool = True,
) -> tuple[list[tuple[Record, list[Example]]], dict[str, int]]:
    """(record, its examples) for every usable record, in order, and the counts; never raises for "nothing
    usable" (the streaming reader calls it on one read batch at a time). ``decode=False`` leaves out the
    ``prompt``/``reference`` texts of continuation windows (training does not read them)."""
    task = effective_task(cfg, records)
    if task == "preference":
        from seqcpo.data.preference import preference_pairs

        return preference_pairs(records, cfg, tokenizer, source, context_tokens)
    if task == "continuation":
        return _continuation_pairs(records, cfg, tokenizer, source, context_tokens, decode)
    if cfg.task == "document":
        from seqcpo.data.documents import document_pairs

        return document_pairs(records, cfg, tokenizer, source, context_tokens, decode)
    return _instruction_pairs(records, cfg, tokenizer, source, context_tokens)


def effective_task(cfg: DataConfig, records: list[Record]) -> str:
    """``cfg.task``, or "preference" when it is left at the default "continuation" and the first record has
    preference fields (``chosen`` or ``completions``) and no ``text_field``: ``--dataset prefs.jsonl`` is
    enough for a preference file."""
    if cfg.task == "continuation" and records:
        from seqcpo.data.preference import is_preference_record

        fields = records[0].fields
        if is_preference_record(fields) and cfg.text_field not in fields:
            return "preference"
    return cfg.task


def context_limits(cfg: DataConfig, tokenizer: Any, context_tokens: int | None = None) -> tuple[int, int]:
    """Token caps (prefix, continuation) that make every example fit the context, by one documented rule.

    The context L is the smaller of ``cfg.max_context_tokens`` and ``context_tokens`` (the model's); None for
    both means no limit. The prefix cap counts the leading special tokens (e.g. BOS); the continuation cap
    bounds every candidate (gold, TN, MN; BN negatives are other examples' golds), so prefix + any candidate
    fits. AN negatives are bounded by ``an_max_new_tokens`` instead: keep it at most the continuation cap.

    - continuation task: the window lead + ``prefix_tokens`` + ``continuation_tokens`` must fit L, else
      :class:`DataError` (a window is never cut silently);
    - instruction task, caps P = ``max_prefix_tokens``, C = ``max_continuation_tokens``: when P + C <= L they
      stay; otherwise the prefix keeps up to half of L if it needs it, P' = min(P, max(L - C, L - L // 2)),
      and the continuation the rest, C' = min(C, L - P').

    >>> from seqcpo.data.config import DataConfig
    >>> context_limits(DataConfig(task="instruction", max_prefix_tokens=256, max_continuation_tokens=128), None, 256)
    (128, 128)
    """
    limits = [v for v in (cfg.max_context_tokens, context_tokens) if v]
    if cfg.task == "continuation":
        if limits:
            lead = len(leading_special_ids(tokenizer)) if tokenizer is not None else 0
            need = lead + cfg.prefix_tokens + cfg.continuation_tokens
            if need > min(limits):
                raise DataError(
                    f"prefix_tokens + continuation_tokens = {cfg.prefix_tokens + cfg.continuation_tokens}"
                    f"{f' (+{lead} leading special token)' if lead else ''} do not fit the context of {min(limits)} "
                    "tokens (the model's max_position_embeddings or max_context_tokens); lower them"
                )
        return cfg.prefix_tokens, cfg.continuation_tokens
    p, c = cfg.max_prefix_tokens, cfg.max_continuation_tokens
    if not limits or p + c <= min(limits):
        return p, c
    total = min(limits)
    p2 = min(p, max(total - c, total - total // 2))
    return p2, min(c, total - p2)


def continuation_examples(
    records: list[Record], cfg: DataConfig, tokenizer: Any, source: str, context_tokens: int | None = None
) -> tuple[list[list[Example]], dict[str, int]]:
    """Token windows: window j of a document covers tokens [j*W, (j+1)*W), W = prefix + continuation."""
    pairs, stats = _continuation_pairs(records, cfg, tokenizer, source, context_tokens, True)
    return [g for _, g in pairs], stats


def instruction_examples(
    records: list[Record], cfg: DataConfig, tokenizer: Any, source: str, context_tokens: int | None = None
) -> tuple[list[list[Example]], dict[str, int]]:
    """prefix_ids = rendered prompt (last ``max_prefix_tokens`` kept), continuation_ids = response + EOS
    (first ``max_continuation_tokens - 1`` response tokens kept); both caps lowered by :func:`context_limits`."""
    pairs, stats = _instruction_pairs(records, cfg, tokenizer, source, context_tokens)
    return [g for _, g in pairs], stats


def _continuation_pairs(records, cfg, tokenizer, source, context_tokens, decode):
    context_limits(cfg, tokenizer, context_tokens)  # a window that cannot fit is an error, never a cut
    total = len(records)
    records, values, bad = text_records(records, cfg)
    texts = [text for text, _ in values]
    token_lists = _tokenize(tokenizer, texts)
    lead = leading_special_ids(tokenizer)
    p, c = cfg.prefix_tokens, cfg.continuation_tokens
    w = p + c
    pairs: list[tuple[Record, list[Example]]] = []
    windows: list[tuple[list[int], list[int]]] = []  # text-only (prefix, continuation) ids, for decoding
    skipped = beyond = 0
    for record, ids, (_, category) in zip(records, token_lists, values):
        n = min(cfg.windows_per_document, len(ids) // w)
        if n == 0:
            skipped += 1  # includes empty documents: blank rows are normal in text corpora
            continue
        beyond += len(ids) > n * w  # the rest of a longer document is not used: counted, and logged
        group = []
        for j in range(n):
            x, y = ids[j * w : j * w + p], ids[j * w + p : (j + 1) * w]
            windows.append((x, y))
            meta = {
                "id": record.id if j == 0 else f"{record.id}#{j}",
                "category": category,
                "source": source,
                "window": j,
            }
            group.append(Example(prefix_ids=lead + x, continuation_ids=list(y), meta=meta))
        pairs.append((record, group))
    if decode:
        prompts = tokenizer.batch_decode([x for x, _ in windows])
        references = tokenizer.batch_decode([y for _, y in windows])
        for ex, prompt, reference in zip((e for _, g in pairs for e in g), prompts, references):
            ex.meta["prompt"] = prompt
            ex.meta["reference"] = reference
    stats = {
        "records": total,
        "skipped_bad": bad,
        "skipped_short": skipped,
        "examples": len(windows),
        "text_beyond_windows": beyond,
    }
    return pairs, stats


def _instruction_pairs(records, cfg, tokenizer, source, context_tokens):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; task=instruction ends every continuation with EOS")
    mode = _template_mode(cfg.prompt_template, tokenizer)
    total = len(records)
    records, values, bad = _extract(
        records,
        cfg,
        lambda r: (
            _text(r, cfg, "instruction_field", required=True),
            _text(r, cfg, "context_field", required=False),
            _text(r, cfg, "response_field", required=True),
            _text(r, cfg, "category_field", required=False) or None,
        ),
    )
    instructions = [v[0] for v in values]
    contexts = [v[1] for v in values]
    responses = [v[2] for v in values]
    categories = [v[3] for v in values]
    prompts = [render_prompt(i, c, tokenizer, mode) for i, c in zip(instructions, contexts)]
    # A chat template writes its own BOS into the text; the plain one relies on the tokenizer's.
    lead = leading_special_ids(tokenizer) if mode == "plain" else []
    prompt_ids = _tokenize(tokenizer, prompts)
    response_ids = _tokenize(tokenizer, responses)
    max_prefix, max_continuation = context_limits(cfg, tokenizer, context_tokens)
    max_body = max_prefix - len(lead)
    max_response = max_continuation - 1
    pairs: list[tuple[Record, list[Example]]] = []
    truncated_prefix = truncated_response = skipped_long = 0
    for k, r in enumerate(records):
        x, y = prompt_ids[k], response_ids[k]
        if not y:  # whitespace-only after the tokenizer's normalisation
            if not cfg.skip_bad_records:
                raise DataError(f'{r.where}: field "{cfg.response_field}" tokenizes to nothing')
            bad += 1
            continue
        cut_x, cut_y = len(x) > max_body, len(y) > max_response
        if (cut_x or cut_y) and cfg.overlong == "skip":
            skipped_long += 1
            continue
        x = x[-max_body:] if cut_x else x  # keep the end: the request and "### Response:" sit there
        y = y[:max_response] if cut_y else y
        truncated_prefix += cut_x
        truncated_response += cut_y
        prefix = lead + x
        meta = {
            "id": r.id,
            "prompt": tokenizer.decode(prefix) if cut_x else prompts[k],
            "reference": tokenizer.decode(y) if cut_y else responses[k],
            "category": categories[k],
            "source": source,
            "instruction": instructions[k],
            "context": contexts[k],
            "prefix_truncated": cut_x,
            "continuation_truncated": cut_y,
        }
        pairs.append((r, [Example(prefix_ids=prefix, continuation_ids=y + [eos], meta=meta)]))
    stats = {
        "records": total,
        "skipped_bad": bad,
        "examples": len(pairs),
        "prefix_truncated": truncated_prefix,
        "continuation_truncated": truncated_response,
        "skipped_long": skipped_long,
        "max_prefix_tokens": max_prefix,
        "max_continuation_tokens": max_continuation,
        "chat_template": int(mode == "chat"),
    }
    return pairs, stats


def describe_counts(stats: dict[str, Any], cfg: DataConfig) -> list[str]:
    """The log notes for what was skipped or cut (nothing over-long is cut without a word in the log)."""
    notes = []
    if cfg.task == "document":
        if stats.get("skipped_short"):
            notes.append(f"{stats['skipped_short']} empty or one-token documents skipped")
        if stats.get("documents_chunked"):
            notes.append(f"{stats['documents_chunked']} documents longer than max_length={cfg.max_length} tokens "
                         "cut into several rows")
        if stats.get("skipped_bad"):
            notes.append(f"{stats['skipped_bad']} malformed records skipped")
        return notes
    if stats.get("skipped_short"):
        need = cfg.prefix_tokens + cfg.continuation_tokens
        notes.append(f"{stats['skipped_short']} documents shorter than {need} tokens skipped")
    if stats.get("text_beyond_windows"):
        notes.append(
            f"{stats['text_beyond_windows']} documents longer than windows_per_document={cfg.windows_per_document} "
            f"windows of {cfg.prefix_tokens}+{cfg.continuation_tokens} tokens: their rest is not used"
        )
    if stats.get("skipped_bad"):
        notes.append(f"{stats['skipped_bad']} malformed records skipped")
    caps = f"{stats.get('max_prefix_tokens')}+{stats.get('max_continuation_tokens')} tokens"
    if stats.get("prefix_truncated"):
        notes.append(f"{stats['prefix_truncated']} prompts cut to their last {stats.get('max_prefix_tokens')} tokens")
    if stats.get("continuation_truncated"):
        notes.append(
            f"{stats['continuation_truncated']} responses cut to their first "
            f"{stats.get('max_continuation_tokens', 1) - 1} tokens + EOS"
        )
    if stats.get("skipped_long"):
        notes.append(f"{stats['skipped_long']} examples over the {caps} caps skipped (overlong=skip)")
    return notes


def model_context_tokens(model_config: Any) -> int | None:
    """The longest sequence a model's positions cover (``max_position_embeddings``, GPT-2's ``n_positions``),
    or None when its config names none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def render_prompt(instruction: str, context: str, tokenizer: Any, template: str = "auto") -> str:
    """The prompt text for one instruction.

    ``template``: "chat" renders one user message (instruction, then the context after a blank line when
    non-empty) with the tokenizer's chat template and ``add_generation_prompt=True``; "plain" fills
    :data:`PLAIN_TEMPLATE`::

        ### Instruction:
        {instruction}

        ### Input:
        {context}

        ### Response:

    (the Input block left out when the context is empty); "auto" picks "chat" when the tokenizer has a
    chat template, else "plain".
    """
    mode = _template_mode(template, tokenizer)
    if mode == "chat":
        content = f"{instruction}\n\n{context}" if context else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if context:
        return PLAIN_TEMPLATE.format(instruction=instruction, context=context)
    return PLAIN_TEMPLATE_NO_CONTEXT.format(instruction=instruction)


# -- helpers


def _template_mode(template: str, tokenizer: Any) -> str:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise DataError(
            "prompt_template='chat' but the tokenizer has no chat template; use prompt_template='plain' "
            "(or 'auto', which falls back to plain)"
        )
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template not in ("chat", "plain"):
        raise ValueError(f"prompt_template={template!r}: choose auto, plain or chat")
    return template
