"""HTTP plumbing of the API judge: request URLs, credentials, quiet third-party loggers, the retry policy.

- :func:`judge_urls`: ``http://user:pw@host/v1?api_key=K`` gives the chat URL ``http://host/v1/chat/completions?api_key=K``
  and the listing URL ``http://host/v1/models?api_key=K`` (the path before the query), basic auth from
  ``user:pw@`` when no API key is set, and a clear refusal when both want the ``Authorization`` header.
- :func:`quiet_http_loggers`: httpx, httpcore, openai and urllib3 log records lose URL credentials, secret query
  parameters and ``Bearer`` keys (:func:`seqcpo.io.redact_text`), and httpx's one INFO line per request is
  raised to WARNING unless the user set its level.
- :func:`retrying`: tenacity retries of 429, 408, 5xx and transient network faults with exponential backoff and
  jitter; a ``Retry-After`` header sets the wait.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import os
import random
import re
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import tenacity

from seqcpo.io import redact_text

HTTP_LOGGERS = ("httpx", "httpcore", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy",
                "openai", "openai._base_client", "urllib3", "urllib3.connectionpool")


class Retryable(Exception):
    """A fault worth another try (429, 408, 5xx, a network fault); ``delay``: the server's Retry-After."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


@dataclass(frozen=True)
class JudgeURLs:
    """Where the API judge sends its requests (``chat``, ``models`` may hold a query with a key: never logged or
    kept), what identifies the server (``host``, ``endpoint_id``: no credentials, no query), and basic auth."""

    chat: str
    models: str
    host: str
    endpoint_id: str
    auth: tuple[str, str] | None


def judge_urls(url: str, has_key: bool) -> JudgeURLs:
    """The request URLs of an OpenAI-compatible base URL (``.../v1`` or ``.../v1/chat/completions``).

    ``user:pw@`` in the URL becomes basic auth when no API key is set; with a key both would need the one
    ``Authorization`` header (the key as ``Bearer``), so it is refused. ValueError never echoes a credential.

    >>> u = judge_urls("http://h:8000/v1/?api_key=K", has_key=True)
    >>> u.chat, u.models, u.endpoint_id
    ('http://h:8000/v1/chat/completions?api_key=K', 'http://h:8000/v1/models?api_key=K', 'http://h:8000/v1/chat/completions')
    """
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--judge-url must be http(s)://host[:port]/..., got scheme {parsed.scheme!r}")
    hostname = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    host = hostname + (f":{parsed.port}" if parsed.port else "")
    base = parsed.path.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    auth = None
    if parsed.username is not None:
        if has_key:
            raise ValueError(f"--judge-url: the URL of {host} holds user:password@ and an API key is set too; both "
                             "want the Authorization header: drop the credentials from the URL (the key is sent as "
                             "Bearer) or unset the key to use them as basic auth")
        auth = (urllib.parse.unquote(parsed.username), urllib.parse.unquote(parsed.password or ""))

    def at(path: str, query: str = parsed.query) -> str:
        return urllib.parse.urlunsplit((parsed.scheme, host, base + path, query, ""))

    return JudgeURLs(at("/chat/completions"), at("/models"), host, at("/chat/completions", ""), auth)


class _RedactRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a broken record is logging's own business)
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = _RedactRecords()


def quiet_http_loggers() -> None:
    """Redact credentials from the records of the HTTP libraries' loggers (idempotent); httpx's per-request INFO
    line goes to WARNING unless its level was set."""
    for name in HTTP_LOGGERS:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)
    if logging.getLogger("httpx").level == logging.NOTSET:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def transient_reason(err: BaseException) -> str | None:
    """A short reason when ``err`` is a network fault worth retrying like a 5xx (time-outs, resets, a body cut
    short, refused connections), else None. Only the exception's type is kept: its text may hold a URL."""
    if isinstance(err, (httpx.TimeoutException, TimeoutError)):
        return f"time-out ({type(err).__name__})"
    if isinstance(err, (httpx.TransportError, httpx.DecodingError, http.client.HTTPException, ConnectionError, OSError)):
        return f"connection error ({type(err).__name__})"
    return None


class _Wait(tenacity.wait.wait_base):
    """Retry ``i`` (from 1) waits ``min(backoff_max, backoff_base * 2**(i-1))`` times a jitter in [0.5, 1]; a
    ``Retry-After`` (capped at ``backoff_max``) wins."""

    def __init__(self, backoff_base: float, backoff_max: float):
        self.backoff_base, self.backoff_max = backoff_base, backoff_max

    def __call__(self, retry_state) -> float:
        err = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(err, Retryable) and err.delay is not None:
            return min(err.delay, self.backoff_max)
        return backoff(retry_state.attempt_number, self.backoff_base, self.backoff_max)


def backoff(attempt: int, backoff_base: float, backoff_max: float) -> float:
    """The wait before try ``attempt + 1`` without a Retry-After (also between re-asks of a malformed reply)."""
    return min(backoff_max, backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def retrying(max_retries: int, backoff_base: float, backoff_max: float, before_sleep) -> tenacity.Retrying:
    """A tenacity policy: retry :class:`Retryable` up to ``max_retries`` times, then re-raise it."""
    return tenacity.Retrying(retry=tenacity.retry_if_exception_type(Retryable),
                             stop=tenacity.stop_after_attempt(max_retries + 1),
                             wait=_Wait(backoff_base, backoff_max), before_sleep=before_sleep, reraise=True)


quiet_http_loggers()


DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"  # the one default of the key's variable (JudgeConfig.api_key_env reads it)


def api_key_from_env(api_key_env: str) -> str | None:
    """The API key in the environment variable named ``api_key_env`` (None when unset or empty).

    ValueError when ``api_key_env`` is not a variable name; the message never echoes it (a user may have passed
    the key itself)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or ""):
        raise ValueError("--judge-api-key-env must be the NAME of an environment variable (letters, digits, _), "
                         "not the key itself")
    return os.environ.get(api_key_env) or None
