"""Reading a finished negatives folder for training (``negatives_path``): checked, then looked up by example id.

Before a run trusts a folder made by ``seqcpo negatives`` (:mod:`seqcpo.training.offline`), it checks that the
folder is finished, fits this run (K, ranking, length normalization; the same model by name and by the content
digest of its weights, the same data, generators, options and seed: differing fields named with both values), and
is intact (every shard present, with the sha256 its manifest recorded, readable as Parquet with its rows). A
damaged shard is named with the command that repairs it (the same ``seqcpo negatives`` command remakes it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

from seqcpo.models.digest import sha256_file
from seqcpo.negatives.registry import content_options
from seqcpo.training.offline import (
    FORMAT_VERSION,
    _read_manifest,
    describe_differences,
    offline_settings,
    settings_differences,
)
from seqcpo.types import Example

logger = logging.getLogger("seqcpo.training.offline")


class OfflineNegatives(Mapping):
    """Read-only ``{example id: row}`` over a finished negatives folder, without loading it into Python.

    The shards are read once through ``datasets`` into a memory-mapped Arrow table (cached under the seqcpo
    cache); an id index of 16 bytes per row (a sorted 64-bit hash of the id and its row) finds a row.
    A row is a dict with the Parquet columns (``negatives``, ``valid``, ``scores``, ``sources``, ``ref_logps``,
    ``prefix_ids``, ``gold_ids``, ``id``).
    """

    def __init__(self, path: str, manifest: dict):
        import datasets
        import numpy as np

        from seqcpo.models import cache_dir

        files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
        self.path = path
        self.table = datasets.load_dataset(
            "parquet", data_files=files, split="train", cache_dir=os.path.join(cache_dir(), "datasets")
        )
        ids = self.table.data.column("id")
        # chunk by chunk: never a Python list of every id
        hashes = np.fromiter(
            (_id_hash(str(x)) for chunk in ids.chunks for x in chunk.to_pylist()), dtype=np.uint64, count=len(ids)
        )
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._rows = order.astype(np.int64)

    def _row(self, key: str) -> int | None:
        import numpy as np

        h = np.uint64(_id_hash(str(key)))
        i = int(np.searchsorted(self._hashes, h, side="left"))
        col = self.table.data.column("id")
        while i < len(self._hashes) and self._hashes[i] == h:
            r = int(self._rows[i])
            if col[r].as_py() == str(key):
                return r
            i += 1
        return None

    def __contains__(self, key: object) -> bool:
        return self._row(str(key)) is not None

    def __getitem__(self, key: str) -> dict[str, Any]:
        r = self._row(str(key))
        if r is None:
            raise KeyError(key)
        return self.table[r]

    def __iter__(self) -> Iterator[str]:
        return (str(x) for chunk in self.table.data.column("id").chunks for x in chunk.to_pylist())

    def __len__(self) -> int:
        return len(self.table)


def _id_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def read_offline_negatives(
    path: str, cfg, examples: Sequence[Example] | None = None
) -> tuple[OfflineNegatives, dict[str, Any]]:
    """Open a finished negatives folder for training, checking it fits the training config and is intact.

    Checks, each a one-line ``ValueError`` that says what to run: the folder is finished and of this format; its
    K, ranking and length normalization fit; its model (name and weights' content digest), data, generators and
    seed are this run's (the differing fields named with both values); every shard exists, still has the sha256
    its manifest recorded and reads as Parquet with its rows. With ``examples`` (the training split), also that
    every example has a row made from these examples' tokens (document rows: every anchor window of every row,
    :mod:`seqcpo.training.offline_documents`). Returns ``(rows by id, manifest)``.
    """
    manifest = check_offline_settings(path, cfg)
    st = manifest.get("settings", {})
    _check_shards(path, manifest)
    rows = OfflineNegatives(path, manifest)
    if examples is not None:
        from seqcpo.training.offline import shard_units

        _check_rows(path, rows, st, shard_units(cfg, examples), getattr(cfg, "task", None) == "document")
    return rows, manifest


def check_offline_settings(path: str, cfg) -> dict[str, Any]:
    """The negatives folder is finished and was made under ``cfg``'s settings (its manifest alone: no shard is
    read); one-line ``ValueError`` otherwise. Returns the manifest."""
    manifest = _read_manifest(path)
    _check_finished(path, manifest)
    _check_fits(path, manifest.get("settings", {}), cfg)
    return manifest


_REMAKE = ("Make a folder for this config: seqcpo negatives --config FILE.yaml --out NEW_DIR (same overrides as this "
           "run)")
_REPAIR = "run the same `seqcpo negatives` command again: it checks every shard and remakes the damaged ones"


def _check_finished(path: str, manifest: dict | None) -> None:
    if manifest is None:
        raise ValueError(f"negatives_path {path}: no manifest.json; make the folder with `seqcpo negatives`")
    st = manifest.get("settings", {})
    if st.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"negatives_path {path}: made by an older seqcpo (format {st.get('format')}, JSONL shards); re-make it "
            "into a new folder with `seqcpo negatives --out NEW_DIR`"
        )
    missing = [key for key in ("k", "ranked") if key not in st]
    if missing:
        raise ValueError(f"negatives_path {path}: its manifest.json is damaged (settings.{missing[0]} is missing); "
                         "make the folder again with `seqcpo negatives --out NEW_DIR`")
    if not manifest.get("complete"):
        raise ValueError(
            f"negatives_path {path}: incomplete; run the same `seqcpo negatives` command again to finish it (it "
            "resumes)"
        )


_WARNED_NO_DIGEST: set[str] = set()


def _check_fits(path: str, st: dict, cfg) -> None:
    """The folder's settings fit this run's: K, ranking, length normalization, and the same model (name and
    content), data, generators, options and seed."""
    if st["k"] != cfg.num_negatives:
        raise ValueError(f"negatives_path {path} has K = {st['k']} negatives per example but num_negatives = {cfg.num_negatives}")
    if cfg.ranked and not st["ranked"]:
        raise ValueError(
            f"negatives_path {path} was made unranked; objective {cfg.objective} needs ranked negatives: re-make "
            f"them with --objective {cfg.objective}"
        )
    if st.get("length_normalize") != cfg.length_normalize and cfg.reference in ("auto", "precomputed"):
        raise ValueError(
            f"negatives_path {path}: its reference log-probs were computed with length_normalize="
            f"{st.get('length_normalize')}; set the same, or use reference frozen_copy"
        )
    expected = offline_settings(cfg, st.get("num_examples", 0))
    # model_dtype is not compared: reference log-probs made at another precision still describe this model
    keys = ["model", "data", "negatives", "options", "seed"]
    if "anchors" in st or "anchors" in expected:  # document rows: the rule that fixed the anchors
        keys.append("anchors")
    if "model_digest" in st:
        keys.insert(1, "model_digest")
    elif path not in _WARNED_NO_DIGEST:  # said once a process: the folder is checked before and after loading
        _WARNED_NO_DIGEST.add(path)
        logger.warning("negatives_path %s was made by a seqcpo that recorded no digest of the model's weights: "
                       "that they are the weights this run starts from cannot be checked", path)
    def comparable(settings: dict) -> dict:  # speed-only options (an_batch_size) do not change the rows
        return {k: content_options(settings.get(k) or {}) if k == "options" else settings.get(k) for k in keys}

    diffs = settings_differences(comparable(st), comparable(expected))
    if diffs:
        replaced = any(name == "model_digest" for name, _, _ in diffs) and not any(
            name == "model" for name, _, _ in diffs)
        raise ValueError(
            f"negatives_path {path} was made with other settings than this run's "
            f"({describe_differences(diffs, 'in the folder', 'now')})"
            + ("; the model folder's weights were replaced since" if replaced else "")
            + f": its reference log-probs would not match. {_REMAKE}"
        )


def _check_shards(path: str, manifest: dict) -> None:
    """Every shard the manifest lists exists, has its recorded sha256 and reads as Parquet with its rows."""
    import pyarrow.parquet as pq

    for shard in manifest.get("shards", []):
        full = os.path.join(path, shard["file"])
        if not os.path.isfile(full):
            raise ValueError(f"negatives_path {path}: shard {shard['file']} is missing; {_REPAIR}")
        if shard.get("sha256") and sha256_file(full) != shard["sha256"]:
            raise ValueError(f"negatives_path {path}: shard {shard['file']} changed since it was written (its sha256 "
                             f"differs from the manifest's: corrupted or truncated); {_REPAIR}")
        try:
            rows = pq.ParquetFile(full).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a damaged file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"negatives_path {path}: shard {shard['file']} is not readable Parquet ({first}); "
                             f"{_REPAIR}") from None
        if shard.get("rows") is not None and rows != shard["rows"]:
            raise ValueError(f"negatives_path {path}: shard {shard['file']} holds {rows} rows, the manifest "
                             f"{shard['rows']}; {_REPAIR}")


def _check_rows(path: str, rows: OfflineNegatives, st: dict, units, documents: bool) -> None:
    """Every training example (document rows: every anchor window of every row, anchors at their epoch-0 draw)
    has a row, made from these token ids."""
    first, n_missing, total = None, 0, 0
    for key in units.iter_ids():
        total += 1
        if key not in rows:
            n_missing += 1
            first = key if first is None else first
    if n_missing:
        what = "anchor windows of the training rows" if documents else "training examples"
        raise ValueError(
            f"negatives_path {path} has no row for {n_missing} of {total} {what} (first: id {first}): it was "
            f"made from other {'rows or anchors' if documents else 'examples'}. Make a folder for this run's "
            "data: seqcpo negatives --config FILE.yaml --out NEW_DIR (same data settings and overrides as this run)"
        )
    if st.get("examples_digest") is not None and units.digest() != st["examples_digest"]:
        raise ValueError(
            f"negatives_path {path} was made from other token ids for these examples (data file or tokenizer "
            "changed?); its reference log-probs would not match. Make a folder for this run: seqcpo negatives "
            "--config FILE.yaml --out NEW_DIR"
        )
