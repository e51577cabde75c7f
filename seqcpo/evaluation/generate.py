"""Continuations from saved checkpoints, written to a resumable JSONL file.

Each row is one (example, model, decoding) triple::

    {"id", "model", "decoding", "prompt", "judge_prompt", "reference", "generation", "category",
     "num_tokens", "stopped", "model_path", "config"}

``prompt`` is the prefix as the model saw it; ``judge_prompt`` what a judge is shown (the bare
instruction and context for instruction data, else the prefix).

``model`` is the model's label, ``decoding`` the config's name, ``config`` all its fields. ``num_tokens``
counts the generated tokens (eos excluded), ``stopped`` says whether eos ended the text before
``max_new_tokens``. Rows already in the file (keyed by id + model + decoding) are skipped, so an
interrupted run resumes where it stopped; a half-written last line left by a crash is dropped. Resuming
with a config of the same name but other settings (say another ``max_new_tokens``) is an error.

Decoding configurations are written as compact specs (:func:`parse_decoding`)::

    greedy                   sample:t=0.7,p=0.9      beam:n=4      topk:k=50      sample:t=1.0,m=128,s=3

Keys: ``t`` temperature, ``p`` top-p, ``k`` top-k, ``n`` beams, ``m`` max new tokens, ``s`` seed.
Sampling is seeded per batch from (seed, ids in the batch), so a rerun of the same batch reproduces it.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from seqcpo.decoding import DecodingConfig
from seqcpo.padding import pad_batch
from seqcpo.types import Example

logger = logging.getLogger(__name__)

_KEY_ALIASES = {
    "t": "temperature",
    "temperature": "temperature",
    "p": "top_p",
    "top_p": "top_p",
    "k": "top_k",
    "top_k": "top_k",
    "n": "num_beams",
    "num_beams": "num_beams",
    "m": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "s": "seed",
    "seed": "seed",
}


def parse_decoding(spec: str, max_new_tokens: int = 64, seed: int = 0) -> DecodingConfig:
    """Parse a compact decoding spec into a :class:`DecodingConfig`.

    >>> parse_decoding("sample:t=0.7,p=0.9")
    DecodingConfig(strategy='sample', temperature=0.7, top_k=0, top_p=0.9, num_beams=1, temperatures=None, max_new_tokens=64, seed=0, name='sample:t=0.7,p=0.9')
    >>> parse_decoding("beam:n=4").num_beams
    4
    >>> parse_decoding("topk:k=50").top_k
    50
    """
    spec = spec.strip()
    head, _, tail = spec.partition(":")
    head = head.strip().lower()
    fields: dict[str, Any] = {"max_new_tokens": max_new_tokens, "seed": seed}
    if head in ("greedy", "sample", "beam"):
        fields["strategy"] = head
    elif head == "topk":
        fields["strategy"] = "sample"
    elif head in ("topp", "nucleus"):
        fields["strategy"] = "sample"
    else:
        raise ValueError(f"unknown decoding {head!r} in {spec!r}; use greedy, sample, beam, topk or topp")
    fields["num_beams"] = 4 if head == "beam" else 1
    for part in filter(None, (p.strip() for p in tail.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _KEY_ALIASES:
            raise ValueError(f"bad option {part!r} in decoding {spec!r}; keys: t, p, k, n, m, s")
        name = _KEY_ALIASES[key]
        fields[name] = float(value) if name in ("temperature", "top_p") else int(value)
    if head == "topk" and fields.get("top_k", 0) == 0:
        raise ValueError(f"{spec!r}: topk needs k=K")
    if head in ("topp", "nucleus") and "top_p" not in fields:
        raise ValueError(f"{spec!r}: {head} needs p=P")
    return DecodingConfig(name=spec, **fields)


# ----------------------------------------------------------------------------- checkpoints


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer_only(path: str):
    """The tokenizer of a checkpoint folder or name (via :mod:`seqcpo.models` when importable)."""
    try:
        from seqcpo.models import load_tokenizer
    except ImportError:  # seqcpo.models absent: plain transformers
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return load_tokenizer(path)


def load_checkpoint(path: str, dtype: str = "float32", device: str | None = None, tokenizer_path: str | None = None):
    """Load (model, tokenizer) from a checkpoint folder or name, in eval mode on ``device``.

    Uses :mod:`seqcpo.models` (which knows the embedded default and GGUF conversions) when it is
    importable, plain ``transformers`` otherwise.
    """
    try:
        from seqcpo.models import load_model
    except ImportError:  # seqcpo.models absent: plain transformers
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    else:
        model = load_model(path, dtype=dtype)
    tokenizer = load_tokenizer_only(tokenizer_path or path)
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's eos plus the model's ``generation_config`` eos
    ids (chat models often stop on an end-of-turn token that is not the tokenizer's eos)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists. Returns input_ids (B, T) and attention_mask (B, T)."""
    return pad_batch(seqs, pad_id, side="left")


# ----------------------------------------------------------------------------- the JSONL file


def _row_key(row: dict) -> tuple[str, str, str]:
    return (str(row["id"]), str(row["model"]), str(row["decoding"]))


