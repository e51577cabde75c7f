"""Values by the type of the field they set, and the ranges fields declare (``check`` / ``allowed`` metadata).

Every value, from a YAML file or the command line, is parsed by the type of the dataclass field it sets, never by
how it looks: see :mod:`seqcpo.config_loader`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import types
import typing
from typing import Any, Mapping

from seqcpo.config_loader.yaml_io import ConfigError, YamlFloat, parse_yaml_text, plain, read_yaml

# ----------------------------------------------------------------------------- values by type

_NULLS = ("null", "~", "Null", "NULL")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _union_args(tp) -> tuple | None:
    if typing.get_origin(tp) is typing.Union or isinstance(tp, getattr(types, "UnionType", ())):
        return typing.get_args(tp)
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {_kind(value)}")


def _to_int(value):
    if isinstance(value, bool):
        raise ValueError("expected a whole number, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            value = _to_float(text)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    raise ValueError("expected a whole number")


def _to_float(value):
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    else:
        raise ValueError(f"expected a number, got {_kind(value)}")
    if not math.isfinite(out):
        raise ValueError("must be a finite number")
    return out


def _to_str(value):
    if isinstance(value, YamlFloat):
        return value.text  # what the file says: `1e-5`, not `1e-05`
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # model: 123, a YAML number where a name is meant
    raise ValueError(f"expected a string, got {_kind(value)}")


def _to_list(value, item_tp, where, name):
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = parse_yaml_text(text)
            except ConfigError:
                raise ValueError("not a valid [a, b] list") from None
        else:
            value = [v.strip() for v in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {_kind(value)}")
    if item_tp is None or item_tp is Any:
        return plain(list(value))
    return [coerce(f"{name}[{i}]", v, item_tp, where) for i, v in enumerate(value)]


def coerce(name: str, value: Any, tp: Any, where: str, default: Any = None) -> Any:
    """``value`` (from YAML or the command line) as the field type ``tp``; ConfigError naming ``where: name``."""
    try:
        return _coerce(name, value, tp, where, default)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: field {name!r}: {_show(value)} is not valid ({e})") from None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(name, value, tp, where, default):
    if tp is Any or tp is None:
        return plain(value)
    members = _union_args(tp)
    if members is not None:
        allow_none = type(None) in members
        members = [m for m in members if m is not type(None)]
        if value is None or (allow_none and isinstance(value, str) and value.strip() in _NULLS):
            if allow_none or default is None:
                return None
            raise ValueError("may not be null")
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if isinstance(value, str) and enums and str in members:
            # TrainingArguments' `SchedulerType | str`: the str is the enum's value, read by transformers only
            # after the data has loaded, in a message that names no field
            return _coerce(name, value, enums[0], where, default)
        if isinstance(value, str) and str in members:
            return value  # strings stay strings
        errors = []
        for m in sorted(members, key=_member_order):
            try:
                return _coerce(name, value, m, where, default)
            except ConfigError:
                if len(members) == 1:
                    raise  # Optional[list[float]]: the item's own message
                errors.append(f"expected {_type_name(m)}")
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else "expected " + " or ".join(_type_name(m) for m in members))
    if value is None:
        if default is None:
            return None
        raise ValueError("may not be null")
    origin = typing.get_origin(tp)
    if tp is bool:
        return _to_bool(value)
    if tp is int:
        return _to_int(value)
    if tp is float:
        return _to_float(value)
    if tp is str:
        return _to_str(value)
    if origin in (list, tuple, typing.Sequence, typing.get_origin(typing.Sequence[int])) or tp in (list, tuple):
        args = typing.get_args(tp)
        return _to_list(value, args[0] if args else None, where, name)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = parse_yaml_text(value)
            except ConfigError:
                raise ValueError("not a valid {key: value} mapping") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {_kind(value)}")
        return plain(value)  # 1e-5 inside a mapping: a float (YAML 1.2), as the code reading it expects
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"choose one of {', '.join(map(repr, choices))}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [e.value for e in tp]
        if isinstance(value, tp):
            return value
        if value in choices:
            return value
        raise ValueError(f"choose one of {', '.join(map(str, choices))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        scalar = getattr(tp, "from_scalar", None)
        if scalar is not None and isinstance(value, str):
            value = scalar(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping of {tp.__name__} fields, got {_kind(value)}")
        return load_dataclass(tp, overrides=value, where=f"{where}: {name}", _nested=True)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ValueError(f"expected {_type_name(tp)}, got {_kind(value)}")
    return value


def _member_order(tp) -> int:
    # try the strict readings first: a bool is not an int, an int not a float
    order = {bool: 0, int: 1, float: 2}
    return order.get(tp, 3)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


# ----------------------------------------------------------------------------- ranges

_RULE = re.compile(r"^(?P<op>>=|>|<=|<)(?P<num>-?[0-9.]+)$|^(?P<lo_b>[\[(])(?P<lo>-?[0-9.]+),(?P<hi>-?[0-9.]+)(?P<hi_b>[\])])$")


def check_value(value: Any, rule: str) -> str | None:
    """Why ``value`` breaks ``rule`` (``">0"``, ``">=1"``, ``"[0,1]"``, ``"(0,1]"``...), or None when it keeps it.

    >>> check_value(0.0, ">0"), check_value(1.5, "[0,1]"), check_value(0.5, "(0,1]")
    ('must be > 0', 'must lie in [0, 1]', None)
    """
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    m = _RULE.match(rule.replace(" ", ""))
    if m is None:
        raise ValueError(f"bad check rule {rule!r}")
    if m["op"]:
        bound = float(m["num"])
        ok = {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[m["op"]]
        return None if ok else f"must be {m['op']} {m['num']}"
    lo, hi = float(m["lo"]), float(m["hi"])
    ok = (value > lo if m["lo_b"] == "(" else value >= lo) and (value < hi if m["hi_b"] == ")" else value <= hi)
    return None if ok else f"must lie in {m['lo_b']}{m['lo']}, {m['hi']}{m['hi_b']}"


def field_choices(cls) -> dict[str, tuple]:
    """``{field: choices}`` from the ``allowed`` metadata of a dataclass."""
    return {f.name: tuple(f.metadata["allowed"]) for f in dataclasses.fields(cls) if "allowed" in f.metadata}


def field_rules(cls) -> dict[str, str]:
    """``{field: rule}`` from the ``check`` metadata of a dataclass, plus its class's ``EXTRA_CHECKS``."""
    rules = {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}
    rules.update(getattr(cls, "EXTRA_CHECKS", {}))
    return rules


