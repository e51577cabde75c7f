"""Shared pieces of the CPU and GPU benchmarks: synthetic batches, the timed steps, peak memory, tables.

Every step is forward + backward of the training loss, optimizer excluded, gradients cleared (set to
None) outside the timed region. Variants are interleaved (rep 1 of every variant, then rep 2, ...) and the
median is reported, so a slow stretch on a shared machine hits all variants alike.

Variants (``STEP_VARIANTS``):
    mle              L_mle on the gold only, B rows of P + C tokens (the baseline of every ratio).
    naive_live       CPO, K+1 rows per example (``layout="naive"``), reference forward live, same layout.
    shared_live      CPO, one prefix-shared row per example, reference forward live in the same layout.
    shared_live_bf16 as shared_live, the frozen reference copy held in bf16 (CPU: AVX512-BF16 matmuls).
    shared_cached    CPO, prefix-shared, reference log-probs precomputed (``PrecomputedReference``).
    twopass_live / twopass_cached
                     as shared_*, both models in the two-pass layout (``seqcpo.two_pass``).
    mn_live          CPO with K MN negatives made inside the step by the reference: MN's own teacher-forced
                     pass, then the reference and the policy in the prefix-shared layout (logps_layout: shared).
    mn_fused_live    the same negatives drawn from the reference's two-pass gold branch (logps_layout: auto):
                     no separate MN pass.
    mle_packed       L_mle on the gold only, the B rows packed into one sequence (no padding): the real-token
                     baseline of a mixed-length batch.
    packed_cached    CPO, the prefix-shared rows packed into one sequence (``seqcpo.packing``), cached reference.

A ``_flex`` suffix (``shared_live_flex``, ``shared_cached_flex``) runs policy and reference with
``attn_implementation="flex_attention"`` (the prefix-shared ``BlockMask``; CUDA only for training), the other
variants with the model's own implementation (SDPA here).

Token floor of a shape: (P + (K+1) C) / (P + C), the ratio of tokens a prefix-shared CPO step must process
to those of the MLE step.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from seqcpo.logps import sequence_logps, use_attention
from seqcpo.losses import cpo_loss, mle_loss
from seqcpo.reference import FrozenCopyReference, PrecomputedReference
from seqcpo.types import CandidateBatch

STEP_VARIANTS = ("mle", "naive_live", "shared_live", "shared_live_bf16", "shared_cached", "twopass_live",
                 "twopass_cached", "mn_live", "mn_fused_live", "shared_live_flex", "shared_cached_flex", "mle_packed",
                 "packed_cached", "packed_cached_flex")


@dataclass
class Shape:
    batch: int
    prefix: int
    cont: int
    k: int

    @property
    def floor(self) -> float:
        return (self.prefix + (self.k + 1) * self.cont) / (self.prefix + self.cont)

    @property
    def name(self) -> str:
        return f"B{self.batch} P{self.prefix} C{self.cont} K{self.k}"


def random_batch(shape: Shape, vocab_size: int, seed: int = 0, low: int = 3) -> CandidateBatch:
    """Full-length random prefixes and K+1 full-length continuations (the floor assumes full length)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(low, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    B, K = shape.batch, shape.k
    return CandidateBatch(
        prefix_ids=[ids(shape.prefix) for _ in range(B)],
        candidate_ids=[[ids(shape.cont) for _ in range(K + 1)] for _ in range(B)],
        candidate_mask=[[True] * (K + 1) for _ in range(B)],
    )


def tn_bn_batch(shape: Shape, vocab_size: int, eos: int, seed: int = 0, low: int = 3) -> CandidateBatch:
    """The demo config's negatives on random golds: K/2 truncations (gold[:j] + EOS, j uniform in 1..C-1, as
    ``TruncationNegatives`` cuts) and K/2 batch negatives (the golds of the next examples)."""
    base = random_batch(shape, vocab_size, seed=seed, low=low)
    g = torch.Generator().manual_seed(seed + 1)
    golds = [c[0] for c in base.candidate_ids]
    B, K, n_tn = shape.batch, shape.k, shape.k // 2
    cands = []
    for b in range(B):
        tn = [golds[b][: int(torch.randint(1, shape.cont, (1,), generator=g))] + [eos] for _ in range(n_tn)]
        bn = [golds[(b + 1 + i) % B] for i in range(K - n_tn)]
        cands.append([golds[b]] + tn + bn)
    return CandidateBatch(base.prefix_ids, cands, [[True] * (K + 1) for _ in range(B)])


def demo_negatives_batch(prefixes: list[list[int]], golds: list[list[int]], k: int, eos: int,
                         seed: int = 0) -> CandidateBatch:
    """Given prefixes and golds of any lengths, the demo config's negatives: K/2 truncations (gold[:j] + EOS,
    j uniform in 1..len-1) and K/2 batch negatives (the golds of the next examples)."""
    g = torch.Generator().manual_seed(seed)
    B, n_tn = len(golds), k // 2
    cands = []
    for b in range(B):
        gold = golds[b]
        tn = [gold[: int(torch.randint(1, max(len(gold), 2), (1,), generator=g))] + [eos] for _ in range(n_tn)]
        bn = [golds[(b + 1 + i) % B] for i in range(k - n_tn)]
        cands.append([gold] + tn + bn)
    return CandidateBatch([list(p) for p in prefixes], cands, [[True] * (k + 1) for _ in range(B)])


def instruction_mix_batch(batch: int, k: int, vocab_size: int, eos: int, seed: int = 0, prompt=(10, 256),
                          response=(1, 128), low: int = 3) -> CandidateBatch:
    """An instruction-like mix: prompt lengths uniform in ``prompt``, response lengths uniform in ``response``
    (inclusive), random token ids, the demo's negatives (:func:`demo_negatives_batch`)."""
    g = torch.Generator().manual_seed(seed)
    n = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    ids = lambda m: torch.randint(low, vocab_size, (m,), generator=g).tolist()  # noqa: E731
    prefixes = [ids(n(*prompt)) for _ in range(batch)]
    golds = [ids(n(*response)) for _ in range(batch)]
    return demo_negatives_batch(prefixes, golds, k, eos, seed=seed + 1)


def padding_overhead(batch: CandidateBatch, layout: str) -> float:
    """Tokens the layout runs over the real tokens of the prefix-shared rows, minus 1 (0.0 = no padding).

    "shared": B rows padded to the longest; "packed": the real tokens; "two_pass": its two padded passes, the
    gold rows and then each negative from its first token that differs from the gold (negative when the
    negatives share enough with the gold)."""
    from seqcpo.packing import packed_tokens
    from seqcpo.two_pass import shared_with_gold

    padded, real = packed_tokens(batch)
    if layout == "two_pass":
        gold_rows = [len(p) + len(c[0]) for p, c in zip(batch.prefix_ids, batch.candidate_ids)]
        neg_rows = [sum(max(len(n) - shared_with_gold(c[0], n) - 1, 0) for n in c[1:]) for c in batch.candidate_ids]
        return len(gold_rows) * (max(gold_rows) + max(neg_rows)) / real - 1.0
    return (real if layout == "packed" else padded) / real - 1.0


def batch_floor(batch: CandidateBatch) -> float:
    """Tokens of the prefix-shared rows over tokens of the gold-only rows: the token floor of a real batch."""
    cpo = sum(len(p) + sum(len(c) for c in cands) for p, cands in zip(batch.prefix_ids, batch.candidate_ids))
    mle = sum(len(p) + len(cands[0]) for p, cands in zip(batch.prefix_ids, batch.candidate_ids))
    return cpo / mle


def gold_only(batch: CandidateBatch) -> CandidateBatch:
    return CandidateBatch(
        prefix_ids=batch.prefix_ids,
        candidate_ids=[[c[0]] for c in batch.candidate_ids],
        candidate_mask=[[True] for _ in batch.candidate_ids],
    )


def make_step(variant: str, model, batch: CandidateBatch, *, beta: float = 0.1, lam: float = 1.0, ref_model=None,
              chunk_size: int = 1024) -> Callable[[], float]:
    """A closure running one forward + backward of ``variant``; returns the loss value."""
    if variant.endswith("_flex"):
        inner = make_step(variant[: -len("_flex")], model, batch, beta=beta, lam=lam, ref_model=ref_model,
                          chunk_size=chunk_size)

        def flex_step():
            with use_attention(model, "flex_attention"), use_attention(ref_model, "flex_attention"):
                return inner()

        return flex_step
    gold = gold_only(batch)
    if variant in ("mle", "mle_packed"):
        gold_layout = "packed" if variant == "mle_packed" else "shared"

        def step():
            out = sequence_logps(model, gold, layout=gold_layout, chunk_size=chunk_size)
            loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0])
            loss.backward()
            return loss.item()
        return step
    if variant in ("mn_live", "mn_fused_live"):
        return _mn_step(variant == "mn_fused_live", model, batch, beta=beta, lam=lam, ref_model=ref_model,
                        chunk_size=chunk_size)
    if variant in ("naive_live", "shared_live", "shared_live_bf16", "twopass_live"):
        layout = {"naive_live": "naive", "twopass_live": "two_pass"}.get(variant, "shared")
        if ref_model is None:
            raise ValueError(f"{variant} needs ref_model")
        reference = FrozenCopyReference(ref_model, copy_model=False, layout=layout, chunk_size=chunk_size)
    elif variant in ("shared_cached", "twopass_cached", "packed_cached"):
        layout = {"twopass_cached": "two_pass", "packed_cached": "packed"}.get(variant, "shared")
        reference = PrecomputedReference()
        if batch.ref_logps is None:
            raise ValueError(f"{variant} needs batch.ref_logps (see precompute_ref_logps)")
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {STEP_VARIANTS}")
    mask = torch.tensor(batch.candidate_mask, dtype=torch.bool)

    def step():
        out = sequence_logps(model, batch, layout=layout, chunk_size=chunk_size)
        ref = reference.logps(batch).to(out.logps.device)
        loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + lam * cpo_loss(
            out.logps, ref, beta, mask=mask.to(out.logps.device)
        )
        loss.backward()
        return loss.item()

    return step


