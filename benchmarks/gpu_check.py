"""One GPU check sized to a short loan: the CUDA tests, then the GPU benchmark sets in priority order.

    make gpu-check                       # one H100/H200, no downloads, at most 7 minutes wall
    python3 benchmarks/gpu_check.py --out DIR --budget 400
    make gpu-check-dry                   # the same code on the CPU at tiny shapes (tests/test_gpu_check.py runs it)

Order (each set is skipped when its estimate no longer fits in ``--budget`` seconds, and cut by an alarm
when it overruns what is left; ``DIR/gpu_check.json`` is rewritten after every set, so a run cut short still
returns everything it measured):

1. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` in a subprocess (FlexAttention layouts vs naive in
   fp32/bf16, two-pass on CUDA, adapter-off LoRA reference, bf16 steps at OpenLLaMA-3B's shape).
2. ``steps_3b``: the step variants of ``run_gpu.py`` at batch 4, prefix 256, continuation 128, K = 4 on a
   random-init Llama of OpenLLaMA-3B's shape in bf16, then the demo's negatives (tn:2,bn:2).
3. ``memory_k8``: K = 8, prefix 512, continuation 256, batch 2 (OOM recorded, retried with checkpointing).
4. ``an_64_rows``: AN throughput at 64 decoding rows (16 prefixes x K = 4), shared_prefill against hf.
5. ``vllm``: the same with vLLM, when it is installed.
6. ``packing_mix``: an instruction-like mix (prompts 10-256, responses 1-128, K = 4 demo negatives, batch 8):
   prefix-shared rows padded against packed, under SDPA and FlexAttention, cached reference.
7. ``document_rows``: a document row of 1,024 tokens with 8 anchors, K = 4, C = 64 (seqcpo.document_rows) against
   the same anchors as full-prefix windows and as 32-token windows (benchmarks/document_rows_cpu.py's variants),
   at the 3B shape in bf16.

Estimates are for one H100 and were written before any GPU run ("not measured"): the printed plan says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a fresh machine without our package installed: use the tree
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

WALL_LIMIT_S = 420  # the loan's rule: at most 7 minutes wall for the whole check

# (name, estimated seconds on one H100, estimated seconds for --dry on 2 CPU cores)
PLAN = [
    ("cuda_tests", 90, 25),
    ("steps_3b", 150, 15),
    ("memory_k8", 60, 5),
    ("an_64_rows", 45, 5),
    ("vllm", 60, 0),
    ("packing_mix", 40, 5),
    ("document_rows", 30, 10),
]
MAIN_VARIANTS_CPU_SAFE = ("mle", "naive_live", "shared_live", "shared_cached", "twopass_cached", "mn_live",
                          "mn_fused_live")
PACKING_VARIANTS = ("mle", "mle_packed", "shared_cached", "packed_cached", "shared_cached_flex", "packed_cached_flex")


class SetTimeout(BaseException):
    """Not an Exception: run_gpu.run_steps records a variant's Exception and goes on; the budget must stop it."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise :class:`SetTimeout` in this (main) thread after ``seconds``; CUDA work already queued finishes."""
    def fire(signum, frame):
        raise SetTimeout(f"cut after {seconds:.0f} s (budget)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cuda_tests(dry: bool, out_dir: str, timeout_s: float) -> dict:
    env = dict(os.environ)
    if dry:
        env["SEQCPO_CUDA_TESTS_ON_CPU"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    junit = os.path.join(out_dir, "cuda_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=",
           "--junitxml", junit, os.path.join(ROOT, "tests", "test_cuda.py")]
    t = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""
        rc, text = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    summary = [line for line in text.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    last = text.strip().splitlines()[-1] if text.strip() else ""
    print(text[-4000:], flush=True)
    return {"rc": rc, "ok": rc == 0, "seconds": time.time() - t, "summary": last, "tests": summary,
            "output_tail": text[-3000:]}


def document_rows_set(model, ref, dry: bool, reps: int, device) -> list[dict]:
    """The document-row case (benchmarks/document_rows_cpu.py) on this device: seconds per step (median), peak
    memory, and each variant over the MLE step and over the document row's token floor."""
    import statistics

    from document_rows_cpu import VARIANTS, make_case, steps

    from seqcpo.document_rows import document_tokens

    n, A, K, C = (96, 4, 4, 8) if dry else (1024, 8, 4, 64)
    row, anchors, examples, negs = make_case(model.config.vocab_size, n, A, K, C)
    fns, layouts, _, _ = steps(model, ref, row, anchors, examples, negs, C)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, peaks = {v: [] for v in VARIANTS}, {}
    fns["mle_row"]()  # warm-up
    for rep in range(reps):
        for v in VARIANTS:
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            fns[v]()
            sync()
            times[v].append(time.perf_counter() - t)
            if cuda:
                peaks[v] = max(peaks.get(v, 0), torch.cuda.max_memory_allocated())
    model.zero_grad(set_to_none=True)
    floor = document_tokens([row], [anchors], K, C)[0] / n
    mle = statistics.median(times["mle_row"])
    return [{"variant": v, "shape": f"row {n}, A {len(anchors)}, K {K}, C {C}", "median_s": statistics.median(times[v]),
             "x_mle": statistics.median(times[v]) / mle, "ratio_to_doc_floor": statistics.median(times[v]) / (mle * floor),
             "peak_gb": peaks[v] / 2**30 if v in peaks else None, "layouts": layouts, "status": "ok"}
            for v in VARIANTS]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes: the same code, in seconds")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole check (default {WALL_LIMIT_S - 20} on a GPU, 300 dry); sets that "
                         "would not fit are skipped")
    ap.add_argument("--out", default=None, help="results folder (default $OUT/gpu_check or benchmarks/results/gpu_check)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated set names to run (default: all, in order)")
    args = ap.parse_args(argv)

    t0 = time.time()
    dry = args.dry
    budget = args.budget if args.budget is not None else (300.0 if dry else WALL_LIMIT_S - 20.0)
    out_dir = args.out or os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"), "gpu_check")
    os.makedirs(out_dir, exist_ok=True)
    out_json = os.path.join(out_dir, "gpu_check.json")
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run `make gpu-check-dry` (or --dry) to check the code on the CPU")

    from harness import instruction_mix_batch, machine_info, padding_overhead, write_json
    from run_gpu import (MAIN_VARIANTS, MEMORY_VARIANTS, OPENLLAMA_3B, TINY, TNBN_VARIANTS, Shape, an_benchmark,
                         build_model, card_peaks, render)

    only = set(args.only.split(",")) if args.only else None
    plan = [(n, d if dry else g) for n, g, d in PLAN if only is None or n in only]
    from seqcpo.negatives.vllm_backend import vllm_available

    has_vllm = vllm_available() and not dry
    estimate = sum(e for n, e in plan if n != "vllm" or has_vllm)
    print(f"# gpu_check ({'dry: CPU, tiny shapes' if dry else 'CUDA'}), budget {budget:.0f} s, out {out_dir}")
    print("# plan (estimates written before any GPU run, not measured):")
    for n, e in plan:
        note = "" if n != "vllm" or has_vllm else " (vLLM not installed: skipped)"
        print(f"#   {n:12s} ~{e:4.0f} s{note}")
    print(f"# estimated total: {estimate:.0f} s ({estimate / 60:.1f} min); wall limit {WALL_LIMIT_S} s "
          f"({'within' if estimate <= WALL_LIMIT_S else 'OVER'})", flush=True)

    result = {"machine": machine_info(), "dry": dry, "budget_s": budget, "plan": dict(plan),
              "estimate_s": estimate, "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "sets": {}}
    write_json(result, out_json)

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    state = {}

    def models():
        if "model" not in state:
            model = build_model(TINY if dry else OPENLLAMA_3B, device, dtype)
            model.train()
            state["model"] = model
            state["ref"] = copy.deepcopy(model).eval().requires_grad_(False)
        return state["model"], state["ref"]

    reps = 1 if dry else args.reps
    main_shape = Shape(2, 16, 8, 4) if dry else Shape(4, 256, 128, 4)
    mem_shape = Shape(2, 32, 16, 8) if dry else Shape(2, 512, 256, 8)
    # FlexAttention on the CPU compiles through inductor for every reference pass (30 s and a C compiler):
    # the dry run leaves the _flex variants to the CUDA tests, which take their CPU fallback
    cpu_safe = (lambda vs: tuple(v for v in vs if not v.endswith("_flex"))) if dry else (lambda vs: tuple(vs))

    def run_set(name):
        import run_gpu

        model, ref = models()
        if name == "steps_3b":
            rows = run_gpu.run_steps(model, ref, main_shape, cpu_safe(MAIN_VARIANTS), reps, device, seed=0,
                                     retry_ckpt=False)
            rows += run_gpu.run_steps(model, ref, main_shape, cpu_safe(TNBN_VARIANTS), reps, device, seed=2,
                                      retry_ckpt=False, negatives="tn:2,bn:2")
            peak = card_peaks(args_ns)[0]
            for r in rows:
                r["mfu"] = r.get("tflops", float("nan")) * 1e12 / peak
            return {"rows": rows}
        if name == "memory_k8":
            return {"rows": run_gpu.run_steps(model, ref, mem_shape, cpu_safe(MEMORY_VARIANTS), max(1, reps - 1),
                                              device, seed=1, retry_ckpt=True)}
        if name in ("an_64_rows", "vllm"):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            kw = dict(n_prefix=4, k=4, prefix=16, new_tokens=8) if dry else dict(n_prefix=16, k=4, prefix=256, new_tokens=128)
            backends = ("hf", "vllm") if name == "vllm" else ("shared_prefill", "hf")
            return {"rows": an_benchmark(ref, reps=1 if dry else 2, device=device, bandwidth=card_peaks(args_ns)[1],
                                         backends=backends, **kw)}
        if name == "packing_mix":
            B = 4 if dry else 8
            kw = dict(prompt=(2, 24), response=(1, 12)) if dry else {}
            raw = instruction_mix_batch(B, 4, model.config.vocab_size, eos=2, seed=5, **kw)
            rows = run_gpu.run_steps(model, ref, Shape(B, 256, 128, 4), cpu_safe(PACKING_VARIANTS), reps, device,
                                     seed=5, retry_ckpt=False, negatives="instruction mix", raw=raw)
            times = {r["variant"]: r.get("median_s") for r in rows}
            for r in rows:
                layout = "packed" if "packed" in r["variant"] else "padded"
                r["padding_overhead"] = padding_overhead(raw, "packed" if layout == "packed" else "shared")
                base = times.get("mle_packed")
                if base and r.get("median_s"):
                    r["ratio_vs_mle_packed"] = r["median_s"] / base
                    cpo = r["variant"].startswith(("shared", "packed"))
                    r["ratio_over_real_floor"] = r["median_s"] / base / r["floor"] if cpo else None
            for a, b in (("shared_cached", "packed_cached"), ("shared_cached_flex", "packed_cached_flex")):
                if times.get(a) and times.get(b):
                    rows.append({"variant": f"speedup {b} over {a}", "speedup": times[a] / times[b]})
            return {"rows": rows}
        if name == "document_rows":
            return {"rows": document_rows_set(model, ref, dry, reps, device)}
        raise ValueError(name)

    args_ns = argparse.Namespace(peak_tflops=None, bandwidth_tbs=None)
    for name, est in plan:
        elapsed = time.time() - t0
        entry = {"estimate_s": est}
        if name == "vllm" and not has_vllm:
            entry["status"] = "skipped: vLLM not installed" if not dry else "skipped: dry run"
        elif elapsed + est > budget:
            entry["status"] = f"skipped: budget ({elapsed:.0f} s used, ~{est} s needed, {budget:.0f} s budget)"
        else:
            t = time.time()
            left = budget - elapsed
            try:
                if name == "cuda_tests":
                    entry.update(cuda_tests(dry, out_dir, timeout_s=min(left, 2.0 * est + 30)))
                    entry["status"] = "ok" if entry["ok"] else f"failed (rc {entry['rc']})"
                else:
                    with alarm(left):
                        entry.update(run_set(name))
                    entry["status"] = "ok"
            except SetTimeout as err:
                entry["status"] = f"cut: {err}"
            except Exception as err:  # noqa: BLE001 - one broken set must not lose the others' figures
                entry["status"] = f"error: {type(err).__name__}: {str(err)[:500]}"
            entry["seconds"] = time.time() - t
        result["sets"][name] = entry
        result["wall_s"] = time.time() - t0
        write_json(result, out_json)
        print(f"# {name}: {entry['status']} ({entry.get('seconds', 0):.0f} s; {result['wall_s']:.0f} s so far)", flush=True)

    if "model" in state:
        result["model"] = {"name": "tiny llama" if dry else "random-init Llama, OpenLLaMA-3B shape",
                           "params": sum(p.numel() for p in state["model"].parameters()),
                           "dtype": str(dtype).replace("torch.", "")}
    result["wall_s"] = time.time() - t0
    write_json(result, out_json)
    view = {"machine": result["machine"], "model": (result.get("model") or {}).get("name", ""),
            "dtype": str(dtype).replace("torch.", ""),
            "steps": [r for s in ("steps_3b", "packing_mix") for r in result["sets"].get(s, {}).get("rows", [])
                      if "shape" in r]}
    mem = result["sets"].get("memory_k8", {}).get("rows")
    if mem:
        view["memory_case"] = mem
    an = [r for s in ("an_64_rows", "vllm") for r in result["sets"].get(s, {}).get("rows", [])]
    if an:
        view["an"] = an
    try:
        print(render(view))
    except Exception as err:  # noqa: BLE001 - the JSON is the result; the table is a courtesy
        print(f"# (table not rendered: {err})")
    print(json.dumps({n: e["status"] for n, e in result["sets"].items()}, indent=1))
    print(f"wrote {out_json} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    res = main()
    failed = [n for n, e in res["sets"].items() if e["status"].startswith(("failed", "error"))]
    sys.exit(1 if failed else 0)
