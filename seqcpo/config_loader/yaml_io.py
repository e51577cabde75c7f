"""Reading YAML config files: YAML 1.2 booleans and numbers, duplicate keys refused.

- Booleans are YAML 1.2's (``true``/``false`` only): ``save_strategy: no`` stays the string transformers
  documents.
- Numbers in scientific notation without a dot or a signed exponent (``1e-5``, ``2E3``, ``1.0e5``) are numbers,
  as in YAML 1.2, also inside nested mappings (``lr_scheduler_kwargs: {min_lr: 1e-5}``), where no field type
  says how to read them. A ``str`` field given such a number keeps its text (``1e-5``, not ``1e-05``).
- A key given twice in one mapping is an error naming the file, the line and the key (YAML's own rule; PyYAML
  would keep the last one silently: a grid with two ``mle:`` arms trained one arm and lost the other).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the place (file or command line) and the field."""


class YamlFloat(float):
    """A float read from YAML 1.2 scientific notation that YAML 1.1 would read as a string; ``text`` keeps what
    was written (a ``str`` field reads the text back, every other reader a plain float)."""

    text: str

    def __new__(cls, text: str):
        obj = super().__new__(cls, text)
        obj.text = text
        return obj

    def __reduce__(self):  # pickles and copies as a plain float
        return (float, (float(self),))


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats, refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first is not None:
                    raise _DuplicateKey(None, None, f"duplicate key {key!r} (first given on line {first})",
                                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
# YAML 1.2 floats that YAML 1.1 leaves as strings: an exponent without a dot or without a sign
_FLOAT12_TAG = "tag:seqcpo,2026:float12"
_Loader.add_implicit_resolver(_FLOAT12_TAG, re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))
_Loader.add_constructor(_FLOAT12_TAG, lambda loader, node: YamlFloat(loader.construct_scalar(node)))
yaml.SafeDumper.add_representer(YamlFloat, yaml.SafeDumper.represent_float)  # a dump never meets an unknown type


def plain(value: Any) -> Any:
    """``value`` with every :class:`YamlFloat` inside it (dicts, lists) turned into a plain float."""
    if isinstance(value, YamlFloat):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _load(stream, where: str) -> Any:
    try:
        return yaml.load(stream, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as e:
        raise ConfigError(f"{where} line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def read_yaml(path: str | os.PathLike, section: str | None = None) -> dict[str, Any]:
    """The mapping at the top of a YAML file (or under ``section:`` when the file has one).

    ConfigError (one line, naming the file and line) for a missing file, bad YAML or a duplicate key.
    """
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such config file")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    loaded = _load(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of field: value")
    if section is not None and isinstance(loaded.get(section), dict):
        loaded = loaded[section]
    return loaded


def parse_yaml_text(text: str) -> Any:
    """A YAML value with YAML 1.2 booleans and floats (used for ``[a, b]`` and ``{k: v}`` given on the command
    line); ConfigError on bad YAML or a duplicate key."""
    return _load(text, "command line")
