"""Fixed negatives made once, before training (``seqcpo negatives``), with their reference log-probs.

A fixed negative's reference log-prob never changes (docs/method.md), so it is computed here once and training
needs no reference model at all (reference ``precomputed``).

Folder layout::

    manifest.json                         settings, fingerprint, shard plan; ``complete`` and the shard list
                                          (each shard's rows and sha256) last
    shard-<plan>-00000-of-00003.parquet   one row per example (columns below), ``shard_size`` rows per shard
    ...

Columns: ``id`` (string), ``prefix_ids`` and ``gold_ids`` (list<int32>), ``negatives`` (K token-id lists),
``valid`` (K bools), ``scores`` (K floats or null), ``sources`` (K generator names), ``ref_logps`` (K+1
float64, gold first). ``datasets.load_dataset("parquet", data_files=...)`` reads the shards.

Many processes (``accelerate launch -m seqcpo.cli negatives ...``): shard ``s`` is made by rank
``s % world_size``; every example draws from its own generator (``seqcpo.seeding.example_generators(seed, id,
epoch 0)``), so the rows are the same for any number of processes and any shard size (BN excepted: it draws
from the batch, which is why batch and shard size are in the plan). For windows (not document rows), when every
negative draws per example (AN, TN, data; not BN or MN), AN decodes ``an_batch_size`` prefixes of consecutive
batches in one call (``an_batch_size`` x K rows in memory at once), and each batch is then scored alone: each
example draws from its own generator as before, and a decoding step serves more rows. Only the decoding's batch
shape changes, so a token can differ where float rounding of another shape flips a near-tie (none of 64 rows at
SmolLM2-135M, BENCHMARKS.md). A folder begun by an older seqcpo (one batch per call) and resumed by this one holds
shards of both shapes: the same draws, so it is not re-planned. With AN on vLLM each process runs its own engine on its own GPU. Every shard is written atomically, so a killed run resumes at the missing shards. The plan id
``<plan>`` is the fingerprint of everything that decides the content (model, data and its example tokens,
generators, K, seed, batch and shard size, dtype): a resumed run with another shard size or batch size
re-plans (old shards are deleted), one with other model/data/generator settings is refused. Rank 0 marks the
folder complete only after every shard of the plan exists and holds exactly its examples' ids. The settings
hold the content digest of the model's weights (``model_digest``), so a folder made before the model folder's
weights were replaced is refused. A shard that no longer has its recorded sha256 is remade by the same command.
Training reads a folder through :mod:`seqcpo.training.offline_reader`.

Document rows (``task: document``): the folder holds one row per anchor window, keyed ``"<row id>@<a>"``, with the
anchors fixed at each row's epoch-0 draw (:mod:`seqcpo.training.offline_documents`); the shard plan counts rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from seqcpo.batching import negatives_to_offline
from seqcpo.io import atomic_output, atomic_write_json
from seqcpo.models.digest import sha256_file
from seqcpo.negatives import build_negative_generator, uses_gold_logits
from seqcpo.negatives.registry import content_options
from seqcpo.reference import FrozenCopyReference
from seqcpo.types import Example, Negatives

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
# settings that only change how the rows are grouped and drawn, not which model/data they describe: a resume
# that changes only these re-plans the folder instead of refusing it
PLAN_KEYS = ("shard_size", "batch_size")


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 over every example's id and token ids, in order: a data file changed in place changes it."""
    h = hashlib.sha256()
    for ex in examples:
        row = [str(ex.meta.get("id")), ex.prefix_ids, ex.continuation_ids]
        if ex.rejected_ids is not None:  # preference data: the row's own negatives decide the "data" ones
            row += [ex.rejected_ids, ex.scores]
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:16]


