"""The one config loader of every command: YAML plus ``--key value`` overrides into a dataclass.

Every value, from a YAML file or the command line, is parsed by the type of the dataclass field it
sets, never by how it looks: a ``str`` field keeps ``no``, ``off``, ``1e-5`` and ``null`` as the strings
they are; an ``Optional`` field reads ``null`` (or ``~``) as None; ``float`` fields read ``1e-5`` and refuse
``nan`` and ``inf``; ``int`` fields refuse ``2.5`` and ``true``; ``bool`` fields alone read
``true/false/yes/no/on/off/1/0``; list fields take a YAML list, ``[a, b]`` or ``a,b``; a nested dataclass
field takes a mapping. YAML files are read with YAML 1.2 booleans (only ``true``/``false``), so
``save_strategy: no`` stays the string that transformers documents, and YAML 1.2 numbers (``1e-5`` is a number
inside a nested mapping too); a key given twice is an error naming file, line and key (:mod:`.yaml_io`).

A field may declare a range in its metadata, ``check=">0"`` (also ``">=0"``, ``">=1"``, ``"[0,1]"``,
``"(0,1]"``, ``"[0,1)"``); the loader and :func:`check_fields` apply it. Errors are one line and name the
place (file or "command line") and the field; an unknown key names the closest valid one.

Command-line flags are declared from the same fields (:func:`add_field_flags`, help, allowed values and ranges
from the metadata; ``allowed`` is the one way to say "choose one of") and parsed by :class:`FlagParser`
(``--a_b`` and ``--a-b`` alike; a bad flag exits 2 with one line).

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class C:
    ...     save_strategy: str = "steps"
    ...     beta: float = dataclasses.field(default=0.1, metadata={"check": ">0"})
    >>> load_dataclass(C, overrides=parse_cli_overrides(["--save_strategy", "no", "--beta", "1e-2"]))
    C(save_strategy='no', beta=0.01)
"""


from seqcpo.config_loader.flags import (  # noqa: F401
    FlagParser,
    add_field_flags,
    flag_sources,
    normalize_flags,
    parse_cli_overrides,
)
from seqcpo.config_loader.values import (  # noqa: F401
    check_fields,
    check_output_dir,
    check_value,
    coerce,
    field_choices,
    field_rules,
    field_types,
    load_dataclass,
    resolve,
    unknown_key_error,
)
from seqcpo.config_loader.yaml_io import ConfigError, YamlFloat, parse_yaml_text, read_yaml  # noqa: F401

__all__ = [
    "ConfigError", "FlagParser", "YamlFloat", "add_field_flags", "check_fields", "check_output_dir", "check_value",
    "coerce", "field_choices", "field_rules", "field_types", "flag_sources", "load_dataclass", "normalize_flags",
    "parse_cli_overrides", "parse_yaml_text", "read_yaml", "resolve", "unknown_key_error",
]
