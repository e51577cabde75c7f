"""A local causal LM as the pairwise judge, by the next-token log-probabilities of the answer letters."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from typing import Sequence

from seqcpo.evaluation.judges.cache import VerdictCache
from seqcpo.evaluation.judges.template import load_judge_prompt, render_judge_prompt
from seqcpo.evaluation.judges.verdicts import WINNERS, Verdict

logger = logging.getLogger(__name__)


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
