"""CPU benchmark: the CPO step against the MLE step, and autoregressive-negative throughput, on SmolLM2-135M.

    .venv/bin/python benchmarks/run_cpu.py                  # the full set, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/run_cpu.py --quick          # one shape, one rep: a smoke run

What it measures (issue 6, "Targets"):

1. Step time, forward + backward of the training loss (optimizer excluded), fp32, ``--threads`` threads, for
   the variants of ``harness.STEP_VARIANTS`` on a small grid of shapes. Every CPO ratio is taken against the
   MLE step on the same examples in the same run, printed beside the token floor (P + (K+1)C) / (P + C) and
   ratio / floor. Variants are interleaved and the median of the reps is reported (min beside it: on a
   shared machine the min is the least disturbed figure).
2. Peak memory: the resident set size sampled every 2 ms during one (untimed) step, minus the RSS before it
   (``harness.RSSPeak``).
3. AN throughput: ``AutoregressiveNegatives(backend="shared_prefill")`` against ``backend="hf"``
   (``model.generate(num_return_sequences=K)``), same prefixes, K, dtype, sampling at temperature 1, and
   EOS suppressed (``eos_token_id=-1``) so both decode exactly ``max_new_tokens`` tokens per row; tokens/s
   counts the generated tokens.

Writes ``benchmarks/results/cpu.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seqcpo.types import CandidateBatch  # noqa: E402

from harness import (  # noqa: E402
    RSSPeak,
    Shape,
    batch_floor,
    demo_negatives_batch,
    gold_only,
    instruction_mix_batch,
    interleaved,
    machine_info,
    make_step,
    markdown_table,
    padding_overhead,
    precompute_ref_logps,
    random_batch,
    tn_bn_batch,
    write_json,
)

# (shape, variants[, negatives]); the naive layout runs at the demo shape only (it is the slowest by far)
FULL_GRID = [
    (Shape(4, 32, 64, 4), ("mle", "naive_live", "shared_live", "shared_live_bf16", "shared_cached", "twopass_cached",
                           "mn_live", "mn_fused_live")),
    (Shape(4, 128, 64, 4), ("mle", "shared_live", "shared_live_bf16", "shared_cached", "twopass_cached", "mn_live",
                            "mn_fused_live")),
    (Shape(4, 32, 64, 8), ("mle", "shared_live", "shared_cached")),
    # the demo's negatives (tn:2,bn:2): truncations share all but their EOS with the gold
    (Shape(4, 32, 64, 4), ("mle", "shared_cached", "twopass_cached", "shared_live", "twopass_live"), "tn:2,bn:2"),
]
DEMO_GRID = FULL_GRID[:1]
QUICK_GRID = [(Shape(2, 16, 16, 4), ("mle", "naive_live", "shared_live", "shared_live_bf16", "shared_cached",
                                     "twopass_cached", "mn_live", "mn_fused_live")),
              (Shape(2, 16, 16, 4), ("mle", "shared_cached", "twopass_cached", "shared_live", "twopass_live"),
               "tn:2,bn:2")]


def step_benchmarks(model, ref, ref_bf16, grid, reps_first: int, reps: int, partial=lambda rows: None) -> list[dict]:
    """Every shape of ``grid``; ``partial(rows)`` after each, so an interrupted run keeps what it measured."""
    rows = []
    for i, (shape, variants, *kind) in enumerate(grid):
        kind = kind[0] if kind else "random"
        if kind == "tn:2,bn:2":
            raw = tn_bn_batch(shape, model.config.vocab_size, eos=model.config.eos_token_id or 2, seed=i)
        else:
            raw = random_batch(shape, model.config.vocab_size, seed=i)
        batch = precompute_ref_logps(ref, raw)
        floor = batch_floor(batch)
        refs = {v: ref for v in variants if "live" in v}
        refs["shared_live_bf16"] = ref_bf16
        steps = {v: make_step(v, model, batch, ref_model=refs.get(v)) for v in variants}

        def mem(name, fn):
            with RSSPeak() as peak:
                fn()
            return peak.peak_delta

        t0 = time.time()
        res = interleaved(steps, model, reps_first if i == 0 else reps, measure_mem=mem)
        base = res.median("mle")
        base_min = min(res.times["mle"])
        for v in variants:
            med = res.median(v)
            ratio = med / base
            rows.append(
                dict(
                    shape=shape.name if kind == "random" else f"{shape.name} {kind}", negatives=kind, batch=shape.batch, prefix=shape.prefix, cont=shape.cont, k=shape.k,
                    variant=v, times_s=res.times[v], median_s=med, min_s=min(res.times[v]),
                    ratio=ratio, ratio_of_mins=min(res.times[v]) / base_min, floor=floor,
                    ratio_over_floor=ratio / floor if v != "mle" else None,
                    cpu_s=res.cpu[v], cpu_median_s=res.cpu_median(v), cpu_ratio=res.cpu_median(v) / res.cpu_median("mle"),
                    peak_rss_mib=res.mem[v] / 2**20,
                )
            )
        print(f"# {shape.name}: {time.time() - t0:.0f} s", flush=True)
        partial(rows)
    return rows


PACKING_VARIANTS = ("mle", "mle_packed", "shared_cached", "packed_cached")


def wiki_batch(model_name: str, batch: int, k: int, eos: int, seed: int = 0) -> CandidateBatch:
    """``batch`` examples of the embedded data (wiki lead sections through ``seqcpo.data``'s instruction task, its
    default lengths: the prompt, then the extract + EOS), drawn at random, with the demo's negatives."""
    import random

    from seqcpo.data import DataConfig, build_examples, read_records
    from seqcpo.models import load_tokenizer, resolve_model_path

    cfg = DataConfig(dataset="wiki", task="instruction")
    records, source = read_records(cfg)
    sample = random.Random(seed).sample(records, 4 * batch)  # tokenize a few, not 10,000
    groups, _ = build_examples(sample, cfg, load_tokenizer(resolve_model_path(model_name)), source)
    examples = [g[0] for g in groups][:batch]
    return demo_negatives_batch([e.prefix_ids for e in examples], [e.continuation_ids for e in examples], k, eos,
                                seed=seed + 1)


