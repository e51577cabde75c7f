"""Pairwise judges: which of two continuations of a prompt is better.

A judge returns a :class:`Verdict` with ``winner`` "A", "B", "tie", or ``None`` when it failed (HTTP
errors past the retry budget, replies that never parsed). A failure is reported as a failure and never
counted as a loss (see :mod:`seqcpo.evaluation.winrate`).

Both backends fill the same prompt template (``seqcpo/templates/judge_pairwise.txt`` by default, or any
file with the placeholders ``{prompt}``, ``{a}``, ``{b}``); the template asks for one letter: ``A``, ``B``,
or ``C`` for a tie. Its SHA-256 is part of every report and of every cache key.

- :class:`OpenAIJudge` POSTs to ``{url}/chat/completions`` of any OpenAI-compatible server (a hosted
  model, vLLM, llama.cpp) through ``httpx``. The API key is read from the environment
  variable named by ``api_key_env`` and goes nowhere but the ``Authorization`` header: not into a file,
  a log line, a cache key or an exception message.
- :class:`LocalJudge` runs a local causal LM once per pair and reads the preference from the next-token
  log-probabilities of the answer letters ``A``, ``B`` and ``C`` (= tie) after the rendered prompt
  (through the chat template when the tokenizer has one). Deterministic: no sampling.

Verdicts that succeeded are cached in ``<cache_dir>/judge_cache.jsonl`` keyed by SHA-256 of everything that
decides them: the judge's identity (API: endpoint URL without credentials or query, model, temperature,
max_tokens; local: the checkpoint's content identity and prompt rendering), the template text, and the prompt
and both texts. Another server, model or template never reads a verdict it did not make. Failures are not
cached, so a rerun retries them.

Every HTTP fault that may pass is retried with backoff and jitter, like a 5xx: 429 and 408, time-outs, refused
and reset connections, a body cut short (``httpx.RemoteProtocolError``/``ReadError``,
``http.client.IncompleteRead``). A ``Retry-After`` header sets the wait.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import httpx

logger = logging.getLogger(__name__)

WINNERS = ("A", "B", "tie")
DEFAULT_CACHE_DIR = Path(os.environ.get("SEQCPO_CACHE", Path.home() / ".cache" / "seqcpo")) / "judge"


@dataclass
class Verdict:
    """One pairwise judgement.

    Attributes:
        winner: "A", "B", "tie", or None when the judge failed.
        raw: the judge's reply text (API backend) or its answer log-probs as JSON (local backend).
        error: why it failed (None on success).
        cached: True when read from the verdict cache.
        logp: local backend: the answer log-probs ``{"A", "B", "tie"}`` (what the debiased win rate reads).
    """

    winner: str | None
    raw: str = ""
    error: str | None = None
    cached: bool = False
    logp: dict[str, float] | None = None

    @property
    def failed(self) -> bool:
        return self.winner is None


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything with ``judge(prompt, a, b) -> Verdict`` and ``describe() -> dict`` (backend, model, host,
    prompt_sha256). ``judge_many`` is optional; :func:`judge_all` falls back to a loop."""

    def judge(self, prompt: str, a: str, b: str) -> Verdict:
        ...

    def describe(self) -> dict:
        ...


def judge_all(judge: PairwiseJudge, triples: Sequence[tuple[str, str, str]], progress: bool = True) -> list[Verdict]:
    """Judge many (prompt, a, b) triples, concurrently when the judge supports it."""
    many = getattr(judge, "judge_many", None)
    if many is not None:
        return many(triples, progress=progress)
    return [judge.judge(*t) for t in triples]


# ----------------------------------------------------------------------------- the prompt


