"""The API judge: any OpenAI-compatible ``/chat/completions`` endpoint (a hosted model, vLLM, llama.cpp), over
``httpx`` with tenacity's retries.

The API key is read from the environment variable named by ``api_key_env`` and goes nowhere but the
``Authorization`` header: not into a file, a log line, a cache key or an exception message (a server that echoes it
back is scrubbed). Every HTTP fault that may pass is retried with backoff and jitter, like a 5xx: 429 and 408,
time-outs, refused and reset connections, a body cut short (``httpx.RemoteProtocolError``/``ReadError``,
``http.client.IncompleteRead``); a ``Retry-After`` header sets the wait. A reply that is not JSON, has no choices or
names none of A, B, C is asked again (``max_malformed`` times) before the verdict counts as failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Sequence

import httpx

from seqcpo.evaluation.judges import http
from seqcpo.evaluation.judges.cache import VerdictCache
from seqcpo.evaluation.judges.template import load_judge_prompt, render_judge_prompt
from seqcpo.evaluation.judges.verdicts import Verdict, parse_answer
from seqcpo.io import redact_text

logger = logging.getLogger(__name__)


class _Final(Exception):
    """A fault no retry mends (401, 404, ...)."""


def reply_content(text: str) -> tuple[str | None, str | None]:
    """(message content, problem) from a chat-completions response body."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(data, dict) or not data.get("choices"):
        return None, "no choices"
    try:
        choice = data["choices"][0]
        content = choice.get("message", {}).get("content")
        if content is None:
            content = choice.get("text")  # completions-style servers
    except (AttributeError, IndexError, KeyError, TypeError):
        return None, "no message in the first choice"
    if not isinstance(content, str):
        return None, "no message content"
    return content, None