def packing_benchmark(model, ref, batches: dict[str, CandidateBatch], reps: int, partial=lambda rows: None,
                      variants=PACKING_VARIANTS) -> list[dict]:
    """Padded prefix-shared rows against packed rows on batches of mixed lengths, cached reference.

    Per batch: padding overhead (tokens run / real tokens - 1) of each layout; each step's time over the packed
    MLE step (the real-token baseline) and over the real-token floor (real CPO tokens / real MLE tokens);
    the packed-over-padded speedup of the CPO step."""
    rows = []
    for label, raw in batches.items():
        batch = precompute_ref_logps(ref, raw)
        floor = batch_floor(batch)
        steps = {v: make_step(v, model, batch) for v in variants}

        def mem(name, fn):
            with RSSPeak() as peak:
                fn()
            return peak.peak_delta

        t0 = time.time()
        res = interleaved(steps, model, reps, measure_mem=mem)
        base = res.median("mle_packed")
        cpu_base = res.cpu_median("mle_packed")
        lengths = [len(p) + sum(len(c) for c in cs) for p, cs in zip(batch.prefix_ids, batch.candidate_ids)]
        for v in variants:
            med = res.median(v)
            gold = v.startswith("mle")
            layout = "packed" if "packed" in v else "two_pass" if "twopass" in v else "shared"
            rows.append(dict(
                batch_label=label, variant=v, examples=len(lengths), k=batch.num_candidates - 1,
                row_tokens_min=min(lengths), row_tokens_max=max(lengths), real_tokens=sum(lengths),
                padding_overhead=padding_overhead(gold_only(batch) if gold else batch, layout),
                times_s=res.times[v], median_s=med, min_s=min(res.times[v]), ratio_vs_mle_packed=med / base,
                real_floor=floor, ratio_over_real_floor=None if gold else med / base / floor,
                cpu_s=res.cpu[v], cpu_median_s=res.cpu_median(v),
                cpu_ratio_over_real_floor=None if gold else res.cpu_median(v) / cpu_base / floor,
                peak_rss_mib=res.mem[v] / 2**20,
            ))
        if {"shared_cached", "packed_cached"} <= set(variants):
            rows.append(dict(batch_label=label, variant="speedup packed_cached over shared_cached",
                             speedup=res.median("shared_cached") / res.median("packed_cached"),
                             speedup_of_mins=min(res.times["shared_cached"]) / min(res.times["packed_cached"]),
                             cpu_speedup=res.cpu_median("shared_cached") / res.cpu_median("packed_cached")))
        print(f"# packing {label}: {time.time() - t0:.0f} s", flush=True)
        partial(rows)
    return rows


