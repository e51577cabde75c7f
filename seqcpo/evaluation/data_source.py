"""Which examples evaluation scores: the split a checkpoint was trained with, and never, silently, its training data.

- :func:`resolve_data`: the :class:`seqcpo.data.DataConfig` of an evaluation, from (later wins) the DataConfig
  defaults, the data settings in the ``seqcpo_config.yaml`` of the first model that has one (the resolved config training saved
  beside the weights: dataset, task, validation_size, test_size, split_seed, max_examples, windows...), a
  ``--data-config`` file (its ``data:`` mapping, or the data fields of a training config such as
  ``configs/demo.yaml``) and the data flags.
- :func:`check_training_overlap`: for each model that has a ``seqcpo_config.yaml``, the record ids of its
  training split (rebuilt with its own settings when they differ from the evaluation's) against the items to
  score; an overlap is refused (ValueError naming the model, the count and the first ids) unless
  ``allow_train_overlap``, which scores them and flags them in the log and the report.
- :class:`ExampleSource`: the first ``num_examples`` examples of the split, built once per tokenizer, and a
  description of the split (settings, sizes, where the settings came from) for the report.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from pathlib import Path

from seqcpo.config_loader import ConfigError, read_yaml, resolve, unknown_key_error
from seqcpo.data import DataConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "seqcpo_config.yaml"
DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))
_SOURCE_FIELDS = ("dataset", "dataset_split", "dataset_config")  # what names the corpus the record ids belong to


def checkpoint_config_path(model: str) -> Path | None:
    """``seqcpo_config.yaml`` of a checkpoint folder (or of its run folder), None for a name or a plain folder."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    for place in (folder, folder.parent):
        if (place / CONFIG_FILE).is_file():
            return place / CONFIG_FILE
    return None


def checkpoint_data_settings(model: str) -> tuple[str, dict] | None:
    """(file, the DataConfig fields of the training config) of a checkpoint, or None when it has none."""
    path = checkpoint_config_path(model)
    if path is None:
        return None
    raw = read_yaml(path)
    return str(path), {k: v for k, v in raw.items() if k in DATA_FIELDS}


def data_file_settings(path: str) -> dict:
    """The DataConfig fields of a ``--data-config`` file: its ``data:`` mapping (every key must be a data field),
    or the top level of a training config (its model, objective and trainer fields are left out; a near miss
    of a data field, ``prefix_tokenz``, is an error)."""
    raw = read_yaml(path)
    strict = isinstance(raw.get("data"), dict)
    section = raw["data"] if strict else raw
    out = {}
    for key, value in section.items():
        if key in DATA_FIELDS:
            out[key] = value
        elif strict:
            raise unknown_key_error(f"{path}: data", key, DATA_FIELDS)
        elif difflib.get_close_matches(str(key), DATA_FIELDS, n=1, cutoff=0.85):
            raise unknown_key_error(str(path), key, DATA_FIELDS)
    return out


