"""Fixed negatives made once, before training (``seqcpo negatives``), with their reference log-probs.

A fixed negative's reference log-prob never changes (PAPER.md), so it is computed here once and training
needs no reference model at all (reference ``precomputed``).

Folder layout::

    manifest.json        what was made (model, data, generators, K, ranked) and the shard plan
    shard-00000.jsonl    one row per example: id, negatives, valid, scores, sources, ref_logps (K+1, gold first)
    ...

Every shard is written atomically when it is complete, so an interrupted run resumes at the first missing
shard and never leaves a half-written one. A folder made with other settings is refused, not overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from seqcpo.io import atomic_write_json, atomic_write_jsonl
from seqcpo.negatives import build_negative_generator, uses_gold_logits
from seqcpo.reference import FrozenCopyReference
from seqcpo.types import Example

FORMAT_VERSION = 1


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def offline_settings(cfg, num_examples: int) -> dict[str, Any]:
    """What determines the negatives; a folder is reused only when all of it matches."""
    data = cfg.data_config()
    return {
        "format": FORMAT_VERSION,
        "model": cfg.model_name_or_path,
        "data": {k: v for k, v in vars(data).items()},
        "negatives": cfg.negatives,
        "k": cfg.num_negatives,
        "ranked": cfg.ranked,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.negative_options(offline=True).items()},
        "seed": cfg.seed,
        "batch_size": cfg.per_device_train_batch_size,
        "length_normalize": cfg.length_normalize,
        "num_examples": num_examples,
    }


def make_offline_negatives(
    cfg, examples: list[Example], model, tokenizer, out_dir: str, shard_size: int = 256, progress: bool = True
) -> dict[str, Any]:
    """Make K negatives and reference log-probs for every example into ``out_dir``; resumes a partial run.

    ``model`` is the reference (the starting model); it makes AN/MN negatives and scores all candidates.
    Batch negatives are drawn within batches of ``per_device_train_batch_size`` consecutive examples.
    """
    from seqcpo.batching import candidate_batch
    from seqcpo.seeding import example_generators

    os.makedirs(out_dir, exist_ok=True)
    settings = offline_settings(cfg, len(examples))
    fp = _fingerprint(settings)
    manifest_path = os.path.join(out_dir, "manifest.json")
    n_shards = max(1, -(-len(examples) // shard_size))
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            old = json.load(fh)
        if old.get("fingerprint") != fp:
            raise ValueError(
                f"{out_dir} holds negatives made with other settings (model, data, generators, K or seed differ); "
                "choose a new folder or delete this one"
            )
    manifest = {
        "fingerprint": fp,
        "settings": settings,
        "has_ref_logps": True,
        "num_shards": n_shards,
        "shard_size": shard_size,
        "complete": False,
    }
    atomic_write_json(manifest_path, manifest)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    gen = build_negative_generator(
        cfg.negatives, cfg.num_negatives, model=model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        options=cfg.negative_options(offline=True),
    )
    # MN draws from the reference's own gold-branch pass (seqcpo.two_pass) unless a one-pass layout is forced
    fuse_mn = uses_gold_logits(gen) and cfg.logps_layout in ("auto", "two_pass")
    ref = FrozenCopyReference(
        model, copy_model=False, layout=cfg.logps_layout, pad_token_id=pad,
        length_normalize=cfg.length_normalize,
        chunk_size=cfg.logits_chunk_size,
    )
    bs = cfg.per_device_train_batch_size
    todo = [s for s in range(n_shards) if not os.path.exists(_shard_path(out_dir, s))]
    bar = tqdm(total=len(examples), desc="negatives", disable=not progress, initial=(n_shards - len(todo)) * shard_size)
    for s in todo:
        shard = examples[s * shard_size : (s + 1) * shard_size]
        rows = []
        for i in range(0, len(shard), bs):
            chunk = shard[i : i + bs]
            # each example's own draws, as in training's epoch 0 (seqcpo.seeding): shard size and order do not matter
            rng = example_generators(cfg.seed, [str(e.meta.get("id")) for e in chunk], 0, "negatives")
            if fuse_mn:
                gp = ref.gold_pass([e.prefix_ids for e in chunk], [e.continuation_ids for e in chunk])
                neg = gen(chunk, cfg.num_negatives, rng, ranked=cfg.ranked, gold_logits=gp.gold_logits)
                ref_logps = ref.finish(gp, neg.ids).cpu()
            else:
                neg = gen(chunk, cfg.num_negatives, rng, ranked=cfg.ranked)
                with torch.no_grad():
                    ref_logps = ref.logps(candidate_batch(chunk, neg)).cpu()
            for j, ex in enumerate(chunk):
                rows.append(
                    {
                        "id": str(ex.meta.get("id")),
                        "negatives": neg.ids[j],
                        "valid": neg.valid[j],
                        "scores": neg.scores[j] if neg.scores is not None else None,
                        "sources": neg.sources[j],
                        "ref_logps": [round(float(x), 6) for x in ref_logps[j].tolist()],
                    }
                )
            bar.update(len(chunk))
        atomic_write_jsonl(_shard_path(out_dir, s), rows)
    bar.close()
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return manifest


def _shard_path(out_dir: str, s: int) -> str:
    return os.path.join(out_dir, f"shard-{s:05d}.jsonl")


def read_offline_negatives(path: str, cfg) -> tuple[dict[str, dict], dict[str, Any]]:
    """Load a finished negatives folder for training, checking it fits the training config."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
        raise ValueError(f"negatives_path {path}: no manifest.json; make the folder with `seqcpo negatives`")
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if not manifest.get("complete"):
        raise ValueError(f"negatives_path {path}: incomplete; run `seqcpo negatives` again to finish it (it resumes)")
    st = manifest["settings"]
    if st["k"] != cfg.num_negatives:
        raise ValueError(f"negatives_path {path} has K = {st['k']} negatives per example but num_negatives = {cfg.num_negatives}")
    if cfg.ranked and not st["ranked"]:
        raise ValueError(
            f"negatives_path {path} was made unranked; objective cpo_ranked needs ranked negatives: re-make them "
            "with --objective cpo_ranked"
        )
    if st.get("length_normalize") != cfg.length_normalize and cfg.reference in ("auto", "precomputed"):
        raise ValueError(
            f"negatives_path {path}: its reference log-probs were computed with length_normalize="
            f"{st.get('length_normalize')}; set the same, or use reference frozen_copy"
        )
    expected = offline_settings(cfg, st.get("num_examples", 0))
    for key in ("model", "data", "negatives", "options", "seed"):
        if json.loads(json.dumps(expected[key])) != st.get(key):
            raise ValueError(
                f"negatives_path {path} was made with another {key} ({st.get(key)!r}) than this run's "
                f"({expected[key]!r}); its reference log-probs would not match. Re-make it with `seqcpo negatives`"
            )
    rows: dict[str, dict] = {}
    for s in range(manifest["num_shards"]):
        sp = _shard_path(path, s)
        with open(sp, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{sp} line {n}: not valid JSON ({e.msg})") from None
                rows[r["id"]] = r
    return rows, manifest