def an_benchmark(model, batch: int, k: int, prefix: int, max_new_tokens: int, reps: int) -> list[dict]:
    from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig

    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, model.config.vocab_size, (prefix,), generator=g).tolist() for _ in range(batch)]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gens = {
        be: AutoregressiveNegatives(
            model, DecodingConfig(strategy="sample", temperature=1.0), eos_token_id=-1, pad_token_id=pad,
            max_new_tokens=max_new_tokens, backend=be, batch_size=batch,
        )
        for be in ("shared_prefill", "hf")
    }
    times: dict[str, list[float]] = {be: [] for be in gens}
    tokens: dict[str, int] = {}
    for rep in range(reps + 1):  # rep 0 warms up
        for be, an in gens.items():
            t = time.perf_counter()
            out = an._decode(prefixes, k, torch.Generator().manual_seed(rep))
            dt = time.perf_counter() - t
            tokens[be] = sum(len(s) for row in out for s in row)
            if rep:
                times[be].append(dt)
    rows = []
    for be in gens:
        med = statistics.median(times[be])
        rows.append(dict(backend=be, batch=batch, k=k, prefix=prefix, max_new_tokens=max_new_tokens,
                         dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                         generated_tokens=tokens[be], times_s=times[be], median_s=med, tokens_per_s=tokens[be] / med))
    hf = next(r for r in rows if r["backend"] == "hf")["tokens_per_s"]
    # generate() runs the prefix K times, shared_prefill once: with EOS suppressed, the token-forwards ratio
    # bounds what sharing the prefill can gain when a step costs the same per token
    bound = batch * k * (prefix + max_new_tokens) / (batch * prefix + batch * k * max_new_tokens)
    for r in rows:
        r["speedup_vs_hf"] = r["tokens_per_s"] / hf
        r["token_bound"] = bound
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or Hub id")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed reps per variant (after one untimed memory run)")
    ap.add_argument("--reps-first", type=int, default=3, help="timed reps at the first (demo) shape")
    ap.add_argument("--an-batch", type=int, default=4)
    ap.add_argument("--an-k", type=int, default=4)
    ap.add_argument("--an-prefix", default="32,256", help="prefix lengths, comma-separated")
    ap.add_argument("--an-new-tokens", type=int, default=64)
    ap.add_argument("--an-reps", type=int, default=3)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-an", action="store_true")
    ap.add_argument("--packing", action="store_true",
                    help="also run the packing benchmark (wiki documents and an instruction-like mix, cached reference)")
    ap.add_argument("--packing-batch", type=int, default=4)
    ap.add_argument("--packing-reps", type=int, default=2)
    ap.add_argument("--packing-variants", default=",".join(PACKING_VARIANTS),
                    help="comma-separated; mle_packed is the baseline and must be among them (twopass_cached: what "
                         "auto picks for the demo's negatives)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape, one rep (a smoke run)")
    ap.add_argument("--demo-shape-only", action="store_true", help="only the first shape (B4 P32 C64 K4)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from seqcpo.models import load_model, resolve_model_path

    t0 = time.time()
    model = load_model(resolve_model_path(args.model), dtype="float32", attn_implementation="sdpa")
    model.train()  # SmolLM2 has no dropout; train mode as in training
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    result = {"machine": machine_info(), "model": args.model, "dtype": "float32",
              "memory_metric": "peak RSS delta over one step, sampled every 2 ms", "command": " ".join(sys.argv)}
    grid = QUICK_GRID if args.quick else DEMO_GRID if args.demo_shape_only else FULL_GRID
    reps_first, reps = (1, 1) if args.quick else (args.reps_first, args.reps)
    if not args.skip_steps:
        result["steps"] = step_benchmarks(model, ref, ref_bf16, grid, reps_first, reps,
                                          partial=lambda rows: write_json({**result, "steps": rows}, args.out))
        write_json(result, args.out)  # a partial result survives an interrupted AN run
        print(render(result), flush=True)
    if args.packing:
        eos = model.config.eos_token_id or 2
        kb = dict(batch=args.packing_batch, k=4, vocab_size=model.config.vocab_size, eos=eos, seed=3)
        if args.quick:
            batches = {"instruction mix": instruction_mix_batch(prompt=(10, 40), response=(1, 20), **kb)}
        else:
            batches = {"wiki (seqcpo.data instruction task)": wiki_batch(args.model, args.packing_batch, 4, eos, seed=3),
                       "instruction mix (prompts 10-256, responses 1-128)": instruction_mix_batch(**kb)}
        result["packing"] = packing_benchmark(model, ref, batches, 1 if args.quick else args.packing_reps,
                                              partial=lambda rows: write_json({**result, "packing": rows}, args.out),
                                              variants=tuple(args.packing_variants.split(",")))
        write_json(result, args.out)
    if not args.skip_an:
        an_kw = dict(batch=args.an_batch, k=args.an_k, max_new_tokens=args.an_new_tokens)
        prefixes = [int(p) for p in args.an_prefix.split(",")]
        if args.quick:
            an_kw.update(batch=2, max_new_tokens=8)
            prefixes = prefixes[:1]
        del ref_bf16
        result["an"] = []
        for prefix in prefixes:
            result["an"] += an_benchmark(ref, reps=1 if args.quick else args.an_reps, prefix=prefix, **an_kw)
    result["wall_s"] = time.time() - t0
    write_json(result, args.out)
    print(render(result))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return result


def render(result: dict) -> str:
    out = [f"machine: {result['machine'].get('cpu')}, {result['machine'].get('torch_threads')} threads, "
           f"torch {result['machine']['torch']}, {result['machine']['date_utc']}"]
    if "steps" in result:
        out.append("\n" + markdown_table(
            ["shape", "variant", "median s", "min s", "ratio vs MLE", "ratio of mins", "CPU-time ratio", "floor",
             "ratio / floor", "peak RSS MiB"],
            [[r["shape"], r["variant"], r["median_s"], r["min_s"], r["ratio"], r["ratio_of_mins"], r["cpu_ratio"],
              r["floor"], "" if r["ratio_over_floor"] is None else r["ratio_over_floor"], r["peak_rss_mib"]]
             for r in result["steps"]],
        ))
    if "packing" in result:
        out.append("\n" + markdown_table(
            ["batch", "variant", "row tokens", "padding overhead", "median s", "vs packed MLE", "real-token floor",
             "ratio / floor", "peak RSS MiB"],
            [[r["batch_label"], r["variant"], f"{r['row_tokens_min']}-{r['row_tokens_max']}", r["padding_overhead"],
              r["median_s"], r["ratio_vs_mle_packed"], r["real_floor"], r["ratio_over_real_floor"] or "",
              r["peak_rss_mib"]] if "speedup" not in r else
             [r["batch_label"], r["variant"], "", "", "", f"speedup {r['speedup']:.3g} (of mins {r['speedup_of_mins']:.3g})",
              "", "", ""] for r in result["packing"]],
        ))
    if "an" in result:
        out.append("\n" + markdown_table(
            ["AN backend", "B", "K", "P", "new tokens", "dtype", "generated", "median s", "tokens/s", "vs hf",
             "token bound"],
            [[r["backend"], r["batch"], r["k"], r["prefix"], r["max_new_tokens"], r["dtype"], r["generated_tokens"],
              r["median_s"], r["tokens_per_s"], r["speedup_vs_hf"], r.get("token_bound", "")] for r in result["an"]],
        ))
    return "\n".join(out)


if __name__ == "__main__":
    main()