def resolve_data(models, data_config: str | None, flag_sources: list, use_checkpoint: bool = True):
    """``(DataConfig, origin)``: the evaluation's data settings and the list of places they came from, in order
    (a checkpoint's ``seqcpo_config.yaml``, the ``--data-config`` file, the flags). ConfigError names the place."""
    sources: list[tuple[str, dict]] = []
    if use_checkpoint:
        found = next((s for s in map(checkpoint_data_settings, models or []) if s is not None), None)
        if found is not None:
            sources.append(found)
    if data_config:
        sources.append((str(data_config), data_file_settings(data_config)))
    sources += list(flag_sources)
    values = resolve(DataConfig, sources)
    try:
        cfg = DataConfig(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data settings ({', '.join(w for w, _ in sources) or 'defaults'}): {e}") from None
    origin = [w for w, items in sources if items] or ["DataConfig defaults"]
    if cfg.task == "document":  # a document row has no prompt to continue: evaluate on windows of the same data
        raise ConfigError(f"data settings ({', '.join(origin)}): task=document trains on document rows, which have no "
                          "prompt to continue; evaluate on windows of the same data: --task continuation "
                          "(--prefix-tokens P --continuation-tokens C)")
    return cfg, origin


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256(blob.encode()).hexdigest()


class ExampleSource:
    """The first ``num_examples`` (0 = all) examples of a split, built once per distinct tokenizer.

    ``origin``: where the data settings came from (for the report); ``overlap``: what
    :func:`check_training_overlap` found, per model label.
    """

    def __init__(self, data, split: str, num_examples: int, origin: list[str] | None = None):
        self.cfg = data
        self.split = split
        self.num = num_examples
        self.origin = list(origin or [])
        self.sizes: dict[str, int] = {}
        self.overlap: dict[str, str] = {}
        self._cache: dict[str, list] = {}

    def __call__(self, tokenizer) -> list:
        from seqcpo.data import load_splits

        key = _tokenizer_key(tokenizer)
        if key not in self._cache:
            splits = load_splits(self.cfg, tokenizer)
            self.sizes = {name: len(getattr(splits, name)) for name in ("train", "validation", "test")}
            examples = getattr(splits, self.split)
            if self.num:
                examples = examples[: self.num]
            if not examples:
                raise ValueError(f"the {self.split} split of {self.cfg.dataset} is empty")
            self._cache[key] = examples
        return self._cache[key]

    def default_max_new_tokens(self) -> int:
        return self.cfg.continuation_tokens if self.cfg.task == "continuation" else self.cfg.max_continuation_tokens

    def describe(self) -> dict:
        """The split used, flat (the report prints ``key=value``): data settings, sizes, origin, overlap."""
        c = self.cfg
        out = {"dataset": c.dataset, "task": c.task, "split": self.split, "num_examples": self.num or "all",
               "split_seed": c.split_seed, "validation_size": c.validation_size, "test_size": c.test_size,
               "max_examples": c.max_examples}
        if c.task == "continuation":
            out.update(prefix_tokens=c.prefix_tokens, continuation_tokens=c.continuation_tokens,
                       windows_per_document=c.windows_per_document)
        else:
            out.update(max_prefix_tokens=c.max_prefix_tokens, max_continuation_tokens=c.max_continuation_tokens,
                       prompt_template=c.prompt_template)
        if self.sizes:
            out["split_sizes"] = " / ".join(f"{k} {v}" for k, v in self.sizes.items())
        if self.origin:
            out["settings_from"] = " < ".join(self.origin)
        if self.overlap:
            out["train_overlap"] = "; ".join(f"{k}: {v}" for k, v in self.overlap.items())
        return out


def _training_ids(model: str, tokenizer, source: ExampleSource) -> tuple[set[str] | None, str]:
    """(record ids of the model's training split, how they were found); None when they cannot be known."""
    from seqcpo.data import load_splits

    found = checkpoint_data_settings(model)
    if found is None:
        return None, "not checked (no seqcpo_config.yaml)"
    path, settings = found
    train_cfg = DataConfig(**resolve(DataConfig, [(path, settings)]))
    if any(getattr(train_cfg, f) != getattr(source.cfg, f) for f in _SOURCE_FIELDS):
        return set(), "none (trained on another dataset)"
    if train_cfg == source.cfg and source.split != "train":
        return set(), "none (the checkpoint's own split)"
    if train_cfg.streaming:
        return None, "not checked (trained on streamed data)"
    return {str(ex.meta["id"]) for ex in load_splits(train_cfg, tokenizer).train}, f"checked against {path}"


def check_training_overlap(models, labels, source: ExampleSource, allow: bool, tokenizers) -> dict[str, str]:
    """Refuse (ValueError) items of ``source`` that are in a model's training split, or with ``allow`` log them
    loudly; ``tokenizers(path)`` gives a model's tokenizer. Fills and returns ``source.overlap``."""
    for path, label in zip(models, labels):
        tokenizer = tokenizers(path)
        train_ids, how = _training_ids(path, tokenizer, source)
        if not train_ids:
            source.overlap[label] = how
            continue
        items = [str(ex.meta["id"]) for ex in source(tokenizer)]
        shared = [i for i in items if i in train_ids]
        if not shared:
            source.overlap[label] = f"none ({how})"
            continue
        shown = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        what = (f"{len(shared)} of the {len(items)} {source.split} items are in the training split of {label} "
                f"({path}; ids {shown})")
        if not allow:
            fix = ("evaluate on --split test or validation" if source.split == "train" else
                   "evaluate with the checkpoint's own data settings (drop the --data-config or data flags that "
                   "change its split)")
            raise ValueError(f"{what}: {fix}, or pass --allow-train-overlap to score them anyway, flagged in the "
                             "report")
        logger.warning("TRAINING DATA SCORED: %s (--allow-train-overlap)", what)
        source.overlap[label] = f"{len(shared)} TRAINING ITEMS SCORED (ids {shown})"
    return source.overlap
