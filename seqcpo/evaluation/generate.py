"""Continuations from saved checkpoints, written to a resumable JSONL file.

Each row is one (example, model, decoding) triple::

    {"id", "model", "decoding", "prompt", "judge_prompt", "reference", "generation", "category",
     "num_tokens", "stopped", "prompt_tokens_cut", "model_path", "checkpoint", "inputs_sha256", "config"}

``prompt`` is the prefix as the model saw it; ``judge_prompt`` what a judge is shown (the bare
instruction and context for instruction data, else the prefix).

``model`` is the model's label, ``decoding`` the config's name, ``config`` all its fields. ``num_tokens``
counts the generated tokens (eos excluded), ``stopped`` says whether eos ended the text before
``max_new_tokens``.

**Resume.** Rows already in the file (keyed by id + model + decoding) are skipped, so an interrupted run
resumes where it stopped; a half-written last line left by a crash is dropped. A row is reused only when
everything that decides its content matches: ``checkpoint`` (the content identity of the weights, config and
tokenizer, :func:`seqcpo.evaluation.checkpoints.checkpoint_identity`, not the label or path),
``inputs_sha256`` (the example's token ids, so another split, data file, template or length limit does not
match) and ``config`` (the decoding, its length limit and seed). Rows of the same label made from another
checkpoint or other inputs are stale: they are moved to ``<out>.stale.jsonl`` (kept, never mixed with the
new ones) and generated again, with a warning. A decoding of the same name with other settings (say another
``max_new_tokens``) is an error: rename the decoding or write to another file.

**Sample-exact.** Every sampled row draws from its own generator, seeded by (decoding settings, example id,
sample index) (:func:`sample_seed`); its tokens do not depend on the batch it was generated in, on the
rows before it or on an interruption, so a resumed run writes the rows an uninterrupted run writes.

**Context.** A prompt that does not leave room for ``max_new_tokens`` in the model's context keeps its last
``context - max_new_tokens`` tokens (the end of a prompt is what the continuation follows); the number of
tokens cut is the row's ``prompt_tokens_cut`` and the count of cut prompts is logged. A ``max_new_tokens``
that alone fills the context is an error before anything is generated.

Decoding configurations are written as compact specs (:func:`parse_decoding`)::

    greedy                   sample:t=0.7,p=0.9      beam:n=4      topk:k=50      sample:t=1.0,m=128,s=3

Keys: ``t`` temperature, ``p`` top-p, ``k`` top-k, ``n`` beams, ``m`` max new tokens, ``s`` seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from seqcpo.decoding import DecodingConfig
from seqcpo.evaluation.checkpoints import checkpoint_identity, context_length, load_checkpoint, pad_id_of
from seqcpo.evaluation.generations_file import (  # noqa: F401  (read_generations: re-exported)
    _append_rows,
    _move_stale,
    _row_key,
    _stale_rows,
    read_generations,
)
from seqcpo.padding import pad_batch
from seqcpo.sampling import filter_logits, sample_rows
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


# what a strategy does not read: given in a spec, it would be ignored without a word
_UNUSED_BY = {"greedy": ("temperature", "top_p", "top_k", "num_beams", "seed"),
              "beam": ("temperature", "top_p", "top_k", "seed"), "sample": ("num_beams",)}


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
    given: set[str] = set()
    for part in filter(None, (p.strip() for p in tail.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _KEY_ALIASES:
            raise ValueError(f"bad option {part!r} in decoding {spec!r}; keys: t, p, k, n, m, s")
        name = _KEY_ALIASES[key]
        if name in given:
            raise ValueError(f"{key} in decoding {spec!r}: {name} is given twice")
        if name in _UNUSED_BY[fields["strategy"]]:
            raise ValueError(f"{key} in decoding {spec!r}: {head} decoding does not use {name}")
        given.add(name)
        try:
            fields[name] = float(value) if name in ("temperature", "top_p") else int(value)
        except ValueError:
            kind = "a number" if name in ("temperature", "top_p") else "an integer"
            raise ValueError(f"{key}={value.strip()!r} in decoding {spec!r}: {name} must be {kind}") from None
    if head == "topk" and fields.get("top_k", 0) == 0:
        raise ValueError(f"{spec!r}: topk needs k=K")
    if head in ("topp", "nucleus") and "top_p" not in fields:
        raise ValueError(f"{spec!r}: {head} needs p=P")
    for name in ("temperature", "top_p"):  # NaN and inf pass some range checks; no decoding means them
        if name in fields and not math.isfinite(fields[name]):
            raise ValueError(f"{spec!r}: {name} must be a finite number, got {fields[name]}")
    return DecodingConfig(name=spec, **fields)


# ----------------------------------------------------------------------------- tokens


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


def sample_seed(config: DecodingConfig, example_id: str, sample_index: int = 0) -> int:
    """The seed of one sampled continuation: SHA-256 of (the decoding's settings, the example id, the sample
    index), 63 bits. Not the model label nor the batch, so a resumed or relabelled run draws the same tokens."""
    settings = {k: v for k, v in asdict(config).items() if k != "name"}
    blob = json.dumps([settings, str(example_id), int(sample_index)], sort_keys=True)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "little") >> 1


def inputs_sha256(example: Example) -> str:
    """SHA-256 of an example's prefix and gold token ids: the inputs a generation row was made from."""
    blob = json.dumps([list(map(int, example.prefix_ids)), list(map(int, example.continuation_ids))])
    return hashlib.sha256(blob.encode()).hexdigest()


