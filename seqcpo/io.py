"""Atomic file writes: a reader never sees a half-written file, and a crash leaves the old one intact."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path in ``path``'s folder to write to (by any writer: Parquet, safetensors, ...); on success
    it is fsynced and ``os.replace``d into place, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; the file gets the mode an open() would give
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, fsync it, then ``os.replace`` it into place."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------- secrets out of every written file

_SECRET_WORDS = ("api_key", "apikey", "password", "passwd", "secret", "authorization", "credential")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@?#]+)@")
# a query parameter whose name says it may carry a credential: ?key= (Gemini), ?code= (Azure Functions), ?sig= (SAS),
# ?auth=, ?access_token=, ?subscription-key=, ?session=, ... (hiding a harmless one costs nothing)
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:[A-Za-z0-9_\-]*(?:key|token|secret|pass|pwd|sig|auth|code|credential|session)"
                           r"[A-Za-z0-9_\-]*))=(?P<value>[^&#\s\"']*)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<key>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)
REDACTED = "***"
_TOKENIZER_TOKENS = ("pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token")


def is_secret_name(name: str) -> bool:
    """Whether a field or key called ``name`` holds a secret: ``hub_token``, ``token``, ``*_api_key``,
    ``password``... (not the ``*_tokens`` counts, nor ``api_key_env``, which names a variable, not a key).

    >>> [is_secret_name(n) for n in ("hub_token", "api_key", "OPENAI_API_KEY", "prefix_tokens", "api_key_env")]
    [True, True, True, False, False]
    """
    low = str(name).lower()
    if low.endswith("_env") or low in _TOKENIZER_TOKENS:
        return False
    return low == "token" or low.endswith("_token") or any(w in low for w in _SECRET_WORDS)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without URL credentials (``user:pw@``), secret query parameters (``?api_key=``, ``&token=``,
    ``?key=``, ``?code=``, ...),
    ``Bearer``/``Basic`` credentials, and any of the given ``secrets`` values.

    >>> redact_text("http://u:pw@host/v1?api_key=k1&x=2 Bearer sk-abcdefghij")
    'http://***@host/v1?api_key=***&x=2 Bearer ***'
    """
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}={REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m['key']}{REDACTED}", text)


def environment_secrets() -> list[str]:
    """The values of the environment variables whose names say they hold a secret (``HF_TOKEN``,
    ``OPENAI_API_KEY``, ...): a copy of one of them anywhere in a written file is a leak."""
    return [v for k, v in os.environ.items() if is_secret_name(k) and v and len(v) >= 4]


def redact(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings, dataclass-like values left as they are) fit to be
    written: every value under a secret key (:func:`is_secret_name`) becomes None, and every string loses URL
    credentials, secret query parameters and the values of secret environment variables (:func:`redact_text`).

    The one redaction of every writer of reports, results and config dumps; call it on what is about to be
    written (the live config keeps its token for the process itself).

    >>> redact({"hub_token": "hf_x", "base": {"judge": {"url": "http://a:b@h/v1"}}, "n": [1, "t?token=abc"]},
    ...        secrets=())
    {'hub_token': None, 'base': {'judge': {'url': 'http://***@h/v1'}}, 'n': [1, 't?token=***']}
    """
    values = environment_secrets() if secrets is None else list(secrets)
    return _redact(obj, values)


def _redact(obj: Any, values: list[str]) -> Any:
    if isinstance(obj, str):
        return redact_text(obj, values)
    if isinstance(obj, dict):
        return {k: (None if is_secret_name(k) and obj[k] is not None else _redact(v, values)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, values) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_redact(v, values) for v in obj)
    return obj