def offline_settings(cfg, num_examples: int, shard_size: int | None = None, digest: str | None = None) -> dict[str, Any]:
    """What determines the negatives; a folder is reused only when all of it matches."""
    data = cfg.data_config()
    settings = {
        "format": FORMAT_VERSION,
        "model": cfg.model_name_or_path,
        "model_digest": _model_digest(cfg.model_name_or_path),  # its weights' content: a replaced folder is refused
        "model_dtype": cfg.model_dtype,
        "data": {k: v for k, v in vars(data).items()},
        "examples_digest": digest,
        "negatives": cfg.negatives,
        "k": cfg.num_negatives,
        "ranked": cfg.ranked,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.negative_options(offline=True).items()},
        "seed": cfg.seed,
        "batch_size": cfg.per_device_train_batch_size,
        "shard_size": shard_size,
        "length_normalize": cfg.length_normalize,
        "num_examples": num_examples,
    }
    if getattr(cfg, "reference_dtype", None):  # recorded only when set: folders made without it keep their key
        settings["reference_dtype"] = cfg.reference_dtype
    if getattr(cfg, "task", None) == "document":  # the rule that fixes the anchors (offline_documents.py)
        settings["anchors"] = "fixed: the epoch-0 draw of each row's generator"
    return settings


def _model_digest(name_or_path: str) -> str | None:
    from seqcpo.models import model_digest

    return model_digest(name_or_path)


def settings_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(field, old value, new value)]`` for every leaf where two settings dicts differ (nested keys dotted)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += settings_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def describe_differences(diffs: list[tuple[str, Any, Any]], old_label: str, new_label: str) -> str:
    """One line: ``field: a in the folder, b now; ...`` (long values shortened)."""
    def show(v):
        text = repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    return "; ".join(f"{name}: {show(a)} {old_label}, {show(b)} {new_label}" for name, a, b in diffs)


def shard_name(plan: str, s: int, n_shards: int) -> str:
    return f"shard-{plan}-{s:05d}-of-{n_shards:05d}.parquet"


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema(
        [
            ("id", pa.string()),
            ("prefix_ids", ids),
            ("gold_ids", ids),
            ("negatives", pa.list_(ids)),
            ("valid", pa.list_(pa.bool_())),
            ("scores", pa.list_(pa.float64())),
            ("sources", pa.list_(pa.string())),
            ("ref_logps", pa.list_(pa.float64())),
        ]
    )


def _write_shard(path: str, rows: list[dict]) -> None:
    """Parquet to a temp file beside ``path``, fsynced, then renamed: a reader never sees half a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema())
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, row_group_size=256)


def _shard_ids(path: str) -> list[str] | None:
    """The ``id`` column of a shard, or None when the file is missing or unreadable (torn, foreign)."""
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        return None
    try:
        return [str(x) for x in pq.read_table(path, columns=["id"]).column("id").to_pylist()]
    except Exception:  # any unreadable file is simply remade
        return None


def _read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:  # ValueError: JSON errors and bytes that are not UTF-8
        raise ValueError(f"{path}: unreadable ({e}); delete the folder or choose another --out") from None
    shards = manifest.get("shards", []) if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("settings", {}), dict)
            or not isinstance(shards, list) or not all(isinstance(x, dict) and isinstance(x.get("file"), str)
                                                       for x in shards)):
        raise ValueError(f"{path}: damaged (not the JSON object of a seqcpo negatives manifest, with its settings "
                         "and shards); delete the folder or choose another --out")
    return manifest


def _keep_speed_options(old: dict | None, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the speed-only options (``an_batch_size``) the folder recorded, when it has a manifest:
    they do not change the rows, so a resume (or a check) with other values keeps the folder's shards and
    fingerprint; the manifest records the values the folder was started with."""
    recorded = ((old or {}).get("settings") or {}).get("options")
    if not isinstance(recorded, dict):
        return settings
    opts = content_options(settings["options"])
    recorded_content = content_options(recorded)
    opts.update({k: v for k, v in recorded.items() if k not in recorded_content})
    return {**settings, "options": opts}


def _plan_decision(old: dict | None, settings: dict[str, Any], out_dir: str) -> str:
    """"new", "same" or "replan" for a folder holding ``old`` (its manifest); raises when it must be refused."""
    if old is None:
        return "new"
    old_settings = old.get("settings", {})
    if old_settings.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{out_dir} holds negatives in an older format ({old_settings.get('format')}, JSONL shards); "
            "choose a new --out folder or delete this one"
        )
    if old.get("fingerprint") == _fingerprint(settings):
        return "same"
    differ = sorted(k for k in set(settings) | set(old_settings) if settings.get(k) != old_settings.get(k))
    if all(k in PLAN_KEYS for k in differ):
        return "replan"
    diffs = [d for d in settings_differences(old_settings, settings) if d[0].split(".")[0] not in PLAN_KEYS]
    raise ValueError(
        f"{out_dir} holds negatives made with other settings ({describe_differences(diffs, 'there', 'now')}); "
        "choose a new --out folder or delete this one"
    )