def _mn_step(fused: bool, model, batch: CandidateBatch, *, beta, lam, ref_model, chunk_size):
    """MN negatives made in the step by ``ref_model`` (c = 0.15, sampled), then the CPO loss (see STEP_VARIANTS)."""
    from seqcpo.negatives import MeanFieldNegatives
    from seqcpo.types import Example

    if ref_model is None:
        raise ValueError("the mn variants need ref_model")
    examples = [Example(prefix_ids=p, continuation_ids=c[0]) for p, c in zip(batch.prefix_ids, batch.candidate_ids)]
    k = batch.num_candidates - 1
    pad = getattr(model.config, "pad_token_id", None) or 0
    mn = MeanFieldNegatives(ref_model, pad_token_id=pad)
    reference = FrozenCopyReference(ref_model, copy_model=False, chunk_size=chunk_size, pad_token_id=pad)

    def step():
        g = torch.Generator().manual_seed(0)
        if fused:
            rgp = reference.gold_pass(batch.prefix_ids, [e.continuation_ids for e in examples])
            neg = mn(examples, k, g, gold_logits=rgp.gold_logits)
            ref = reference.finish(rgp, neg.ids)
        else:
            neg = mn(examples, k, g)
            ref = None
        cb = CandidateBatch(batch.prefix_ids, [[e.continuation_ids] + n for e, n in zip(examples, neg.ids)],
                            [[True] + v for v in neg.valid])
        if ref is None:
            ref = reference.logps(cb)
        out = sequence_logps(model, cb, chunk_size=chunk_size, pad_token_id=pad)
        mask = torch.tensor(cb.candidate_mask, dtype=torch.bool, device=out.logps.device)
        loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + lam * cpo_loss(
            out.logps, ref.to(out.logps.device), beta, mask=mask)
        loss.backward()
        return loss.item()

    return step