def read_generations(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Read a generations JSONL file. A torn last line (crash mid-write) is skipped, and cut off the file
    when ``repair``; an unreadable line elsewhere is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    good_end = 0  # byte offset just past the last complete, parseable line
    offset = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        end = offset + len(line) + (0 if is_last else 1)
        if line.strip():
            try:
                rows.append(json.loads(line))
                if not is_last:
                    good_end = end
            except json.JSONDecodeError:
                if is_last:
                    logger.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                else:
                    logger.warning("%s: skipping unreadable line %d", path, i + 1)
                    good_end = end
        elif not is_last:
            good_end = end
        offset = end
    if repair:
        tail = data[good_end:]
        if tail.strip():
            try:
                json.loads(tail)
                # complete last row without its newline: finish the line rather than drop the row
                with open(path, "ab") as f:
                    f.write(b"\n")
            except json.JSONDecodeError:
                with open(path, "r+b") as f:
                    f.truncate(good_end)
        elif tail:
            with open(path, "r+b") as f:
                f.truncate(good_end)
    return rows


def _append_rows(path: Path, rows: Iterable[dict]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def example_texts(example: Example, tokenizer) -> tuple[str, str]:
    """(prompt, reference) text of an example: from ``meta`` when the data source rendered them."""
    meta = example.meta or {}
    prompt = meta.get("prompt")
    if prompt is None:
        prompt = tokenizer.decode(example.prefix_ids, skip_special_tokens=True)
    reference = meta.get("reference")
    if reference is None:
        reference = tokenizer.decode(example.continuation_ids, skip_special_tokens=True)
    return prompt, reference


def judge_prompt_text(example: Example, prompt: str) -> str:
    """What the judge sees as the prompt: the raw instruction (+ context) of an instruction example, so
    that template or chat markup of the evaluated model does not reach the judge; else the prefix text."""
    meta = example.meta or {}
    instruction = meta.get("instruction")
    if not instruction:
        return prompt
    context = meta.get("context")
    return f"{instruction}\n\n{context}" if context else instruction


def example_id(example: Example, index: int) -> str:
    meta = example.meta or {}
    return str(meta.get("id", index))


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_batch(model, prefix_ids: Sequence[Sequence[int]], config: DecodingConfig, pad_id: int,
                   eos_ids: int | Sequence[int] | None) -> list[list[int]]:
    """Generate one batch. Returns the new token ids of each row, cut at the first eos (eos excluded)."""
    if eos_ids is None:
        eos_ids = []
    elif isinstance(eos_ids, int):
        eos_ids = [eos_ids]
    stop = set(eos_ids)
    from transformers import GenerationConfig as HFGenerationConfig

    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prefix_ids, pad_id)  # (B, T), (B, T)
    hf_config = HFGenerationConfig(
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids) or None,
        **config.generate_kwargs(),
    )
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=hf_config,
    )  # (B, T + new)
    new = out[:, input_ids.shape[1]:].tolist()
    results = []
    for row in new:
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        results.append(row[:cut])
    return results


def generate_continuations(
    model_path: str,
    examples: Sequence[Example],
    configs: Sequence[DecodingConfig],
    out_path: str | os.PathLike,
    batch_size: int = 16,
    model_label: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> list[dict]:
    """Generate a continuation of every example under every config and append the rows to ``out_path``.

    Rows already present for (id, model_label, config.name) are kept and not regenerated. The model is
    loaded only when something is left to generate. Returns the rows of this model for the requested
    examples and configs (config-major, then example order), old and new.
    """
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    label = model_label or str(model_path)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"decoding names must be unique, got {names}")
    done = {_row_key(r): r for r in read_generations(out_path, repair=True)}
    ids = [example_id(ex, i) for i, ex in enumerate(examples)]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids (meta['id']) must be unique to key the generation file")

    for c in configs:  # a resumed file must have been made with the same settings
        wanted = asdict(c)
        for i in range(len(examples)):
            old = done.get((ids[i], label, c.name))
            if old is not None and old.get("config", wanted) != wanted:
                raise ValueError(
                    f"{out_path} already holds {label!r} / {c.name!r} rows made with {old['config']}, not {wanted}; "
                    "write to a new file (--out) or give this run another decoding name or model label"
                )
    todo = [(c, i) for c in configs for i in range(len(examples)) if (ids[i], label, c.name) not in done]
    if todo:
        model, tokenizer = model_and_tokenizer or load_checkpoint(model_path, dtype=dtype, device=device)
        pad_id, eos_ids = pad_id_of(tokenizer), eos_ids_of(model, tokenizer)
        bar = tqdm(total=len(todo), desc=f"generate {label}", unit="ex", disable=not progress)
        for config in configs:
            pending = [i for c, i in todo if c is config]
            pending.sort(key=lambda i: -len(examples[i].prefix_ids))  # similar lengths share a batch
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                if config.strategy == "sample":
                    salt = zlib.crc32("\x00".join(ids[i] for i in batch).encode())
                    torch.manual_seed((config.seed * 1_000_003 + salt) % (2**63))
                new_ids = generate_batch(model, [examples[i].prefix_ids for i in batch], config, pad_id, eos_ids)
                rows = []
                for i, gen in zip(batch, new_ids):
                    prompt, reference = example_texts(examples[i], tokenizer)
                    rows.append({
                        "id": ids[i],
                        "model": label,
                        "decoding": config.name,
                        "prompt": prompt,
                        "judge_prompt": judge_prompt_text(examples[i], prompt),
                        "reference": reference,
                        "generation": tokenizer.decode(gen, skip_special_tokens=True),
                        "category": (examples[i].meta or {}).get("category"),
                        "num_tokens": len(gen),
                        "stopped": len(gen) < config.max_new_tokens,
                        "model_path": str(model_path),
                        "config": asdict(config),
                    })
                _append_rows(out_path, rows)
                for r in rows:
                    done[_row_key(r)] = r
                bar.update(len(batch))
        bar.close()
    return [done[(ids[i], label, c.name)] for c in configs for i in range(len(examples))]
