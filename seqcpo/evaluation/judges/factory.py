"""The one entry to the judges: :func:`make_judge` and :func:`check_judge` from a ``JudgeConfig``
(:class:`seqcpo.evaluation.config.JudgeConfig`: backend, model, url, api_key_env, prompt, concurrency, max_retries,
timeout, max_tokens, cache, debias, tie_margin). Each error message is written once, here."""

from __future__ import annotations

import logging

import httpx

from seqcpo.evaluation.judges import http
from seqcpo.evaluation.judges.template import load_judge_prompt

logger = logging.getLogger(__name__)


def _require(cfg) -> None:
    """The options each backend needs; ValueError naming the flag."""
    if cfg.backend == "openai" and (not cfg.url or not cfg.model):
        raise ValueError("--judge openai needs --judge-url (e.g. https://api.openai.com/v1) and --judge-model")
    if cfg.backend == "local" and not cfg.model:
        raise ValueError("--judge local needs --judge-model PATH (a local causal LM checkpoint or name)")
    if cfg.backend not in ("none", "openai", "local"):
        raise ValueError(f"unknown judge backend {cfg.backend!r}; use openai, local or none")


def make_judge(cfg, default_cache_dir: str | None = None, model_and_tokenizer=None):
    """The judge ``cfg`` describes (None for backend "none"); its verdict cache in ``cfg.cache``, else
    ``default_cache_dir``. ``model_and_tokenizer``: a local judge's model already in memory (tests)."""
    _require(cfg)
    cache_dir = cfg.cache or default_cache_dir
    if cfg.backend == "openai":
        from seqcpo.evaluation.judges.api import OpenAIJudge

        return OpenAIJudge(cfg.url, cfg.model, api_key_env=cfg.api_key_env, prompt_path=cfg.prompt,
                           max_concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout=cfg.timeout,
                           max_tokens=cfg.max_tokens or None, cache_dir=cache_dir)
    if cfg.backend == "local":
        from seqcpo.evaluation.judges.local import LocalJudge

        return LocalJudge(cfg.model, prompt_path=cfg.prompt, cache_dir=cache_dir, debias=cfg.debias,
                          tie_margin=cfg.tie_margin, model_and_tokenizer=model_and_tokenizer)
    return None


def check_judge(cfg, timeout: float = 10.0) -> None:
    """Check the judge options before any generation, so that a bad judge fails in seconds, not after hours.

    - every backend but "none": the prompt template reads and has its placeholders;
    - "local": ``model`` is a checkpoint folder with weights (or a loadable name), its config is a causal LM's,
      and its tokenizer has single tokens for A, B and C. Nothing is loaded onto a device.
    - "openai": url and model are given, the URL and the key's variable are sound, the server accepts a
      connection; when it lists its models (``GET {url}/models`` answers 200 with ``data``), ``model`` is among
      them. A server that does not list them, or answers slowly, is not an error (the judging retries and reports).

    Raises ``ValueError`` with a one-line message naming the option.
    """
    _require(cfg)
    if cfg.backend == "none":
        return
    try:
        load_judge_prompt(cfg.prompt)
    except (OSError, ValueError) as e:
        raise ValueError(f"--judge-prompt: {e}") from None
    if cfg.backend == "openai":
        _check_served_model(cfg, timeout)
    else:
        _check_local_model(cfg.model)


def _check_local_model(model: str) -> None:
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


def _check_served_model(cfg, timeout: float) -> None:
    key = http.api_key_from_env(cfg.api_key_env)
    urls = http.judge_urls(cfg.url, has_key=key is not None)
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    http.quiet_http_loggers()
    try:
        response = httpx.get(urls.models, headers=headers, auth=urls.auth, timeout=timeout)
        listed = [m.get("id") for m in response.json().get("data", [])] if response.status_code == 200 else None
    except httpx.ConnectError as e:  # refused or no such host: every request would fail after its retries
        raise ValueError(f"--judge-url: cannot connect to the judge server at {urls.host} ({type(e).__name__}); "
                         "start it or fix the URL") from None
    except Exception as e:  # noqa: BLE001  (the listing is optional; the judging itself retries and reports)
        logger.info("judge %s: could not list the served models (%s); not checked", urls.host, type(e).__name__)
        return
    if listed and cfg.model not in listed:
        shown = ", ".join(sorted(str(m) for m in listed)[:20])
        raise ValueError(f"--judge-model {cfg.model}: the server at {urls.host} does not serve it; it lists {shown}")