def check_fields(obj) -> None:
    """Check every field of a built dataclass: floats finite, declared ranges kept. ConfigError names the field."""
    rules = field_rules(type(obj))
    choices = field_choices(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value!r}: must be a finite number")
        if f.name in choices and value not in choices[f.name]:
            raise ConfigError(f"{f.name}={value!r}: choose one of {', '.join(map(str, choices[f.name]))}")
        rule = rules.get(f.name)
        why = check_value(value, rule) if rule else None
        if why:
            raise ConfigError(f"{f.name}={value!r}: {why}")


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """ConfigError naming ``option`` when ``path`` cannot become a writable folder: it (or a parent) is a
    file, or it (or, when it does not exist yet, its parent) exists and is not writable. A path whose
    parents do not exist yet passes (a config written here may run on another machine)."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise ConfigError(f"{option} {path}: is a file, not a folder")
    parent = p
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
    if parent in (p, os.path.dirname(p)) and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {parent} is not writable")



# ----------------------------------------------------------------------------- the loader


def field_types(cls) -> dict[str, tuple[Any, Any]]:
    """``{name: (type, default)}`` of the init fields of a dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = (hints.get(f.name, Any), default)
    return out


def unknown_key_error(where: str, key: str, valid, noun: str = "field") -> ConfigError:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown {noun} {key!r}{hint}")


def resolve(cls, sources: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Coerce and range-check the keys of each ``(where, mapping)`` source in order (later ones win)."""
    types_ = field_types(cls)
    rules = field_rules(cls)
    choices = field_choices(cls)
    merged: dict[str, Any] = {}
    for where, items in sources:
        for key, value in items.items():
            key = str(key)
            if key not in types_:
                moved = getattr(cls, "MOVED_FIELDS", {}).get(key)
                if moved:
                    raise ConfigError(f"{where}: unknown field {key!r}: {moved}")
                raise unknown_key_error(where, key, types_)
            tp, default = types_[key]
            prior = merged.get(key)
            if dataclasses.is_dataclass(tp) and isinstance(prior, tp) and isinstance(value, Mapping):
                # a nested block given in two places (a YAML judge: and --judge-model): the later keys win
                try:
                    value = dataclasses.replace(prior, **resolve(tp, [(f"{where}: {key}", value)]))
                except ConfigError:
                    raise
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: {key}: {e}") from None
            else:
                value = coerce(key, value, tp, where, default)
            if key in choices and value not in choices[key]:
                raise ConfigError(f"{where}: field {key!r}: {_show(value)} is not one of "
                                  f"{', '.join(map(str, choices[key]))}")
            why = check_value(value, rules[key]) if key in rules else None
            if why:
                raise ConfigError(f"{where}: field {key!r}: {_show(value)} {why}")
            merged[key] = value
    return merged


def load_dataclass(cls, path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                   section: str | None = None, where: str = "command line", _nested: bool = False):
    """Build ``cls`` from a YAML file (optional; its ``section:`` mapping when it has one) and overrides.

    Unknown keys, wrong types and values out of range fail with a one-line :class:`ConfigError` naming the
    file (or ``where`` for the overrides) and the field; errors raised by ``cls`` itself are prefixed with
    the place the field they name was given (:func:`blame`), the file by default.
    """
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        sources.append((str(path), read_yaml(path, section)))
    sources.append((where, dict(overrides or {})))
    values = resolve(cls, sources)
    try:
        return cls(**values)
    except ConfigError as e:
        if _nested:
            raise ConfigError(f"{where}: {e}") from None
        raise ConfigError(f"{blame(str(e), sources, str(path))}: {e}" if path is not None else str(e)) from None
    except (TypeError, ValueError) as e:
        place = where if _nested or path is None else blame(str(e), sources, str(path))
        raise ConfigError(f"{place}: {e}") from None


def blame(message: str, sources: list[tuple[str, Mapping[str, Any]]], default: str) -> str:
    """Where the value an error is about was given: the source (a file, "command line") that last set the field
    the message starts with (``name=value: why``, the house style), else the one source of the fields it
    mentions (by a name with an underscore, or as ``name=``: ``task`` or ``beta`` may be plain words);
    ``default`` when neither tells.

    >>> given = [("a.yaml", {"anchor_stride": 4, "task": "document"}), ("command line", {"anchor_stride": 0})]
    >>> blame("anchor_stride=0 must be at least 1", given, "a.yaml")
    'command line'
    """
    origin = {str(k): where for where, items in sources for k in items}
    first = re.match(r"(\w+)\s*=", message)
    if first and first[1] in origin:
        return origin[first[1]]
    named = {origin[k] for k in origin if re.search(rf"\b{re.escape(k)}" + (r"\b" if "_" in k else "="), message)}
    return named.pop() if len(named) == 1 else default

