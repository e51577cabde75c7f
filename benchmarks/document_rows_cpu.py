"""CPU benchmark: a document row's CPO step (one forward per row) against the same anchors as full-prefix windows
and against 32-token windows, on SmolLM2-135M, fp32.

    nice .venv/bin/python benchmarks/document_rows_cpu.py --threads 1  # about 20 minutes on one busy core
    nice .venv/bin/python benchmarks/document_rows_cpu.py --quick    # a tiny row, one rep: a smoke run

Shape: one row of ``--row`` (1,024) tokens, ``--anchors`` (8) anchors drawn as training draws them, K = 4
negatives of C = 64 tokens each (MN's shape: every negative C tokens, made before the timed step). Every step is
forward + backward of the training loss (optimizer excluded), variants interleaved (after one untimed MLE step),
median of the reps, peak memory the largest RSS rise over a step (sampled every 2 ms, harness.RSSPeak):

    mle_row        L_mle over every token of the row (plain causal pass): the floor's base.
    doc_live       document row: the row and its A x K negative branches in one pass (seqcpo.document_rows),
                   MLE on every row token + CPO at the anchors; the frozen reference runs the same layout live.
    doc_cached     the same, reference log-probs precomputed (the policy's pass alone).
    windows_live   the same anchors as windows with their full prefix (row[:a] -> row[a:a+C], same negatives),
                   in the layout ``logps_layout: auto`` picks, MLE on the golds; live reference, same layout.
    win32_live     the same anchors as 32-token windows (row[a-32:a] -> row[a:a+C]), the paper's short windows.

Token floor of the document row: (row tokens + A x K x C) / row tokens, the tokens its pass runs over those of
the MLE step; ``ratio to floor`` = step time / (mle_row time x floor). Corpus tokens trained per step: the row
tokens with an MLE target (row - 1) for the document row; the distinct gold tokens for windows.
Writes ``benchmarks/results/document_rows_cpu.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RSSPeak, machine_info, markdown_table, write_json  # noqa: E402

from seqcpo.document_rows import (  # noqa: E402
    anchor_examples,
    build_document_layout,
    choose_anchors,
    document_logps,
    document_tokens,
)
from seqcpo.logps import choose_layout, sequence_logps  # noqa: E402
from seqcpo.losses import cpo_loss, mle_loss  # noqa: E402
from seqcpo.seeding import example_generators  # noqa: E402
from seqcpo.types import CandidateBatch  # noqa: E402

VARIANTS = ("mle_row", "doc_cached", "doc_live", "windows_live", "win32_live")


def make_case(vocab: int, n: int, A: int, K: int, C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(3, vocab, (n,), generator=g).tolist()
    anchors = choose_anchors(n, C, A, None, example_generators(seed, ["doc0"], 0, "anchors")[0])
    examples = anchor_examples([row], ["doc0"], [anchors], C)
    negs = [[torch.randint(3, vocab, (C,), generator=g).tolist() for _ in range(K)] for _ in examples]
    return row, anchors, examples, negs


def _window_batch(examples, negs, prefix_cap=None):
    prefixes = [e.prefix_ids[-prefix_cap:] if prefix_cap else e.prefix_ids for e in examples]
    return CandidateBatch(prefixes, [[e.continuation_ids] + n for e, n in zip(examples, negs)],
                          [[True] * (len(n) + 1) for n in negs])


def steps(model, ref, row, anchors, examples, negs, C, beta=0.1, lam=1.0):
    K = len(negs[0])
    layout = build_document_layout([row], [anchors], negs, C)
    with torch.no_grad():
        doc_ref = document_logps(ref, layout).anchors.logps
    mle_batch = CandidateBatch([row[:1]], [[row[1:]]], [[True]])
    mask = torch.ones(len(examples), K + 1, dtype=torch.bool)

    def doc(cached):
        def step():
            lay = build_document_layout([row], [anchors], negs, C)
            out = document_logps(model, lay)
            if cached:
                r = doc_ref
            else:
                with torch.no_grad():
                    r = document_logps(ref, lay).anchors.logps
            loss = -out.row_summed.sum() / lay.row_counts.sum() + lam * cpo_loss(out.anchors.logps, r, beta, mask=mask)
            loss.backward()
            return loss.item()
        return step

    def windows(batch, layout, cached):
        with torch.no_grad():
            pre = sequence_logps(ref, batch, layout=layout).logps

        def step():
            out = sequence_logps(model, batch, layout=layout)
            if cached:
                r = pre
            else:
                with torch.no_grad():
                    r = sequence_logps(ref, batch, layout=layout).logps
            loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0]) + lam * cpo_loss(out.logps, r, beta, mask=mask)
            loss.backward()
            return loss.item()
        return step

    def mle():
        out = sequence_logps(model, mle_batch, layout="shared")
        loss = mle_loss(out.summed[:, 0], out.token_counts[:, 0])
        loss.backward()
        return loss.item()

    full, short = _window_batch(examples, negs), _window_batch(examples, negs, prefix_cap=32)
    full_layout, short_layout = choose_layout(model, full), choose_layout(model, short)
    fns = {"mle_row": mle, "doc_live": doc(False), "doc_cached": doc(True),
           "windows_live": windows(full, full_layout, False), "win32_live": windows(short, short_layout, False)}
    return fns, {"windows": full_layout, "win32": short_layout}, full, short


def _tokens(batch: CandidateBatch) -> int:
    return sum(len(p) + sum(len(c) for c in cs) for p, cs in zip(batch.prefix_ids, batch.candidate_ids))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--row", type=int, default=1024)
    ap.add_argument("--anchors", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--c", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time", choices=("cpu", "wall"), default="cpu",
                    help="the seconds the ratios use: process CPU time (default; robust on a shared machine) or wall")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "document_rows_cpu.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.row, args.anchors, args.c, args.reps = 128, 4, 8, 1
    torch.set_num_threads(args.threads)
    from seqcpo.models import load_model, resolve_model_path

    t0 = time.time()
    model = load_model(resolve_model_path(args.model), dtype="float32", attn_implementation="sdpa")
    model.train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    row, anchors, examples, negs = make_case(model.config.vocab_size, args.row, args.anchors, args.k, args.c)
    fns, layouts, full, short = steps(model, ref, row, anchors, examples, negs, args.c)

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}  # process CPU seconds (all threads)
    mem: dict[str, int] = {v: 0 for v in VARIANTS}
    fns["mle_row"]()  # warm-up
    model.zero_grad(set_to_none=True)
    for _ in range(args.reps):
        for v in VARIANTS:
            with RSSPeak() as peak:
                start, cpu_start = time.perf_counter(), time.process_time()
                fns[v]()
                times[v].append(time.perf_counter() - start)
                cpu[v].append(time.process_time() - cpu_start)
            mem[v] = max(mem[v], peak.peak_delta)
            model.zero_grad(set_to_none=True)
            print(f"  {v}: {times[v][-1]:.1f} s wall, {cpu[v][-1]:.1f} s CPU", flush=True)
            write_json({"partial": True, "times": times, "cpu": cpu, "peak_mem_bytes": mem, "anchors": anchors}, args.out)
    doc_tokens, window_tokens = document_tokens([row], [anchors], args.k, args.c)
    floor = doc_tokens / len(row)
    gold_union = len({a + i for a in anchors for i in range(args.c)})
    trained = {"mle_row": len(row) - 1, "doc_live": len(row) - 1, "doc_cached": len(row) - 1,
               "windows_live": gold_union, "win32_live": gold_union}
    ran = {"mle_row": len(row), "doc_live": doc_tokens, "doc_cached": doc_tokens, "windows_live": _tokens(full),
           "win32_live": _tokens(short)}
    # on a busy machine wall time measures the neighbours: the ratios are taken on process CPU time (all threads),
    # wall time is reported beside it
    basis = cpu if args.time == "cpu" else times
    mle_s = statistics.median(basis["mle_row"])
    rows = []
    for v in VARIANTS:
        s = statistics.median(basis[v])
        rows.append({"variant": v, "s_per_step": s, "wall_s": statistics.median(times[v]), "min_s": min(basis[v]), "tokens_run": ran[v],
                     "corpus_tokens_trained": trained[v], "corpus_tokens_per_s": trained[v] / s,
                     "peak_mem_mb": mem[v] / 2**20, "ratio_to_doc_floor": s / (mle_s * floor),
                     "x_mle": s / mle_s})
    by = {r["variant"]: r for r in rows}
    result = {
        "machine": machine_info(), "model": args.model, "dtype": "float32", "command": " ".join(sys.argv),
        "shape": {"row": len(row), "anchors": anchors, "k": args.k, "c": args.c}, "time_basis": args.time,
        "layouts": layouts, "token_floor": floor, "tokens": {"document_row": doc_tokens, "windows": window_tokens},
        "rows": rows,
        "speedup_doc_vs_windows_live": by["windows_live"]["s_per_step"] / by["doc_live"]["s_per_step"],
        "wall_s": time.time() - t0,
    }
    write_json(result, args.out)
    print(f"machine: {result['machine'].get('cpu')}, {args.threads} threads, load {result['machine'].get('loadavg_1m_at_start')}")
    print(f"row {len(row)}, anchors {anchors}, K {args.k}, C {args.c}; token floor {floor:.2f}; windows layout "
          f"{layouts['windows']}, 32-token windows layout {layouts['win32']}")
    print(markdown_table(
        ["variant", f"{args.time} s/step", "wall s", "min s", "tokens run", "corpus tokens trained", "corpus tok/s", "peak MB",
         "x MLE", "ratio to doc floor"],
        [[r["variant"], r["s_per_step"], r["wall_s"], r["min_s"], r["tokens_run"], r["corpus_tokens_trained"],
          r["corpus_tokens_per_s"], r["peak_mem_mb"], r["x_mle"], r["ratio_to_doc_floor"]] for r in rows]))
    print(f"document row vs full-prefix windows (live reference): {result['speedup_doc_vs_windows_live']:.2f}x")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
