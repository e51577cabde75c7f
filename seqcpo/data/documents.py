"""Records -> document rows for ``task: document`` (continued pre-training on whole documents).

Each document is tokenized whole (``add_special_tokens=False``) and cut into chunks of at most ``max_length``
tokens. Chunk 0 holds the leading special tokens the tokenizer puts before a plain string (a BOS for Llama
tokenizers, nothing for GPT-2 or SmolLM2) and the document's first tokens; every later chunk starts with the last
token of the chunk before it, as context only (attention never crosses chunks, so that token is predicted in the
chunk before and conditions the next one here). Every token of the document but its first is therefore predicted
exactly once, and a document is used to its end: a long one gives several chunks (its last one shorter), a short
one a single short chunk. A document of one token without a leading special token has nothing to predict and is
skipped (counted).

A chunk travels as an :class:`~seqcpo.types.Example` whose ``prefix_ids`` is its first token and whose
``continuation_ids`` are the rest: the MLE term, which covers every predicted token of the chunk, is then the
continuation's, and the trainer's token counts (:func:`seqcpo.batching.target_tokens`) are the chunk's. Its id is
the record's id for chunk 0 and ``"<id>#<c>"`` after, so (document, chunk) names it everywhere: the anchors and
the negatives at them are seeded by it (:mod:`seqcpo.document_rows`), and a streamed run resumes at a chunk as it
resumes at a window.

Several chunks of a micro-batch run packed end to end in one sequence, attention never crossing from one
chunk into another (:mod:`seqcpo.document_rows`), so short documents are trained together without padding and
without seeing each other.
"""

from __future__ import annotations

from typing import Any

from seqcpo.data.config import DataConfig, DataError
from seqcpo.data.fields import _tokenize, leading_special_ids, text_records
from seqcpo.data.sources import Record
from seqcpo.types import Example


def document_limits(cfg: DataConfig, tokenizer: Any, context_tokens: int | None = None) -> int:
    """Body tokens per chunk, ``max_length`` minus the leading special tokens; :class:`DataError` when
    ``max_length`` exceeds the context (the model's ``max_position_embeddings`` or ``max_context_tokens``)."""
    lead = len(leading_special_ids(tokenizer)) if tokenizer is not None else 0
    limits = [v for v in (cfg.max_context_tokens, context_tokens) if v]
    if limits and cfg.max_length > min(limits):
        raise DataError(
            f"max_length={cfg.max_length} does not fit the context of {min(limits)} tokens (the model's "
            "max_position_embeddings or max_context_tokens); lower max_length"
        )
    if cfg.max_length - lead < cfg.continuation_tokens:
        raise DataError(
            f"max_length={cfg.max_length} leaves {cfg.max_length - lead} tokens after the {lead} leading special "
            f"token(s), fewer than continuation_tokens={cfg.continuation_tokens}; raise max_length"
        )
    return cfg.max_length - lead


def document_pairs(records: list[Record], cfg: DataConfig, tokenizer: Any, source: str,
                   context_tokens: int | None, decode: bool):
    """(record, its chunk examples) for every record that gives a chunk, in order, and the counts."""
    width = document_limits(cfg, tokenizer, context_tokens)
    total = len(records)
    records, values, bad = text_records(records, cfg)
    token_lists = _tokenize(tokenizer, [text for text, _ in values])
    lead = leading_special_ids(tokenizer)
    pairs: list[tuple[Record, list[Example]]] = []
    skipped = chunks = tokens = long_docs = 0
    for record, ids, (_, category) in zip(records, token_lists, values):
        group = []
        for c, row in enumerate(_chunks(lead, ids, width, cfg.max_length)):
            meta = {
                "id": record.id if c == 0 else f"{record.id}#{c}",
                "category": category,
                "source": source,
                "chunk": c,
            }
            group.append(Example(prefix_ids=row[:1], continuation_ids=row[1:], meta=meta))
            tokens += len(row)
        if not group:
            skipped += 1
            continue
        long_docs += len(group) > 1
        chunks += len(group)
        pairs.append((record, group))
    if decode:
        examples = [e for _, g in pairs for e in g]
        texts = tokenizer.batch_decode([e.prefix_ids + e.continuation_ids for e in examples], skip_special_tokens=True)
        for ex, text in zip(examples, texts):
            ex.meta["prompt"] = text
            ex.meta["reference"] = ""
    stats = {
        "records": total,
        "skipped_bad": bad,
        "skipped_short": skipped,
        "examples": chunks,
        "row_tokens": tokens,
        "documents_chunked": long_docs,
    }
    return pairs, stats


def _chunks(lead: list[int], ids: list[int], width: int, max_length: int) -> list[list[int]]:
    """The rows of one document (see the module docstring): ``lead + ids[:width]``, then windows of
    ``max_length`` tokens that each start on the last token of the one before; none with fewer than 2 tokens."""
    rows = [lead + ids[:width]] if len(lead) + len(ids[:width]) >= 2 else []
    start = width  # the first token no row has predicted yet
    while start < len(ids):
        rows.append(ids[start - 1:start - 1 + max_length])
        start += max_length - 1
    return rows


def no_documents_error(source: str, n_records: int) -> DataError:
    return DataError(f"{source}: no usable document rows: all {n_records} documents are empty or one token long")