def _check_settings(max_concurrency, max_retries, max_malformed, timeout, temperature, backoff_base, backoff_max,
                    max_tokens) -> None:
    if max_concurrency < 1 or max_retries < 0 or max_malformed < 0:
        raise ValueError("max_concurrency >= 1, max_retries >= 0 and max_malformed >= 0 are required")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"the judge time-out must be a finite number of seconds > 0, got {timeout}")
    for name, value in (("temperature", temperature), ("backoff_base", backoff_base), ("backoff_max", backoff_max)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"judge {name} must be a finite number >= 0, got {value}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"judge max_tokens must be >= 1 (or None: not sent), got {max_tokens}")


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        url: the API base, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (a query such as
            ``?api_key=`` is kept on every request and never reported; ``user:pw@`` is basic auth when no key is
            set: :func:`seqcpo.evaluation.judges.http.judge_urls`).
        model: the judge model name sent in the request (e.g. ``gpt-4o-mini``).
        api_key_env: name of the environment variable holding the key. Unset: no Authorization header
            (fine for a local vLLM or llama.cpp server).
        prompt_path: judge prompt template file; None = the packaged default.
        max_concurrency: requests in flight at once in :meth:`judge_many` (threads and pooled connections).
        max_retries: retries of one request after 429, 408, 5xx, time-outs and every transient network fault.
        max_malformed: extra tries when the reply is not JSON, has no choices, or names no A/B/C.
        timeout: seconds per network operation (connect, each read, each write), not a whole reply.
        backoff_base, backoff_max: retry ``i`` (from 1) sleeps ``min(backoff_max, backoff_base * 2**(i-1))``
            times a uniform jitter in [0.5, 1]; a ``Retry-After`` header (capped at ``backoff_max``) wins.
        cache_dir: folder of ``judge_cache.jsonl``.
        temperature, max_tokens: sent with each request; ``max_tokens=None`` leaves it out (some reasoning
            models refuse it).
    """

    backend = "openai"

    def __init__(self, url: str, model: str, api_key_env: str = http.DEFAULT_API_KEY_ENV,
                 prompt_path: str | os.PathLike | None = None, max_concurrency: int = 8, max_retries: int = 5,
                 timeout: float = 60.0, cache_dir: str | os.PathLike | None = None, backoff_base: float = 1.0,
                 backoff_max: float = 60.0, max_malformed: int = 2, temperature: float = 0.0,
                 max_tokens: int | None = 16):
        _check_settings(max_concurrency, max_retries, max_malformed, timeout, temperature, backoff_base, backoff_max,
                        max_tokens)
        self._api_key = http.api_key_from_env(api_key_env)
        self.api_key_env = api_key_env
        self.urls = http.judge_urls(url, has_key=self._api_key is not None)
        self.host, self.endpoint_id = self.urls.host, self.urls.endpoint_id  # no credentials, no query
        self.model = model
        if self._api_key is None and self.urls.auth is None:
            logger.warning("the environment variable %s is not set: calling the judge without an Authorization "
                           "header", api_key_env)
        self.template, self.prompt_sha256 = load_judge_prompt(prompt_path)
        self.prompt_path = str(prompt_path) if prompt_path else None
        self.max_concurrency, self.max_retries, self.max_malformed = max_concurrency, max_retries, max_malformed
        self.timeout, self.backoff_base, self.backoff_max = timeout, backoff_base, backoff_max
        self.temperature, self.max_tokens = temperature, max_tokens
        self.cache = VerdictCache(cache_dir)
        self.stats: Counter = Counter()  # requests, retries, cache_hits, failures, malformed
        self._stats_lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIJudge(host={self.host!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model, "host": self.host, "prompt_sha256": self.prompt_sha256,
                "prompt_path": self.prompt_path}

    def cache_identity(self) -> dict:
        """Everything besides the template and the texts that decides a verdict: the server, the model and
        the sampling settings (never the key)."""
        return {"backend": self.backend, "endpoint": self.endpoint_id, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _count(self, what: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[what] += n

    def _scrub(self, text: str) -> str:
        """Remove the key (a server may echo it back) and URL credentials from any text we keep."""
        return redact_text(text, [self._api_key] if self._api_key else [])

    def headers(self) -> dict[str, str]:
        """The request headers: JSON, and the key as ``Bearer`` when it is set."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def client(self) -> httpx.Client:
        """The pooled HTTP client, made at first use (thread-safe; one connection per request in flight)."""
        with self._client_lock:
            if self._client is None:
                http.quiet_http_loggers()
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout), auth=self.urls.auth,
                    limits=httpx.Limits(max_connections=self.max_concurrency,
                                        max_keepalive_connections=self.max_concurrency))
            return self._client

    def close(self) -> None:
        """Close the pooled connections (a later request opens new ones)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __del__(self):
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001  (interpreter shutdown)
                pass

    def _post(self, body: bytes) -> str:
        """One HTTP request. Returns the response text, or raises Retryable / _Final."""
        client = self.client()
        self._count("requests")
        try:
            response = client.post(self.urls.chat, content=body, headers=self.headers())
            text = response.text  # the whole body: a connection cut mid-body raises here
        except Exception as e:  # noqa: BLE001  (sorted below; the text is never kept: it may hold the URL)
            reason = http.transient_reason(e)
            if reason is None:
                raise
            raise http.Retryable(reason) from None
        status = response.status_code
        if status < 300:
            return text
        # the error body is not kept: some APIs echo (part of) the key in 401 messages
        retry_after = http.retry_after_seconds(response.headers.get("Retry-After"))
        if status in (408, 429) or status >= 500:
            raise http.Retryable(f"HTTP {status}", retry_after)
        raise _Final(f"HTTP {status} from {self.host}")

    def _before_sleep(self, retry_state) -> None:
        err = retry_state.outcome.exception()
        wait = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        logger.info("judge %s: %s, retry %d/%d in %.2fs", self.host, getattr(err, "reason", type(err).__name__),
                    retry_state.attempt_number, self.max_retries, wait)
        self._count("retries")

    def _send(self, body: bytes) -> str:
        """:meth:`_post` under the retry policy (tenacity); raises the last Retryable or _Final."""
        policy = http.retrying(self.max_retries, self.backoff_base, self.backoff_max, self._before_sleep)
        return policy(self._post, body)

    def _ask(self, text: str) -> Verdict:
        request = {"model": self.model, "messages": [{"role": "user", "content": text}], "temperature": self.temperature}
        if self.max_tokens:
            request["max_tokens"] = self.max_tokens
        body = json.dumps(request).encode("utf-8")
        malformed = 0
        while True:
            try:
                reply = self._send(body)
            except _Final as e:
                return Verdict(None, error=str(e))
            except http.Retryable as e:
                return Verdict(None, error=f"{e.reason}; gave up after {self.max_retries} retries")
            content, problem = reply_content(reply)
            winner = parse_answer(content) if problem is None else None
            if winner is not None:
                return Verdict(winner, raw=self._scrub(content))
            problem = problem or "answer names none of A, B, C"
            self._count("malformed")
            malformed += 1
            raw = self._scrub((content if content is not None else reply)[:2000])
            if malformed > self.max_malformed:
                return Verdict(None, raw=raw, error=f"malformed reply: {problem}")
            logger.info("judge %s: malformed reply (%s), asking again (%d/%d)", self.host, problem, malformed,
                        self.max_malformed)
            time.sleep(http.backoff(malformed, self.backoff_base, self.backoff_max))

    def judge(self, prompt: str, a: str, b: str) -> Verdict:
        key = VerdictCache.key(self.cache_identity(), self.template, prompt, a, b)
        hit = self.cache.get(key)
        if hit is not None:
            self._count("cache_hits")
            return hit
        verdict = self._ask(render_judge_prompt(self.template, prompt, a, b))
        if verdict.failed:
            self._count("failures")
        else:
            self.cache.put(key, verdict, self.cache_identity())
        return verdict

    def judge_many(self, triples: Sequence[tuple[str, str, str]], progress: bool = True) -> list[Verdict]:
        """Verdicts for many triples, ``max_concurrency`` requests in flight; identical triples asked once."""
        from tqdm.auto import tqdm

        unique = list(dict.fromkeys(triples))
        results: dict[tuple[str, str, str], Verdict] = {}
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._judge_safely, *t): t for t in unique}
            with tqdm(total=len(futures), desc=f"judge {self.model}", unit="pair", disable=not progress) as bar:
                for f in as_completed(futures):
                    results[futures[f]] = f.result()
                    bar.update(1)
        failed = [v for v in results.values() if v.failed]
        if failed:  # said where the user looks, not only in the report's judge calls line
            logger.warning("judge %s: %s of %d comparisons failed (first: %s); they count as no verdict%s",
                           self.host, "every one" if len(failed) == len(results) else len(failed), len(results),
                           failed[0].error, ": no win rate can be computed" if len(failed) == len(results) else "")
        return [results[t] for t in triples]

    def _judge_safely(self, prompt: str, a: str, b: str) -> Verdict:
        """:meth:`judge`, with an unexpected error turned into a failed verdict (one bad item must not
        lose a whole batch of paid calls)."""
        try:
            return self.judge(prompt, a, b)
        except Exception as e:  # noqa: BLE001
            self._count("failures")
            logger.warning("judge %s: unexpected %s", self.host, type(e).__name__)
            return Verdict(None, error=self._scrub(f"unexpected {type(e).__name__}: {e}"))