@torch.no_grad()
def precompute_ref_logps(ref_model, batch: CandidateBatch) -> CandidateBatch:
    """The batch with ``ref_logps`` filled in by one (untimed) reference pass, as ``seqcpo negatives`` does."""
    ref = sequence_logps(ref_model, batch).logps.float().cpu()
    return CandidateBatch(batch.prefix_ids, batch.candidate_ids, batch.candidate_mask, ref_logps=ref)


# ---- peak memory ----------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak resident set size above the level at entry, sampled every ``interval`` s by a thread.

    CPU tensors come from malloc; large blocks are mmapped and returned on free, so RSS follows the live
    tensors closely. A spike shorter than the interval can be missed (the figure is a lower bound).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_delta = 0

    def __enter__(self):
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_delta = self.peak - self.base
        return False


# ---- running -------------------------------------------------------------------------------------


@dataclass
class Timings:
    times: dict[str, list[float]] = field(default_factory=dict)  # wall-clock seconds
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds (all threads)
    mem: dict[str, float] = field(default_factory=dict)  # bytes

    def median(self, v: str) -> float:
        return statistics.median(self.times[v])

    def cpu_median(self, v: str) -> float:
        return statistics.median(self.cpu[v])


def interleaved(steps: dict[str, Callable[[], float]], model, reps: int, *, sync: Callable[[], None] = lambda: None,
                warmup: int = 0, measure_mem: Callable | None = None) -> Timings:
    """Warm each step up, then time ``reps`` rounds of every step in turn. ``measure_mem(name, step)`` -> bytes."""
    out = Timings()

    def run(name, fn):
        model.zero_grad(set_to_none=True)
        sync()
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        model.zero_grad(set_to_none=True)
        return dt, dc

    for name, fn in steps.items():
        for _ in range(warmup):
            run(name, fn)
        if measure_mem is not None:
            model.zero_grad(set_to_none=True)
            out.mem[name] = measure_mem(name, fn)
            model.zero_grad(set_to_none=True)
    for _ in range(reps):
        for name, fn in steps.items():
            dt, dc = run(name, fn)
            out.times.setdefault(name, []).append(dt)
            out.cpu.setdefault(name, []).append(dc)
    return out


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        info["logical_cpus"] = len(names)
    except OSError:
        info["cpu"] = platform.processor()
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_1m_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return info


def write_json(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