def make_offline_negatives(
    cfg, examples: list[Example], model, tokenizer, out_dir: str, shard_size: int = 256, progress: bool = True
) -> dict[str, Any]:
    """Make K negatives and reference log-probs for every example into ``out_dir``; resumes a partial run.

    ``model`` is the reference (the starting model); it makes AN/MN negatives and scores all candidates.
    Batch negatives are drawn within batches of ``per_device_train_batch_size`` consecutive examples of a shard.
    With ``task: document`` the examples are the training rows: a shard holds the anchor windows of
    ``shard_size`` rows, a batch those of ``per_device_train_batch_size`` rows, one folder row per window
    (:mod:`seqcpo.training.offline_documents`).
    Under ``accelerate launch`` every process makes the shards ``s`` with ``s % world_size == rank``.
    Returns the manifest.
    """
    from accelerate import PartialState

    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size {shard_size!r}: must be an integer >= 1")
    if not examples:
        raise ValueError("seqcpo negatives: the training split is empty; nothing to make")
    owned_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    state = PartialState(cpu=bool(cfg.use_cpu))  # on the GPU(s) unless the config says CPU
    rank, world = state.process_index, state.num_processes
    units = shard_units(cfg, examples)
    os.makedirs(out_dir, exist_ok=True)
    # every rank decides from the same manifest (before rank 0 rewrites it), so all refuse or go on together
    old = _read_manifest(out_dir)
    settings = _keep_speed_options(old, offline_settings(cfg, units.num_rows, shard_size, units.digest()))
    fp = _fingerprint(settings)
    n_shards = -(-units.num_units // shard_size)
    names = [shard_name(fp, s, n_shards) for s in range(n_shards)]
    manifest_path = os.path.join(out_dir, "manifest.json")
    decision = _plan_decision(old, settings, out_dir)
    # a finished folder is returned as is only while every shard still holds its rows (checked by every rank
    # from the files, so all ranks agree); a deleted or damaged shard is remade below
    recorded = _recorded_sha(old) if decision == "same" else {}
    if decision == "same" and old.get("complete") and _shards_hold(units, out_dir, names, shard_size, recorded):
        state.wait_for_everyone()
        return _finish(old, owned_group)
    state.wait_for_everyone()
    manifest = {
        "fingerprint": fp,
        "settings": settings,
        "has_ref_logps": True,
        "num_shards": n_shards,
        "shard_size": shard_size,
        "complete": False,
        "world_size": world,  # of the run that wrote this manifest; the rows do not depend on it
    }
    if state.is_main_process:
        _start_plan(out_dir, manifest, names, replan=decision == "replan")
    state.wait_for_everyone()

    if world > 1 and cfg.negative_options(offline=True).get("an_backend") == "vllm":
        _one_gpu_per_engine(state.local_process_index)
    model.to(state.device)
    model.eval()
    score = units.scorer(cfg, model, tokenizer)
    per_call = getattr(score, "batches_per_call", 1)  # batches whose AN decoding runs together (_chunk_scorer)
    mine = list(range(rank, n_shards, world))
    todo = [s for s in mine if not _shard_ok(out_dir, names[s], _expected_ids(units, s, shard_size), recorded)]
    bar = tqdm(total=sum(len(_expected_ids(units, s, shard_size)) for s in todo), unit="ex",
               desc=f"negatives: examples (rank {rank})", disable=not progress or not state.is_main_process)
    for s in todo:
        rows = []
        batches = units.batches(s * shard_size, (s + 1) * shard_size, cfg.per_device_train_batch_size)
        for i in range(0, len(batches), per_call):
            group = batches[i : i + per_call]
            rows += score.many(group) if per_call > 1 else score(group[0])
            bar.update(sum(len(b) for b in group))
        _write_shard(os.path.join(out_dir, names[s]), rows)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = _verified_manifest(manifest, units, out_dir, names, shard_size)
        atomic_write_json(manifest_path, manifest)
    state.wait_for_everyone()
    return _finish(_read_manifest(out_dir), owned_group)


def _start_plan(out_dir: str, manifest: dict, names: list[str], replan: bool) -> None:
    """Writes the manifest incomplete before any shard changes (a kill from here on never leaves a folder marked
    complete), then deletes the shards of another plan and torn temp files."""
    if replan:
        logger.warning("%s was planned with other shard/batch sizes: discarding its shards and re-planning", out_dir)
    atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
    keep = set(names)
    for f in os.listdir(out_dir):
        stale_shard = f.startswith("shard-") and f.endswith(".parquet") and f not in keep
        if stale_shard or (f.startswith(".shard-") and f.endswith(".tmp")):
            os.remove(os.path.join(out_dir, f))


def _chunk_scorer(cfg, model, tokenizer):
    """``score(chunk) -> rows``: the scoring step (:func:`seqcpo.training.scoring.score_examples`) on one
    batch of consecutive examples, with ``model`` as the reference that makes the AN / MN negatives and scores
    every candidate."""
    from seqcpo.seeding import example_generators
    from seqcpo.training.scoring import mn_source, score_examples

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = build_negative_generator(
        cfg.negatives_parts, cfg.num_negatives, model=model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        options=cfg.negative_options(offline=True),
    )
    ref = FrozenCopyReference(model, copy_model=False, layout=cfg.logps_layout, pad_token_id=pad,
                              length_normalize=cfg.length_normalize, chunk_size=cfg.logits_chunk_size)
    # MN draws from the reference's own gold-branch pass unless a one-pass layout is forced (the trainer's rule)
    source = mn_source(gen, layout=cfg.logps_layout, reference=ref)

    def draws(chunk: list[Example]):
        # each example's own draws, as in training's epoch 0 (seqcpo.seeding): shard size, batch position and
        # number of processes do not change an example's negatives (BN, by definition, depends on its batch)
        return example_generators(cfg.seed, [str(e.meta.get("id")) for e in chunk], 0, "negatives")

    def score(chunk: list[Example], made: Negatives | None = None) -> list[dict]:
        rng = draws(chunk) if made is None else None

        def make(exs, gold_logits=None):
            if made is not None:
                return made
            extra = {"gold_logits": gold_logits} if gold_logits is not None else {}
            return gen(exs, cfg.num_negatives, rng, ranked=cfg.ranked, **extra)

        with torch.no_grad():
            scored = score_examples(chunk, make, ref, source=source)
        return negatives_to_offline(chunk, scored.negatives, scored.ref_logps.float().cpu())

    def many(batches: list[list[Example]]) -> list[dict]:
        """Several batches: their negatives made in one generator call (AN decodes up to ``an_batch_size``
        prefixes together instead of one batch's few), then each batch scored as alone."""
        joined = [e for b in batches for e in b]
        with torch.no_grad():
            made = gen(joined, cfg.num_negatives, draws(joined), ranked=cfg.ranked)
        rows, at = [], 0
        for b in batches:
            rows += score(b, _slice_negatives(made, at, at + len(b)))
            at += len(b)
        return rows

    score.many = many
    score.batches_per_call = _batches_per_call(cfg, gen, source)
    return score


def _batches_per_call(cfg, gen, source: str | None) -> int:
    """How many training batches :func:`_chunk_scorer` hands its generator at once: enough to fill AN's
    ``an_batch_size`` prefixes when every part draws per example (AN, TN, data; not BN, which draws from its
    batch, nor MN, which reads the batch's gold logits), else 1. Each example's negatives come from its own
    generator, so grouping changes the decoding's batch shape, not what is drawn."""
    parts = {name for name, _ in cfg.negatives_parts}
    if "an" not in parts or parts & {"bn", "mn"} or source is not None or uses_gold_logits(gen):
        return 1
    an_prefixes = int(cfg.negative_options(offline=True).get("an_batch_size") or 1)
    return max(1, an_prefixes // max(1, cfg.per_device_train_batch_size))


def _slice_negatives(neg: Negatives, start: int, stop: int) -> Negatives:
    return Negatives(ids=neg.ids[start:stop], valid=neg.valid[start:stop],
                     scores=None if neg.scores is None else neg.scores[start:stop], sources=neg.sources[start:stop])


def _one_gpu_per_engine(local_rank: int) -> None:
    """vLLM's engine runs in a child process on the first visible GPU: show each rank's child only its own
    GPU, so N processes run N engines on N GPUs instead of N engines on GPU 0 (set before the engine starts)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if local_rank < len(devices):
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank]


class WindowUnits:
    """Window examples as :func:`make_offline_negatives` shards them: one unit and one folder row per example,
    batches of consecutive examples. :class:`seqcpo.training.offline_documents.DocumentWindows` is the same view
    of document rows (one unit per row, one folder row per anchor window)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = examples

    @property
    def num_units(self) -> int:
        return len(self.examples)

    num_rows = num_units

    def ids(self, start: int, stop: int) -> list[str]:
        return [str(ex.meta.get("id")) for ex in self.examples[start:stop]]

    def iter_ids(self):
        return (str(ex.meta.get("id")) for ex in self.examples)

    def batches(self, start: int, stop: int, batch_size: int) -> list[list[Example]]:
        shard = self.examples[start:stop]
        return [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]

    def digest(self) -> str:
        return examples_digest(self.examples)

    @staticmethod
    def scorer(cfg, model, tokenizer):
        return _chunk_scorer(cfg, model, tokenizer)


def shard_units(cfg, examples: Sequence[Example]):
    """The sharding view of a training split: its anchor windows for ``task: document`` (anchors fixed at their
    epoch-0 draw, :mod:`seqcpo.training.offline_documents`), the examples themselves otherwise."""
    if getattr(cfg, "task", None) == "document":
        from seqcpo.training.offline_documents import DocumentWindows

        return DocumentWindows(examples, cfg)
    return WindowUnits(examples)


def _expected_ids(units, s: int, shard_size: int) -> list[str]:
    return units.ids(s * shard_size, (s + 1) * shard_size)


def _recorded_sha(manifest: dict | None) -> dict[str, str]:
    """``{shard file: sha256}`` a finished folder's manifest recorded (empty for an older or unfinished one)."""
    shards = (manifest or {}).get("shards") or []
    return {x["file"]: x["sha256"] for x in shards if isinstance(x, dict) and x.get("sha256") and x.get("file")}


def _shard_ok(out_dir: str, name: str, want_ids: list[str], recorded: dict[str, str]) -> bool:
    """A shard holds exactly ``want_ids`` and, when its manifest recorded one, still has that sha256 (a shard
    corrupted in place is remade, not trusted)."""
    path = os.path.join(out_dir, name)
    if name in recorded and (not os.path.isfile(path) or sha256_file(path) != recorded[name]):
        return False
    return _shard_ids(path) == want_ids


def _shards_hold(units, out_dir: str, names: list[str], shard_size: int, recorded: dict[str, str]) -> bool:
    return all(_shard_ok(out_dir, n, _expected_ids(units, s, shard_size), recorded) for s, n in enumerate(names))


def _verified_manifest(manifest: dict, units, out_dir: str, names: list[str], shard_size: int) -> dict:
    """The manifest marked complete, once every shard holds exactly its examples' ids; raises otherwise."""
    shards = []
    for s, name in enumerate(names):
        got = _shard_ids(os.path.join(out_dir, name))
        want = _expected_ids(units, s, shard_size)
        if got != want:
            state = "missing or unreadable" if got is None else f"{len(got)} rows, {len(want)} expected"
            raise RuntimeError(
                f"{out_dir}/{name}: {state}; not marking the folder complete. Run the same `seqcpo negatives` "
                "command again: it remakes the missing shards"
            )
        shards.append({"file": name, "rows": len(got), "sha256": sha256_file(os.path.join(out_dir, name))})
    total = sum(x["rows"] for x in shards)
    if total != units.num_rows:
        raise RuntimeError(f"{out_dir}: {total} rows in shards but {units.num_rows} examples; not marking it complete")
    return dict(manifest, shards=shards, num_rows=total, complete=True)


def _finish(manifest: dict, owned_group: bool) -> dict:
    if owned_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        # end the process group cleanly: a rank leaving with live gloo threads aborts at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return manifest