def load_judge_prompt(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """Read a judge prompt template. Returns (text, SHA-256 hex of its UTF-8 bytes).

    ``None`` reads the packaged default ``seqcpo/templates/judge_pairwise.txt``.
    """
    if path is None:
        text = resources.files("seqcpo").joinpath("templates/judge_pairwise.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    missing = [p for p in ("{prompt}", "{a}", "{b}") if p not in text]
    if missing:
        raise ValueError(f"judge prompt {path or 'default'} lacks the placeholder(s) {', '.join(missing)}")
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_judge_prompt(template: str, prompt: str, a: str, b: str) -> str:
    """Fill the placeholders in one pass (not ``str.format``: texts may contain braces or placeholders)."""
    values = {"{prompt}": prompt, "{a}": a, "{b}": b}
    return re.sub(r"\{prompt\}|\{a\}|\{b\}", lambda m: values[m.group(0)], template)


_BARE = re.compile(r"^[\s\"'*\[\(]*(A|B|C|tie)[\s\"'*\]\)\.]*$", re.IGNORECASE)
_TAGGED = re.compile(  # the letter is case-sensitive here: "Answer: a tie" must not read as A
    r"(?i:answer|verdict|winner)\s*(?:is)?\s*[:\-]?\s*[\"'*\[\(]*\s*(A|B|C|[Tt]ie|TIE)\b(?![\w'])"
)
_BRACKETED = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)


def parse_answer(text: str | None) -> str | None:
    """Map a judge reply to "A", "B", "tie" or None (unparseable).

    Accepted: a bare letter (``A``, ``"B".``, ``**C**``), ``tie``, ``[[A]]``, or ``Answer: B`` anywhere
    (the last such tag wins). ``C`` means tie, as the default template asks.

    >>> [parse_answer(s) for s in ["A", " b.", "C", "Tie", "Answer: B", "[[A]]", "I think so"]]
    ['A', 'B', 'tie', 'tie', 'B', 'A', None]
    """
    if not text:
        return None
    text = text.strip()
    m = _BARE.match(text)
    if m is None:
        tags = _BRACKETED.findall(text) or _TAGGED.findall(text)
        if not tags:
            return None
        letter = tags[-1]
    else:
        letter = m.group(1)
    letter = letter.upper()
    return {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}[letter]


# ----------------------------------------------------------------------------- the cache


class VerdictCache:
    """Append-only JSONL cache of successful verdicts, safe for threads and for concurrent processes
    appending to the same file (each entry is one ``os.write`` on an O_APPEND descriptor; a torn line
    is skipped on load)."""

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.path = Path(cache_dir or DEFAULT_CACHE_DIR) / "judge_cache.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(judge_identity: dict, template: str, prompt: str, a: str, b: str) -> str:
        """SHA-256 of everything that decides a verdict: the judge's identity (endpoint URL, model and sampling
        settings for an API; the checkpoint's content identity for a local model), the template and the texts."""
        blob = json.dumps([judge_identity, template, prompt, a, b], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Verdict | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        return Verdict(winner=entry["winner"], raw=entry.get("raw", ""), cached=True, logp=entry.get("logp"))

    def put(self, key: str, verdict: Verdict, judge_identity: dict) -> None:
        if verdict.winner is None:
            return
        entry = {"key": key, "winner": verdict.winner, "raw": verdict.raw, "judge": judge_identity,
                 "logp": verdict.logp}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._entries[key] = entry
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def __len__(self) -> int:
        return len(self._entries)


# ----------------------------------------------------------------------------- OpenAI-compatible API


class _Retryable(Exception):
    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class _Final(Exception):
    pass


def _retry_after_seconds(value: str | None) -> float | None:
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


def _transient_reason(err: BaseException) -> str | None:
    """A short reason when ``err`` is a network fault worth retrying like a 5xx (time-outs, resets, a body cut
    short, refused connections), else None. Only the exception's type is kept: its text may hold a URL."""
    if isinstance(err, (httpx.TimeoutException, TimeoutError)):
        return f"time-out ({type(err).__name__})"
    if isinstance(err, (httpx.TransportError, httpx.DecodingError, http.client.HTTPException, ConnectionError, OSError)):
        return f"connection error ({type(err).__name__})"
    return None


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint, over ``httpx``.

    Args:
        url: the API base, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        model: the judge model name sent in the request (e.g. ``gpt-4o-mini``).
        api_key_env: name of the environment variable holding the key. Unset: no Authorization header
            (fine for a local vLLM or llama.cpp server).
        prompt_path: judge prompt template file; None = the packaged default.
        max_concurrency: requests in flight at once in :meth:`judge_many` (threads and pooled connections).
        max_retries: retries of one request after 429, 408, 5xx, time-outs and every transient network fault
            (refused or reset connections, a body cut short).
        max_malformed: extra tries when the reply is not JSON, has no choices, or names no A/B/C.
        timeout: seconds per network operation (connect, each read, each write).
        backoff_base, backoff_max: retry ``i`` (from 1) sleeps ``min(backoff_max, backoff_base * 2**(i-1))``
            times a uniform jitter in [0.5, 1]; a ``Retry-After`` header (429, 5xx; capped at ``backoff_max``)
            wins.
        cache_dir: folder of ``judge_cache.jsonl``.
        temperature, max_tokens: sent with each request; ``max_tokens=None`` leaves it out (some reasoning
            models refuse it).

    ``timeout`` bounds each network operation, not a whole reply that trickles in.
    """

    backend = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        prompt_path: str | os.PathLike | None = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60.0,
        cache_dir: str | os.PathLike | None = None,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_malformed: int = 2,
        temperature: float = 0.0,
        max_tokens: int | None = 16,
    ):
        if max_concurrency < 1 or max_retries < 0 or max_malformed < 0:
            raise ValueError("max_concurrency >= 1, max_retries >= 0 and max_malformed >= 0 are required")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"the judge time-out must be a finite number of seconds > 0, got {timeout}")
        for name, value in (("temperature", temperature), ("backoff_base", backoff_base), ("backoff_max", backoff_max)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"judge {name} must be a finite number >= 0, got {value}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"judge max_tokens must be >= 1 (or None: not sent), got {max_tokens}")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        parsed = urllib.parse.urlsplit(self.endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"judge URL must be http(s)://host[:port]/..., got scheme {parsed.scheme!r}")
        self.host = parsed.hostname + (f":{parsed.port}" if parsed.port else "")  # no user:password@
        # what identifies the server in cache keys and reports: no user:password@, no query (either may hold a secret)
        self.endpoint_id = urllib.parse.urlunsplit((parsed.scheme, self.host, parsed.path, "", ""))
        self.model = model
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or ""):
            # never echo the value: a user may have passed the key itself
            raise ValueError("api_key_env must be the NAME of an environment variable (letters, digits, _), "
                             "not the key itself")
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            shown = api_key_env if re.fullmatch(r"[A-Z_][A-Z0-9_]*", api_key_env) else "named by api_key_env"
            logger.warning("the environment variable %s is not set: calling the judge without an Authorization "
                           "header", shown)
        self.template, self.prompt_sha256 = load_judge_prompt(prompt_path)
        self.prompt_path = str(prompt_path) if prompt_path else None
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.max_malformed = max_malformed
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.cache = VerdictCache(cache_dir)
        self.stats: Counter = Counter()  # requests, retries, cache_hits, failures, malformed
        self._stats_lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIJudge(host={self.host!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.model,
            "host": self.host,
            "prompt_sha256": self.prompt_sha256,
            "prompt_path": self.prompt_path,
        }

    def cache_identity(self) -> dict:
        """Everything besides the template and the texts that decides a verdict: the server, the model and
        the sampling settings (never the key)."""
        return {"backend": self.backend, "endpoint": self.endpoint_id, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _count(self, what: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[what] += n

    def _scrub(self, text: str) -> str:
        """Remove the key from any text we keep (a server may echo it back)."""
        if self._api_key and self._api_key in text:
            return text.replace(self._api_key, "***")
        return text

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def client(self) -> httpx.Client:
        """The pooled HTTP client, made at first use (thread-safe; one connection per request in flight)."""
        with self._client_lock:
            if self._client is None:
                parsed = urllib.parse.urlsplit(self.endpoint)
                auth = None
                if parsed.username is not None:  # basic auth from the URL, kept out of the logged request URL
                    auth = (urllib.parse.unquote(parsed.username), urllib.parse.unquote(parsed.password or ""))
                if logging.getLogger("httpx").level == logging.NOTSET:  # one INFO line per request otherwise
                    logging.getLogger("httpx").setLevel(logging.WARNING)
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.max_concurrency,
                                        max_keepalive_connections=self.max_concurrency),
                    auth=auth,
                )
                self._url = urllib.parse.urlunsplit((parsed.scheme, self.host, parsed.path, parsed.query, ""))
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
        """One HTTP request. Returns the response text, or raises _Retryable / _Final."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        client = self.client()
        self._count("requests")
        try:
            response = client.post(self._url, content=body, headers=headers)
            text = response.text  # the whole body: a connection cut mid-body raises here
        except Exception as e:  # noqa: BLE001  (sorted below; the text is never kept: it may hold the URL)
            reason = _transient_reason(e)
            if reason is None:
                raise
            raise _Retryable(reason) from None
        status = response.status_code
        if status < 300:
            return text
        # the error body is not kept: some APIs echo (part of) the key in 401 messages
        retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
        if status == 429:
            raise _Retryable("HTTP 429", retry_after)
        if status >= 500 or status == 408:
            raise _Retryable(f"HTTP {status}", retry_after)
        raise _Final(f"HTTP {status} from {self.host}")

    def _ask(self, text: str) -> Verdict:
        request = {"model": self.model, "messages": [{"role": "user", "content": text}], "temperature": self.temperature}
        if self.max_tokens:
            request["max_tokens"] = self.max_tokens
        body = json.dumps(request).encode("utf-8")
        retries = malformed = 0
        while True:
            try:
                reply = self._post(body)
            except _Final as e:
                return Verdict(None, error=str(e))
            except _Retryable as e:
                retries += 1
                if retries > self.max_retries:
                    return Verdict(None, error=f"{e.reason}; gave up after {self.max_retries} retries")
                delay = min(e.delay, self.backoff_max) if e.delay is not None else self._backoff(retries)
                logger.info("judge %s: %s, retry %d/%d in %.2fs", self.host, e.reason, retries, self.max_retries, delay)
                self._count("retries")
                time.sleep(delay)
                continue
            content, problem = _reply_content(reply)
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
            time.sleep(self._backoff(malformed))

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
        from tqdm.auto import tqdm

        unique = list(dict.fromkeys(triples))  # identical triples are asked once
        results: dict[tuple[str, str, str], Verdict] = {}
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._judge_safely, *t): t for t in unique}
            with tqdm(total=len(futures), desc=f"judge {self.model}", unit="pair", disable=not progress) as bar:
                for f in as_completed(futures):
                    results[futures[f]] = f.result()
                    bar.update(1)
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


