"""Reference-free CPO (``reference: none``) against the cached and the live reference, at the demo shape.

    nice .venv/bin/python benchmarks/reference_free.py [--reps 3] [--threads 2] [--out benchmarks/results/reference_free_cpu.json]

SmolLM2-135M, fp32, the demo shape B4 P32 C64 K4 with the demo's negatives (2 truncation + 2 batch) on random
golds (``harness.tn_bn_batch``). Variants, each forward + backward of the training loss (optimizer excluded),
interleaved, median of ``--reps`` (``harness.interleaved``):

    mle            the gold only (the baseline of every ratio)
    shared_live    CPO, prefix-shared, the frozen reference copy run in the step
    shared_cached  CPO, prefix-shared, reference log-probs precomputed (``seqcpo negatives``)
    reference_free CPO with ``reference: none``: length-normalised policy log-probs, target margin 0.5, beta 2;
                   no reference forward, no reference weights

Peak memory: resident set size sampled during one untimed step above the level before it (``harness.RSSPeak``),
plus the bytes of reference weights each variant holds (the live one a frozen fp32 copy; the others none).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    RSSPeak,
    Shape,
    interleaved,
    machine_info,
    make_step,
    markdown_table,
    precompute_ref_logps,
    tn_bn_batch,
    write_json,
)

from seqcpo.logps import sequence_logps  # noqa: E402
from seqcpo.losses import cpo_loss_per_example, mle_loss  # noqa: E402

SHAPE = Shape(batch=4, prefix=32, cont=64, k=4)


def reference_free_step(model, batch, beta: float = 2.0, margin: float = 0.5, lam: float = 1.0):
    mask = torch.tensor(batch.candidate_mask, dtype=torch.bool)

    def step():
        out = sequence_logps(model, batch, layout="shared", length_normalize=True)
        ref = torch.zeros_like(out.logps)
        loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + lam * cpo_loss_per_example(
            out.logps, ref, beta, mask=mask, margin=margin).mean()
        loss.backward()
        return loss.item()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "reference_free_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from seqcpo.models import load_model, resolve_model_path

    model = load_model(resolve_model_path("smollm2-135m"), dtype="float32")
    model.train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    batch = tn_bn_batch(SHAPE, model.config.vocab_size, eos)
    cached = precompute_ref_logps(ref_model, batch)
    steps = {
        "mle": make_step("mle", model, batch),
        "shared_live": make_step("shared_live", model, batch, ref_model=ref_model),
        "shared_cached": make_step("shared_cached", model, cached),
        "reference_free": reference_free_step(model, batch),
    }
    ref_bytes = sum(t.numel() * t.element_size() for t in ref_model.parameters())
    held = {"mle": 0, "shared_live": ref_bytes, "shared_cached": 0, "reference_free": 0}

    def measure(name, fn):
        with RSSPeak() as peak:
            fn()
        return peak.peak_delta

    t = interleaved(steps, model, args.reps, warmup=1, measure_mem=measure)
    base = t.median("mle")
    rows, results = [], {}
    for name in steps:
        med = t.median(name)
        results[name] = {"times": t.times[name], "cpu": t.cpu[name], "median_s": med, "peak_rss_bytes": t.mem[name],
                         "reference_weights_bytes": held[name]}
        rows.append([SHAPE.name, name, f"{med:.2f}", f"{min(t.times[name]):.2f}", f"{med / base:.2f}",
                     f"{t.cpu_median(name) / t.cpu_median('mle'):.2f}", f"{t.mem[name] / 2**20:,.0f}",
                     f"{held[name] / 2**20:,.0f}"])
    live, cached_s, free = (results[v]["median_s"] for v in ("shared_live", "shared_cached", "reference_free"))
    summary = {"reference_free_vs_live": free / live, "reference_free_vs_cached": free / cached_s}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    write_json({"machine": machine_info(), "shape": SHAPE.name, "reps": args.reps, "threads": args.threads,
                "load_average_at_end": load, "results": results, "summary": summary}, args.out)
    print(markdown_table(["shape", "variant", "median s", "min s", "ratio vs MLE", "CPU-time ratio", "peak RSS MiB",
                          "reference weights MiB"], rows))
    print(f"reference-free / live: {summary['reference_free_vs_live']:.2f}; "
          f"reference-free / cached: {summary['reference_free_vs_cached']:.2f}; load average {' '.join(load)}")


if __name__ == "__main__":
    main()
