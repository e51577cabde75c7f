"""AN, autoregressive negatives (docs/method.md, "Negatives" table, row AN; ranked variant ANR).

Construction: continue the prefix ``x`` with a model (docs/method.md default: the reference model) under a
:class:`DecodingConfig` (greedy, temperature / top-k / top-p sampling, beam search). A negative stops
at EOS (the EOS is kept in it) or after ``max_new_tokens`` tokens.

Backends:
    "shared_prefill" (default; sample and greedy): the left-padded prefix batch runs through the model
        once with a KV cache; the cache is repeated K times along the batch and all B*K rows decode
        together in our own loop (finished rows emit pad; the loop stops when every row has finished).
        The prefix is encoded once instead of K times. Prefixes of a chunk that are prefixes of another one
        (a document row's anchors, ``row[:a]``: detected from the token ids) share one prefill: only the
        "roots" (prefixes no other one contains; identical prefixes once) run, and each prefix's cache is cut
        from its root's first ``a`` positions, its first logits read at the root's position ``a - 1`` (causal
        attention: nothing before ``a`` sees a later token). A row with 8 anchors prefills the row once, not 8
        times. Models whose cache cannot be sliced (sliding-window or quantized layers, a cache class other than
        a plain ``DynamicCache``) prefill every prefix, as does ``share_prefix_kv=False``
        (:mod:`seqcpo.negatives.prefix_kv`). The negatives are the same either way, up to float rounding.
    "hf": ``model.generate(..., num_return_sequences=K)``, seeded from the generator inside
        ``torch.random.fork_rng``. Beam search always uses it.
    "vllm": vLLM's offline engine over the model's own weights folder (:mod:`seqcpo.negatives.vllm_backend`),
        for a model whose weights do not change (the reference); needs the ``vllm`` package.

Ranked (ANR), ``rank_by``:
    "rouge" (docs/method.md default): ``score = rouge_l_f(negative, gold)``, higher = better.
    "temperature": negative i is sampled at ``decoding.temperatures[i]``; lower = better,
        ``score = -temperature``.

Seeding: prefix b's samples come from its own generator (``generator[b]``, :mod:`seqcpo.seeding`): in the
shared-prefill loop each step draws one uniform per row from the row's example's generator, and only while that
example has an unfinished row, so its negatives do not depend on the other prefixes of the batch (up to the
float rounding of a batched forward pass). ``model.generate`` samples from the global RNG for its whole batch, so
the "hf" backend samples one prefix per call, seeded from that prefix's generator; greedy and beam search are
deterministic and stay batched. vLLM requests carry a seed drawn from their prefix's generator.

Dropped rule (shared by all generators): a sampled negative identical to the gold is regenerated, at
most ``max_tries`` generations in all; if it is still a copy it is kept with ``valid = False`` and the
loss masks it out. Greedy and beam search are deterministic, so their copies are dropped at once (beam
search asks for one extra beam when ``num_beams > K`` and skips a beam equal to the gold).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from seqcpo.decoding import DecodingConfig
from seqcpo.hf_model import cache_kwarg, output_cache, warn_once
from seqcpo.negatives.base import NegativesBuilder, check_k
from seqcpo.negatives.prefix_kv import prefix_roots, slice_root_cache, sliceable_cache
from seqcpo.sampling import filter_logits, model_device, sample_rows, seeded_model_rng
from seqcpo.negatives.similarity import rouge_l_f
from seqcpo.padding import pad_batch
from seqcpo.seeding import Generators, joint_seed, per_example_generators
from seqcpo.types import Example, Negatives

BACKENDS = ("shared_prefill", "hf", "vllm")
RANK_BY = ("rouge", "temperature")




def _cut_at_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS (everything after it is padding)."""
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def _left_pad(prefixes: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input ids and attention mask for left-padded prefixes."""
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("autoregressive negatives need a non-empty prefix (prepend BOS to empty prefixes)")
    return pad_batch(prefixes, pad_token_id, side="left")


class AutoregressiveNegatives:
    """AN: continuations of the prefix decoded from a model.

    Args:
        model: a transformers causal LM (docs/method.md default: the reference model).
        decoding: the :class:`DecodingConfig`.
        eos_token_id / pad_token_id: the model's EOS and pad ids.
        max_new_tokens: the longest negative.
        backend: "shared_prefill" (default), "hf" (``model.generate``) or "vllm" (then ``vllm`` is the
            :class:`~seqcpo.negatives.vllm_backend.VLLMDecoder` to use). Beam search always runs on "hf".
        batch_size: prefixes per generation call (each expands to K rows).
        rank_by: "rouge" or "temperature" (needs ``decoding.temperatures``).
        max_tries: generations in all per negative before a copy of the gold is dropped.
        share_prefix_kv: "shared_prefill" only: prefixes of a chunk that are prefixes of another one (a document
            row's anchors) take their KV cache from that one's prefill (:mod:`seqcpo.negatives.prefix_kv`);
            False prefills every prefix (the same negatives, up to float rounding; for tests and comparisons).

    Returns ``Negatives`` with ``ids[b][i]`` of at most ``max_new_tokens`` tokens, ending with EOS unless cut.
    """

    name = "an"
    needs_model = True

    def __init__(
        self,
        model: torch.nn.Module,
        decoding: DecodingConfig,
        eos_token_id: int,
        pad_token_id: int,
        max_new_tokens: int = 64,
        backend: str = "shared_prefill",
        batch_size: int = 16,
        rank_by: str = "rouge",
        max_tries: int = 8,
        vllm=None,
        share_prefix_kv: bool = True,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"an: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "vllm" and vllm is None and decoding.strategy != "beam":
            raise ValueError("an: backend 'vllm' needs a VLLMDecoder (vllm=...)")
        if rank_by not in RANK_BY:
            raise ValueError(f"an: rank_by must be one of {RANK_BY}, got {rank_by!r}")
        if rank_by == "temperature" and decoding.temperatures is None:
            raise ValueError("an: rank_by='temperature' needs decoding.temperatures (one temperature per negative)")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"an: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        self.model = model
        self.decoding = decoding
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self.backend = "hf" if decoding.strategy == "beam" else backend  # our loop has no beam search
        self.batch_size = batch_size
        self.rank_by = rank_by
        self.max_tries = max_tries
        self.vllm = vllm
        self.share_prefix_kv = share_prefix_kv
        self._kv_sliceable: bool | None = None  # learnt at the first shared prefill (prefix_kv.sliceable_cache)

    # ---- decoding -------------------------------------------------------------------------------

    def _temperatures(self, k: int) -> list[float]:
        d = self.decoding
        return list(d.temperatures) if d.temperatures is not None else [d.temperature] * k

    @torch.no_grad()
    def _shared_prefill(self, prefixes: Sequence[Sequence[int]], k: int, gens: list[torch.Generator]) -> list[list[list[int]]]:
        """Decode K continuations of each prefix: one cached prefill (shared by prefixes of one another, see
        :meth:`_prefill`), cache repeated K times, B*K rows; the K rows of prefix b sample from ``gens[b]``."""
        cache_kw, cache, logits, mask = self._prefill(prefixes)
        cache.batch_repeat_interleave(k)  # (B, ...) -> (B*k, ...): row b*k + i is negative i of prefix b
        logits = logits.float().repeat_interleave(k, dim=0)  # (B*k, V)
        mask = mask.repeat_interleave(k, dim=0)  # (B*k, L)
        gen = self._decode_steps(cache_kw, cache, logits, mask, k, gens)  # (B*k, steps)
        rows = [_cut_at_eos(r, self.eos_token_id) for r in gen]
        return [rows[b * k : (b + 1) * k] for b in range(len(prefixes))]

    def _prefill(self, prefixes: Sequence[Sequence[int]]):
        """(cache kwarg name, KV cache of B left-padded rows, (B, V) next-token logits, (B, L) attention mask).

        When some prefixes are prefixes of others (a document row's anchors), only the roots run
        (:mod:`seqcpo.negatives.prefix_kv`) and each prefix's cache and logits are cut from its root's, unless
        ``share_prefix_kv`` is off or the model's cache cannot be sliced (then it is learnt once and every later
        chunk prefills each prefix on its own, as before)."""
        ids, mask = _left_pad(prefixes, self.pad_token_id)  # (B, L); refuses an empty prefix
        root = prefix_roots(prefixes)
        if self.share_prefix_kv and self._kv_sliceable is not False and len(set(root)) < len(prefixes):
            shared = self._prefill_roots(prefixes, root)
            if shared is not None:
                cache_kw, cache, first = shared
                return cache_kw, cache, first, mask.to(first.device)
        cache_kw, cache, logits = self._forward_prefill(ids, mask, 1)
        return cache_kw, cache, logits[:, -1, :], mask.to(logits.device)

    def _forward_prefill(self, ids: torch.Tensor, mask: torch.Tensor, keep):
        """One cached forward over left-padded rows; logits at the positions ``keep`` (``logits_to_keep``: an int
        keeps the last ones, a 1-D tensor those positions; all positions if the model has no such argument)."""
        model = self.model
        device = model_device(model)
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)  # (B, L): real tokens count from 0 under left padding
        params = inspect.signature(model.forward).parameters
        if "logits_to_keep" in params:
            kept = {"logits_to_keep": keep.to(device) if isinstance(keep, torch.Tensor) else keep}
        else:
            kept = {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **kept)
        logits = out.logits
        if not kept and isinstance(keep, torch.Tensor):
            logits = logits[:, keep.to(logits.device), :]
        elif not kept:
            logits = logits[:, -keep:, :]
        return cache_kwarg(out), output_cache(out), logits

    def _prefill_roots(self, prefixes: Sequence[Sequence[int]], root: list[int]):
        """(cache kwarg name, the prefixes' cache, (B, V) first-step logits) from the roots' forward alone; None
        (and no sharing from now on) when the model's cache is not one
        :func:`~seqcpo.negatives.prefix_kv.sliceable_cache` accepts."""
        roots = sorted(set(root))
        row_of = {r: i for i, r in enumerate(roots)}
        ids, mask = _left_pad([prefixes[r] for r in roots], self.pad_token_id)  # (R, W)
        width = ids.shape[1]
        lengths = torch.tensor([len(p) for p in prefixes])  # (B,)
        root_rows = torch.tensor([row_of[r] for r in root])  # (B,)
        offsets = width - torch.tensor([len(prefixes[r]) for r in root])  # (B,) left padding of b's root
        last = offsets + lengths - 1  # (B,) position of prefix b's last token in its root's row
        keep, col = torch.unique(last, return_inverse=True)  # the positions whose logits some prefix needs
        cache_kw, cache, logits = self._forward_prefill(ids, mask, keep)  # logits (R, len(keep), V)
        if not sliceable_cache(cache):
            self._kv_sliceable = False
            warn_once(f"an: the model's KV cache ({type(cache).__name__}) cannot be sliced per prefix; prefixes "
                      "that are prefixes of one another are prefilled each on its own")
            return None
        self._kv_sliceable = True
        slice_root_cache(cache, root_rows, offsets, lengths)
        device = logits.device
        return cache_kw, cache, logits[root_rows.to(device), col.to(device)]  # (B, V): prefix b's first step

    def _decode_steps(self, cache_kw, cache, logits, mask, k: int, gens: list[torch.Generator]) -> list[list[int]]:
        """The B*K rows' new tokens (pad after EOS), step by step from the prefilled cache; ``logits``: (B*k, V)
        of the first step, ``mask``: (B*k, L)."""
        model, d = self.model, self.decoding
        device = logits.device
        n_rows = logits.shape[0]
        B = n_rows // k
        next_pos = mask.sum(-1, keepdim=True)  # (B*k, 1)
        temps = torch.tensor(self._temperatures(k), device=device).repeat(B).unsqueeze(1)  # (B*k, 1)
        finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
        steps = []
        for step in range(self.max_new_tokens):
            if d.strategy == "greedy":
                tok = logits.argmax(-1)  # (B*k,)
            else:
                probs = filter_logits(logits / temps, d.top_k, d.top_p).softmax(-1)  # (B*k, V)
                # only prefixes with an unfinished row draw, so a prefix's stream never depends on the batch's length
                live = (~finished.view(B, k).all(dim=1)).nonzero().flatten().tolist()
                rows = (torch.tensor(live, dtype=torch.long, device=device).unsqueeze(1) * k + torch.arange(k, device=device)).flatten()
                tok = torch.full((n_rows,), self.pad_token_id, dtype=torch.long, device=device)
                tok[rows] = sample_rows(probs[rows], [gens[b] for b in live], [k] * len(live))
            tok = tok.masked_fill(finished, self.pad_token_id)  # finished rows emit pad
            steps.append(tok)
            finished |= tok == self.eos_token_id
            if bool(finished.all()) or step == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=tok.unsqueeze(1), attention_mask=mask, position_ids=next_pos, use_cache=True,
                **{cache_kw: cache},
            )
            cache = output_cache(out)
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return torch.stack(steps, dim=1).tolist()

    def _hf_generate(self, prefixes: Sequence[Sequence[int]], k: int, gens: list[torch.Generator]) -> list[list[list[int]]]:
        """Decode with ``model.generate``: sampling one prefix per call, seeded from its generator (``generate``
        samples a whole batch from one global RNG); greedy and beam search batched (deterministic; a model in
        train mode has its dropout seeded by :func:`~seqcpo.seeding.joint_seed`)."""
        if self.decoding.strategy == "sample":
            return [row for p, g in zip(prefixes, gens) for row in self._hf_calls([p], k, lambda g=g: g)]
        seed = joint_seed(gens)
        return self._hf_calls(prefixes, k, lambda: seed)

    @torch.no_grad()
    def _hf_calls(self, prefixes: Sequence[Sequence[int]], k: int, rng_source) -> list[list[list[int]]]:
        """``model.generate`` over left-padded prompts; each call runs in :func:`seeded_model_rng` of
        ``rng_source()`` (a generator to draw from or a seed)."""
        model, d = self.model, self.decoding
        device = model_device(model)
        ids, mask = _left_pad(prefixes, self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        common = dict(
            input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )
        if d.strategy == "beam":
            n_ret = min(d.num_beams, k + 1)  # one spare beam replaces a copy of the gold
            calls = [dict(do_sample=False, num_beams=d.num_beams, num_return_sequences=n_ret)]
        elif d.strategy == "greedy":
            n_ret = k
            calls = [dict(do_sample=False, num_beams=1, num_return_sequences=k)]
        elif d.temperatures is None:
            n_ret = k
            calls = [dict(do_sample=True, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, num_return_sequences=k)]
        else:
            n_ret = 1  # one call per column, each at its own temperature
            calls = [dict(do_sample=True, temperature=t, top_k=d.top_k, top_p=d.top_p, num_return_sequences=1) for t in d.temperatures]
        per_call = []
        for kwargs in calls:
            with seeded_model_rng(rng_source(), device):
                seqs = model.generate(**common, **kwargs)  # (B*n_ret, L + new)
            rows = [_cut_at_eos(r, self.eos_token_id) for r in seqs[:, ids.shape[1] :].tolist()]
            per_call.append([rows[b * n_ret : (b + 1) * n_ret] for b in range(len(prefixes))])
        # Column i of prefix b: from the single call, or from call i when each column has its own temperature.
        return [sum((c[b] for c in per_call), []) for b in range(len(prefixes))]

    def _decode(self, prefixes: Sequence[Sequence[int]], k: int, gens: Generators) -> list[list[list[int]]]:
        """K (or, for beam, up to K+1) continuations per prefix, in chunks of ``batch_size`` prefixes; prefix b
        draws from ``gens[b]`` (or from a child of one generator for the call)."""
        gens = per_example_generators(gens, len(prefixes))
        if self.backend == "vllm":  # vLLM schedules its own batches
            d = self.decoding
            return self.vllm.decode(
                prefixes, k, temperatures=self._temperatures(k), greedy=d.strategy == "greedy", top_k=d.top_k,
                top_p=d.top_p, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_token_id, generator=gens,
            )
        out: list[list[list[int]]] = []
        for start in range(0, len(prefixes), self.batch_size):
            chunk = prefixes[start : start + self.batch_size]
            chunk_gens = gens[start : start + self.batch_size]
            if self.backend == "hf":
                out.extend(self._hf_generate(chunk, k, chunk_gens))  # seeds each generate call itself
            else:
                # dropout, if the model trains: seeded without advancing the prefixes' own streams
                with seeded_model_rng(joint_seed(chunk_gens), model_device(self.model)):
                    out.extend(self._shared_prefill(chunk, k, chunk_gens))
        return out

    # ---- the generator protocol -----------------------------------------------------------------

    def __call__(
        self,
        examples: Sequence[Example],
        k: int,
        generator: Generators,
        ranked: bool = False,
    ) -> Negatives:
        """K negatives per example; ``generator``: one per example, or one for the call."""
        check_k("an", k)
        self.decoding.check_k(k)
        golds = [list(ex.continuation_ids) for ex in examples]
        prefixes = [list(ex.prefix_ids) for ex in examples]
        gens = per_example_generators(generator, len(examples))
        decoded = self._decode(prefixes, k, gens)
        if self.decoding.strategy == "beam":
            # Best beams first, skipping one equal to the gold when a spare beam exists.
            ids = []
            for gold, beams in zip(golds, decoded):
                keep = [s for s in beams if s != gold][:k]
                ids.append(keep + [gold] * (k - len(keep)))
        else:
            ids = decoded
            if self.decoding.strategy == "sample":
                # Regenerate only the prefixes that still have a copy of the gold, keep their other columns.
                for _ in range(max(1, self.max_tries) - 1):
                    todo = [b for b in range(len(examples)) if any(s == golds[b] for s in ids[b])]
                    if not todo:
                        break
                    redo = self._decode([prefixes[b] for b in todo], k, [gens[b] for b in todo])
                    for b, new in zip(todo, redo):
                        ids[b] = [n if old == golds[b] else old for old, n in zip(ids[b], new)]
        out = NegativesBuilder(self.name, ranked)
        temps = self._temperatures(k)
        for gold, row in zip(golds, ids):
            valid = [s != gold for s in row]
            if self.rank_by == "temperature":
                scores = [-t for t in temps]
            else:
                scores = [rouge_l_f(s, gold) for s in row] if ranked else []
            out.add(row, valid, scores)
        return out.build()