def _reply_content(text: str) -> tuple[str | None, str | None]:
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


# ----------------------------------------------------------------------------- local model


class LocalJudge:
    """A local Hugging Face causal LM as a judge, by next-token log-probabilities.

    The filled template (right-stripped, so it ends with ``Answer:``; wrapped in the chat template when
    the tokenizer has one) is run once; the score of a label is the log-sum-exp of the next-token
    log-probs of its single-token spellings (``"A"``, ``" A"``; ``"B"``, ``" B"``; ``"C"``, ``" C"`` for a
    tie). The verdict is the arg-max label, ties between scores broken in the order A, B, tie. ``raw``
    holds the three scores as JSON. Prompts longer than the model's context keep their last tokens.

    ``debias`` (default True): when both orders are judged, the win rate reads the summed log-odds of the
    two orders instead of the two arg-max verdicts (:func:`seqcpo.evaluation.winrate.debiased_outcome`), so
    the position bias of a small judge cancels; ``tie_margin`` is the log-odds band counted as a tie.
    """

    backend = "local"

    def __init__(
        self,
        model_path: str,
        prompt_path: str | os.PathLike | None = None,
        dtype: str = "float32",
        device: str | None = None,
        use_chat_template: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        model_and_tokenizer=None,
        debias: bool = True,
        tie_margin: float = 0.0,
        batch_size: int = 8,
    ):
        from seqcpo.evaluation.checkpoints import context_length, load_checkpoint

        if not (float(tie_margin) >= 0 and math.isfinite(tie_margin)):
            raise ValueError(f"--judge-tie-margin must be a finite number >= 0, got {tie_margin}")
        if int(batch_size) < 1:
            raise ValueError(f"the local judge's batch_size must be >= 1, got {batch_size}")
        self.debias = debias
        self.tie_margin = float(tie_margin)
        self.batch_size = max(1, int(batch_size))
        self.model_path = str(model_path)
        self.template, self.prompt_sha256 = load_judge_prompt(prompt_path)
        self.prompt_path = str(prompt_path) if prompt_path else None
        self.model, self.tokenizer = model_and_tokenizer or load_checkpoint(self.model_path, dtype=dtype, device=device)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.label_ids = {label: self._single_token_ids(letter) for label, letter in (("A", "A"), ("B", "B"), ("tie", "C"))}
        self.max_length = context_length(self.model) or 2048
        self.cache = VerdictCache(cache_dir) if cache_dir is not None else None
        self._identity: dict | None = None
        self.stats: Counter = Counter()

    def cache_identity(self) -> dict:
        """The checkpoint's content identity (not its path) and how prompts are rendered for it."""
        if self._identity is None:
            from seqcpo.evaluation.checkpoints import checkpoint_identity

            try:
                model_id = checkpoint_identity(self.model_path)
            except (OSError, ValueError):  # a model handed in with a label for a path: only the label is known
                model_id = f"label:{self.model_path}"
            self._identity = {"backend": self.backend, "model": model_id, "chat_template": self.use_chat_template,
                              "max_length": self.max_length}
        return self._identity

    def _single_token_ids(self, letter: str) -> list[int]:
        ids = set()
        for spelling in (letter, " " + letter):
            enc = self.tokenizer.encode(spelling, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
        if not ids:
            raise ValueError(f"the judge tokenizer has no single token for {letter!r}; LocalJudge needs one")
        return sorted(ids)

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.model_path,
            "host": None,
            "prompt_sha256": self.prompt_sha256,
            "prompt_path": self.prompt_path,
            "answer_tokens": {k: v for k, v in self.label_ids.items()},
            "combine": (f"log-odds summed over both orders, tie within {self.tie_margin:g}" if self.debias
                        else "arg-max verdicts"),
        }

    def render_ids(self, prompt: str, a: str, b: str) -> list[int]:
        text = render_judge_prompt(self.template, prompt, a, b).rstrip()
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(text)["input_ids"]
        if len(ids) > self.max_length:
            if not self.stats["truncated"]:  # once per judge; the count is in stats
                logger.warning("judge prompt of %d tokens cut to its last %d (the model's context); further cuts "
                               "are counted in the judge stats", len(ids), self.max_length)
            self.stats["truncated"] += 1
            ids = ids[-self.max_length:]
        return ids

    def judge(self, prompt: str, a: str, b: str) -> Verdict:
        return self.judge_many([(prompt, a, b)], progress=False)[0]

    def _verdict(self, logits) -> Verdict:
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        scores = {label: torch.logsumexp(logp[tids], dim=0).item() for label, tids in self.label_ids.items()}
        winner = max(WINNERS, key=lambda lab: scores[lab])  # max keeps the first of equal scores
        return Verdict(winner, raw=json.dumps({"logp": scores}), logp=scores)

    def judge_many(self, triples: Sequence[tuple[str, str, str]], progress: bool = True) -> list[Verdict]:
        """Verdicts for many triples: cache hits first, the rest in left-padded batches of ``batch_size``
        prompts (sorted by length so padding stays small); the same numbers as one prompt at a time."""
        import torch
        from tqdm.auto import tqdm

        from seqcpo.padding import pad_batch

        out: list[Verdict | None] = [None] * len(triples)
        keys: list[str | None] = [None] * len(triples)
        todo = []
        for i, (prompt, a, b) in enumerate(triples):
            if self.cache is not None:
                keys[i] = VerdictCache.key(self.cache_identity(), self.template, prompt, a, b)
                hit = self.cache.get(keys[i])
                if hit is not None:
                    self.stats["cache_hits"] += 1
                    out[i] = hit
                    continue
            todo.append((i, self.render_ids(prompt, a, b)))
        todo.sort(key=lambda t: len(t[1]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bar = tqdm(total=len(triples), initial=len(triples) - len(todo), desc="judge (local)", unit="pair",
                   disable=not progress)
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            input_ids, attn = pad_batch([ids for _, ids in chunk], pad, side="left")
            # left padding: positions count from each prompt's first real token
            position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                                    position_ids=position_ids.to(device), logits_to_keep=1).logits[:, -1]
            for r, (i, _) in enumerate(chunk):
                verdict = self._verdict(logits[r])
                self.stats["requests"] += 1
                if self.cache is not None:
                    self.cache.put(keys[i], verdict, self.cache_identity())
                out[i] = verdict
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def build_judge(backend: str, model: str | None = None, url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                prompt_path: str | None = None, cache_dir: str | None = None, **kwargs) -> PairwiseJudge | None:
    """Judge from CLI options: backend "openai" (needs url and model), "local" (model = path) or "none"."""
    if backend == "none":
        return None
    if backend == "openai":
        if not url or not model:
            raise ValueError("--judge openai needs --judge-url (e.g. https://api.openai.com/v1) and --judge-model")
        return OpenAIJudge(url, model, api_key_env=api_key_env, prompt_path=prompt_path, cache_dir=cache_dir, **kwargs)
    if backend == "local":
        if not model:
            raise ValueError("--judge local needs --judge-model PATH (a local causal LM checkpoint or name)")
        return LocalJudge(model, prompt_path=prompt_path, cache_dir=cache_dir, **kwargs)
    raise ValueError(f"unknown judge backend {backend!r}; use openai, local or none")


def check_judge(backend: str, model: str | None = None, url: str | None = None, prompt_path: str | None = None,
                api_key_env: str = "OPENAI_API_KEY", timeout: float = 10.0) -> None:
    """Check the judge options before any generation, so that a bad judge fails in seconds, not after hours.

    - every backend but "none": the prompt template reads and has its placeholders;
    - "local": ``model`` is a checkpoint folder with weights (or a loadable name), its config is a causal LM's,
      and its tokenizer has single tokens for A, B and C. Nothing is loaded onto a device.
    - "openai": url and model are given; the server accepts a connection; when it lists its models
      (``GET {url}/models`` answers 200 with ``data``), ``model`` is among them. A server that does not list
      them, or answers slowly, is not an error (the judging itself retries and reports).

    Raises ``ValueError`` with a one-line message naming the option.
    """
    if backend == "none":
        return
    try:
        load_judge_prompt(prompt_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--judge-prompt: {e}") from None
    if backend == "openai":
        if not url or not model:
            raise ValueError("--judge openai needs --judge-url (e.g. https://api.openai.com/v1) and --judge-model")
        _check_served_model(url, model, api_key_env, timeout)
        return
    if backend != "local":
        raise ValueError(f"unknown judge backend {backend!r}; use openai, local or none")
    if not model:
        raise ValueError("--judge local needs --judge-model PATH (a local causal LM checkpoint or name)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from seqcpo.evaluation.checkpoints import checkpoint_identity, load_tokenizer_only
    from seqcpo.models import resolve_model_path

    try:
        checkpoint_identity(model)
        config = AutoConfig.from_pretrained(resolve_model_path(model))
        tokenizer = load_tokenizer_only(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"--judge-model {model}: not a loadable checkpoint ({str(e).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--judge-model {model}: a {config.model_type!r} model is not a causal LM; "
                         "LocalJudge needs one")
    for letter in ("A", "B", "C"):
        if not any(len(tokenizer.encode(s, add_special_tokens=False)) == 1 for s in (letter, " " + letter)):
            raise ValueError(f"--judge-model {model}: its tokenizer has no single token for {letter!r}; "
                             "LocalJudge needs one")


def _check_served_model(url: str, model: str, api_key_env: str, timeout: float) -> None:
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    headers = {"Accept": "application/json"}
    key = os.environ.get(api_key_env or "") if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or "") else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    host = urllib.parse.urlsplit(base).hostname
    try:
        response = httpx.get(base + "/models", headers=headers, timeout=timeout)
        listed = [m.get("id") for m in response.json().get("data", [])] if response.status_code == 200 else None
    except httpx.ConnectError as e:  # refused or no such host: every request would fail after its retries
        raise ValueError(f"--judge-url: cannot connect to the judge server at {host} ({type(e).__name__}); "
                         "start it or fix the URL") from None
    except Exception as e:  # noqa: BLE001  (the listing is optional; the judging itself retries and reports)
        logger.info("judge %s: could not list the served models (%s); not checked", host, type(e).__name__)
        return
    if listed and model not in listed:
        shown = ", ".join(sorted(str(m) for m in listed)[:20])
        raise ValueError(f"--judge-model {model}: the server at {host} does not serve it; it lists {shown}")
