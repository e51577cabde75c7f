"""Pairwise judges: which of two continuations of a prompt is better.

- :mod:`.verdicts`: :class:`Verdict` ("A", "B", "tie", or None when the judge failed: never counted as a loss),
  the :class:`PairwiseJudge` protocol, :func:`parse_answer`;
- :mod:`.template`: the prompt template (placeholders ``{prompt}``, ``{a}``, ``{b}``; its SHA-256 in every
  report and cache key);
- :mod:`.cache`: :class:`VerdictCache`, keyed by everything that decides a verdict;
- :mod:`.api`: :class:`OpenAIJudge`, any OpenAI-compatible endpoint over httpx with tenacity's retries
  (:mod:`.http`: URLs, credentials, quiet loggers, the retry policy);
- :mod:`.local`: :class:`LocalJudge`, a local causal LM read by its answer-letter log-probabilities;
- :mod:`.factory`: :func:`make_judge` / :func:`check_judge` from a ``JudgeConfig``, the one way in.
"""

from seqcpo.evaluation.judges.api import OpenAIJudge
from seqcpo.evaluation.judges.cache import DEFAULT_CACHE_DIR, VerdictCache
from seqcpo.evaluation.judges.factory import check_judge, make_judge
from seqcpo.evaluation.judges.http import DEFAULT_API_KEY_ENV
from seqcpo.evaluation.judges.local import LocalJudge
from seqcpo.evaluation.judges.template import load_judge_prompt, render_judge_prompt
from seqcpo.evaluation.judges.verdicts import WINNERS, PairwiseJudge, Verdict, judge_all, parse_answer

__all__ = ["DEFAULT_API_KEY_ENV", "DEFAULT_CACHE_DIR", "LocalJudge", "OpenAIJudge", "PairwiseJudge", "Verdict",
           "VerdictCache", "WINNERS", "check_judge", "judge_all", "load_judge_prompt", "make_judge", "parse_answer",
           "render_judge_prompt"]