class RowSampler:
    """A logits processor that samples every row from its own generator and returns one-hot logits, so that
    ``model.generate`` in greedy mode takes exactly the drawn token.

    Each step: logits / temperature, then top-k, then top-p (:func:`seqcpo.sampling.filter_logits`, the order
    of transformers' warpers), softmax, and one uniform per row from that row's generator, mapped through the
    inverse CDF (:func:`seqcpo.sampling.sample_rows`). A row draws one uniform per step whatever the other rows
    do, so its tokens depend on its own seed and logits only.
    """

    def __init__(self, config: DecodingConfig, seeds: Sequence[int]):
        self.config = config
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = filter_logits(scores.float() / self.config.temperature, self.config.top_k, self.config.top_p)
        picked = sample_rows(logits.softmax(-1), self.generators, [1] * len(self.generators))  # (B,)
        out = torch.full_like(scores, float("-inf"))  # (B, V): only the drawn token is finite
        return out.scatter_(1, picked.unsqueeze(1), 0.0)


@torch.no_grad()
def generate_batch(model, prefix_ids: Sequence[Sequence[int]], config: DecodingConfig, pad_id: int,
                   eos_ids: int | Sequence[int] | None, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Generate one batch. Returns the new token ids of each row, cut at the first eos (eos excluded).

    Sampling (``config.strategy == "sample"``) draws row ``b`` from a generator seeded with ``seeds[b]``
    (default: :func:`sample_seed` of the row index).
    """
    if eos_ids is None:
        eos_ids = []
    elif isinstance(eos_ids, int):
        eos_ids = [eos_ids]
    stop = set(eos_ids)
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prefix_ids, pad_id)  # (B, T), (B, T)
    processors = LogitsProcessorList()
    kwargs = config.generate_kwargs()
    if config.strategy == "sample":
        seeds = list(seeds) if seeds is not None else [sample_seed(config, str(b)) for b in range(len(prefix_ids))]
        processors.append(RowSampler(config, seeds))
        kwargs = {"do_sample": False, "num_beams": 1}  # RowSampler draws; greedy then takes its one token
    hf_config = HFGenerationConfig(
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids) or None,
        **kwargs,
    )
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=hf_config,
        logits_processor=processors,
    )  # (B, T + new)
    new = out[:, input_ids.shape[1]:].tolist()
    results = []
    for row in new:
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        results.append(row[:cut])
    return results


def generation_summary(rows: Sequence[dict]) -> dict:
    """What a report records of one model's rows under one decoding: the checkpoint identities they were made
    from (one, unless the caller mixed files), how many prompts were cut to the context, the mean length.

    >>> generation_summary([{"checkpoint": "sha256:ab", "prompt_tokens_cut": 3, "num_tokens": 4},
    ...                     {"checkpoint": "sha256:ab", "prompt_tokens_cut": 0, "num_tokens": 2}])
    {'checkpoint': 'sha256:ab', 'prompts_cut': 1, 'mean_tokens': 3.0}
    """
    ids = sorted({str(r.get("checkpoint")) for r in rows})
    return {"checkpoint": ids[0] if len(ids) == 1 else ids,
            "prompts_cut": sum(1 for r in rows if r.get("prompt_tokens_cut")),
            "mean_tokens": sum(r.get("num_tokens", 0) for r in rows) / max(1, len(rows))}


def fit_prompt(prefix_ids: Sequence[int], max_new_tokens: int, context: int | None) -> tuple[list[int], int]:
    """The prompt cut to its last ``context - max_new_tokens`` tokens, and how many tokens were cut.

    >>> fit_prompt([1, 2, 3, 4, 5], 2, 5)
    ([3, 4, 5], 2)
    >>> fit_prompt([1, 2], 2, None)
    ([1, 2], 0)
    """
    ids = list(prefix_ids)
    if context is None or len(ids) + max_new_tokens <= context:
        return ids, 0
    keep = context - max_new_tokens
    return ids[len(ids) - keep:], len(ids) - keep


@dataclass
class _Run:
    """One model generating the rows still missing from a generations file."""

    model: Any
    tokenizer: Any
    examples: Sequence[Example]
    ids: list[str]
    inputs: list[str]
    label: str
    model_path: str
    ckpt: str
    out_path: Path

    def row(self, i: int, config: DecodingConfig, gen: list[int], cut: int) -> dict:
        ex = self.examples[i]
        prompt, reference = example_texts(ex, self.tokenizer)
        return {"id": self.ids[i], "model": self.label, "decoding": config.name, "prompt": prompt,
                "judge_prompt": judge_prompt_text(ex, prompt), "reference": reference,
                "generation": self.tokenizer.decode(gen, skip_special_tokens=True),
                "category": (ex.meta or {}).get("category"), "num_tokens": len(gen),
                "stopped": len(gen) < config.max_new_tokens, "prompt_tokens_cut": cut,
                "model_path": self.model_path, "checkpoint": self.ckpt, "inputs_sha256": self.inputs[i],
                "config": asdict(config)}

    def generate(self, configs, todo, batch_size: int, done: dict, progress: bool) -> None:
        """Generate ``todo`` ((config, example index) pairs) in batches of similar prompt lengths, appending each
        batch's rows to the file (and to ``done``) as it finishes."""
        from tqdm.auto import tqdm

        pad_id, eos_ids = pad_id_of(self.tokenizer), eos_ids_of(self.model, self.tokenizer)
        context = context_length(self.model)
        for config in configs:
            if context is not None and config.max_new_tokens >= context:
                raise ValueError(f"decoding {config.name!r}: max_new_tokens={config.max_new_tokens} leaves no room "
                                 f"for a prompt in the context of {self.model_path} ({context} positions)")
        cut_prompts = 0
        bar = tqdm(total=len(todo), desc=f"generate {self.label}", unit="ex", disable=not progress)
        for config in configs:
            pending = [i for c, i in todo if c is config]
            pending.sort(key=lambda i: -len(self.examples[i].prefix_ids))  # similar lengths share a batch
            for start in range(0, len(pending), batch_size):
                batch = pending[start:start + batch_size]
                fitted = [fit_prompt(self.examples[i].prefix_ids, config.max_new_tokens, context) for i in batch]
                seeds = [sample_seed(config, self.ids[i]) for i in batch]
                new_ids = generate_batch(self.model, [f for f, _ in fitted], config, pad_id, eos_ids, seeds=seeds)
                rows = [self.row(i, config, gen, cut) for i, gen, (_, cut) in zip(batch, new_ids, fitted)]
                cut_prompts += sum(cut > 0 for _, cut in fitted)
                _append_rows(self.out_path, rows)
                done.update((_row_key(r), r) for r in rows)
                bar.update(len(batch))
        bar.close()
        if cut_prompts:
            logger.warning("%s: %d of %d prompt(s) did not fit the context of %d positions with max_new_tokens; "
                           "kept their last tokens (rows' prompt_tokens_cut)", self.label, cut_prompts, len(todo),
                           context)


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
    checkpoint_id: str | None = None,
) -> list[dict]:
    """Generate a continuation of every example under every config and append the rows to ``out_path``.

    Rows already present for (id, model_label, config.name) are kept and not regenerated when they were
    made from the same checkpoint identity (``checkpoint_id``, default :func:`checkpoint_identity` of
    ``model_path``) and the same inputs; stale ones are moved aside and regenerated (module docstring). The
    model is loaded only when something is left to generate. Returns the rows of this model for the
    requested examples and configs (config-major, then example order), old and new.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    label = model_label or str(model_path)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"decoding names must be unique, got {names}")
    ids = [example_id(ex, i) for i, ex in enumerate(examples)]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids (meta['id']) must be unique to key the generation file")
    ckpt = checkpoint_id or checkpoint_identity(model_path)
    inputs = [inputs_sha256(ex) for ex in examples]
    done = {_row_key(r): r for r in read_generations(out_path, repair=True)}

    stale, reasons = _stale_rows(done, configs, ids, inputs, label, ckpt, out_path)
    if stale:
        _move_stale(out_path, stale, " and ".join(sorted(reasons)) + f", not {model_path} ({ckpt}) on these inputs")
        for key in stale:
            del done[key]
    todo = [(c, i) for c in configs for i in range(len(examples)) if (ids[i], label, c.name) not in done]
    if todo:
        model, tokenizer = model_and_tokenizer or load_checkpoint(model_path, dtype=dtype, device=device)
        run = _Run(model, tokenizer, examples, ids, inputs, label, str(model_path), ckpt, out_path)
        run.generate(configs, todo, batch_size, done, progress)
    return [done[(ids[i], label, c.name)] for c in configs for i in range(len(examples))]
