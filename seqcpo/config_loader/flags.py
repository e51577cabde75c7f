"""Command-line flags from dataclass fields, one flag style, one kind of error line.

- :func:`add_field_flags` declares a flag per field of a dataclass: its help, allowed values (``allowed``
  metadata) and range (``check`` metadata) come from the field, so nothing is declared twice. Values stay
  strings; the loader reads them by the field's type (:func:`flag_sources` hands them over, one source per flag
  so an error names the flag).
- :class:`FlagParser`: every ``--a_b`` is read as ``--a-b`` (every command accepts both spellings), no
  abbreviations (``--judge-api-key`` must not pass for ``--judge-api-key-env``), and a bad flag exits 2 with one
  line ``seqcpo: error: ...``, like a bad value.
- Lists: ``--alphas 0 0.5 1`` and ``--alphas 0,0.5,1`` are the same for number lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from seqcpo.config_loader.values import ConfigError, _union_args, field_choices, field_rules

# ----------------------------------------------------------------------------- free --key value overrides


def parse_cli_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--beta", "0.2", "--lora", "--max_steps=7"]`` -> ``{"beta": "0.2", "lora": True, "max_steps": "7"}``.

    Values stay strings (the field's type decides how to read them); a flag with no value is True
    (accepted by bool fields only). Dashes in names are underscores.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"command line: expected --key value, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = True
            i += 1
        out[key.replace("-", "_")] = raw
    return out


# ----------------------------------------------------------------------------- the parser


def normalize_flags(argv: list[str]) -> list[str]:
    """``--num_examples=3`` -> ``--num-examples=3``: one spelling for argparse (values are left alone).

    >>> normalize_flags(["eval", "--num_examples", "3", "--judge_url=http://h/a_b", "x_y"])
    ['eval', '--num-examples', '3', '--judge-url=http://h/a_b', 'x_y']
    """
    out = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            tok = "--" + name.replace("_", "-") + eq + value
        out.append(tok)
    return out


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``--a_b`` as ``--a-b``, takes no abbreviations and reports a bad flag in
    one line (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(normalize_flags(args), namespace)

    def error(self, message: str):
        self.exit(2, f"seqcpo: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- flags from fields


class _ExtendItems(argparse.Action):
    """``nargs="+"`` that extends (a repeated flag adds items) and, for number lists, splits ``a,b``."""

    def __init__(self, *args, split_commas: bool = False, **kwargs):
        self.split_commas = split_commas
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for v in values:
            items += [x for x in v.split(",") if x.strip()] if self.split_commas else [v]
        setattr(namespace, self.dest, items)


def _base_type(tp):
    members = _union_args(tp)
    if members is not None:
        rest = [m for m in members if m is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return tp


def _describe(f: dataclasses.Field, rule: str | None, choices: tuple | None) -> str:
    text = f.metadata.get("help", "").strip()
    notes = []
    if choices:
        notes.append("one of " + ", ".join(map(str, choices)))
    if rule:
        notes.append(f"range {rule}")
    if f.default is not dataclasses.MISSING and f.default not in (None, "", [], False):
        notes.append(f"default {f.default}")
    text = text.replace("%", "%%")
    return f"{text} ({'; '.join(notes)})" if notes else text


def add_field_flags(parser, cls, fields=None, prefix: str = "", path: str = "", names: dict | None = None,
                    special: dict | None = None, hidden: dict | None = None) -> dict[str, str]:
    """Declare a flag for each field of dataclass ``cls`` (all, or those named in ``fields``) on ``parser`` (a
    parser or an argument group). Returns ``{dest: field path}`` for :func:`flag_sources`.

    ``prefix``: put before every flag name (``judge-`` gives ``--judge-model``); ``path``: before every field
    path (``judge.``); ``names``: ``{field: (flag name, ...)}`` in place of the prefixed field name; ``special``:
    ``{field: argparse kwargs}`` for a field that needs another shape (``nargs=2, action="append"``);
    ``hidden``: ``{old flag: field}`` accepted spellings left out of the help. A bool field gets ``--x [BOOL]``
    and ``--no-x``; a list field takes several values (numbers also ``a,b``); others one value.
    """
    hints = typing.get_type_hints(cls)
    rules, choices = field_rules(cls), field_choices(cls)
    names, special, hidden = names or {}, special or {}, hidden or {}
    mapping: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.init or (fields is not None and f.name not in fields):
            continue
        flags = ["--" + n.replace("_", "-") for n in names.get(f.name, (prefix + f.name,))]
        dest = flags[0][2:].replace("-", "_")
        mapping[dest] = path + f.name
        tp = _base_type(hints.get(f.name, str))
        help_text = _describe(f, rules.get(f.name), choices.get(f.name))
        kwargs: dict[str, Any] = dict(dest=dest, default=None, help=help_text)
        if f.name in special:
            kwargs.update(special[f.name])
        elif tp is bool:
            negative = "--no-" + flags[0][2:]
            parser.add_argument(*flags, nargs="?", const="true", metavar="BOOL", **kwargs)
            parser.add_argument(negative, dest=dest, action="store_const", const="false", default=None,
                                help=f"same as {flags[0]} false")
            continue
        elif typing.get_origin(tp) in (list, tuple):
            item = (typing.get_args(tp) or (str,))[0]
            kwargs.update(nargs="+", action=_ExtendItems, split_commas=item in (int, float),
                          metavar=_metavar(item, None))
        else:
            kwargs["metavar"] = _metavar(tp, choices.get(f.name))
        parser.add_argument(*flags, **kwargs)
    for old, name in hidden.items():
        dest = next(d for d, p in mapping.items() if p == path + name)
        parser.add_argument(old, dest=dest, action="store_const", const="false", default=None, help=argparse.SUPPRESS)
    return mapping


def _metavar(tp, choices) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return {int: "N", float: "X"}.get(tp, "TEXT")


def flag_sources(args, mapping: dict[str, str]) -> list[tuple[str, dict]]:
    """The flags given (not None) as loader sources ``("--flag", {field: raw})``; a path ``judge.model`` becomes
    ``{"judge": {"model": raw}}``. One source per flag, so a bad value is reported under its flag."""
    sources = []
    for dest, field_path in mapping.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        *outer, name = field_path.split(".")
        item: dict = {name: value}
        for key in reversed(outer):
            item = {key: item}
        sources.append((flag, item))
    return sources
