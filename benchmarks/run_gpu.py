"""GPU benchmark at the issue's 3B shape: CPO step vs MLE step, peak memory, MFU, AN throughput, in one go.

    python benchmarks/run_gpu.py                 # on a CUDA machine; about 5-8 minutes on one H100
    python benchmarks/run_gpu.py --tiny          # a tiny random Llama, any device: exercises every code path

The model is a random-init Llama of OpenLLaMA-3B's shape (hidden 3200, 26 layers, 32 heads, MLP 8640,
vocab 32000), bf16, SDPA by default, built directly on the GPU (no download). Sets:

1. Step time (forward + backward, optimizer excluded) and peak memory (``torch.cuda.max_memory_allocated``
   over one step, weights and gradients included) at batch 4, prefix 256, continuation 128, K = 4, for
   the variants of ``harness.STEP_VARIANTS``: MLE; CPO naive with a live reference; prefix-shared with a
   live reference and with cached reference log-probs, each under SDPA with the dense 4-D mask and under
   FlexAttention with the prefix-shared ``BlockMask`` (``_flex``); the two-pass layout (cached reference); MN
   negatives made in the step by the reference, by their own pass (``mn_live``) or from the reference's
   two-pass gold branch (``mn_fused_live``). Then the demo's negatives (2 truncations + 2 batch negatives on
   random golds), prefix-shared under FlexAttention against the two-pass layout that ``logps_layout: auto``
   picks for them. Ratios against the MLE step of the same
   run, beside the token floor (P + (K+1)C)/(P + C) = 2.33 and ratio / floor.
2. Model FLOPs utilisation of each step: model FLOPs (6 x body params x tokens + 6 x head params x
   head tokens + 12 x layers x hidden x attended (query, key) pairs; a live reference adds the forward third
   of that on its tokens) over step time over the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s, or
   ``--peak-tflops``).
3. The memory case: K = 8, prefix 512, continuation 256, batch 2: MLE and the prefix-shared variants (and
   naive, which the issue saw run out of 80 GB); an out-of-memory variant is recorded as such and retried
   with gradient checkpointing.
4. AN throughput at 64 decoding rows (16 prefixes x K = 4, prefix 256, 128 new tokens, EOS suppressed):
   ``backend="shared_prefill"`` against ``backend="hf"`` (``generate(num_return_sequences=K)``), and
   ``backend="vllm"`` when vLLM is installed; tokens/s and the memory floor (weights + KV cache read once per
   decoding step at the card's bandwidth).

Writes ``$OUT/gpu.json`` when ``$OUT`` is set (else ``benchmarks/results/gpu.json``) and prints markdown tables.
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

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    RSSPeak,
    Shape,
    batch_floor,
    interleaved,
    machine_info,
    make_step,
    markdown_table,
    precompute_ref_logps,
    random_batch,
    tn_bn_batch,
    write_json,
)

OPENLLAMA_3B = dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False)

MAIN_VARIANTS = ("mle", "naive_live", "shared_live", "shared_cached", "twopass_cached", "mn_live", "mn_fused_live",
                 "shared_live_flex", "shared_cached_flex")
TNBN_VARIANTS = ("mle", "shared_cached_flex", "twopass_cached", "shared_live_flex", "twopass_live")
MEMORY_VARIANTS = ("mle", "shared_cached_flex", "shared_live_flex", "shared_cached", "naive_live")

# dense bf16 peak FLOP/s, and HBM bandwidth (bytes/s) for the decoding floor
CARDS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.86e12)}


def build_model(cfg_kw: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kw, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model


def card_peaks(args) -> tuple[float, float]:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    flops, bw = next((v for k, v in CARDS.items() if k in name), (None, None))
    if args.peak_tflops:
        flops = args.peak_tflops * 1e12
    if args.bandwidth_tbs:
        bw = args.bandwidth_tbs * 1e12
    return flops or float("nan"), bw or float("nan")


def step_flops(cfg, shape: Shape, variant: str) -> float:
    """Model FLOPs of one forward + backward step (see the module docstring)."""
    H, Lyr, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    # per layer: q and o projections H x H each, k and v H x (kv/heads) H each, the gated MLP 3 x H x I
    body = Lyr * (2 * H * H + 2 * H * H * cfg.num_key_value_heads // cfg.num_attention_heads + 3 * H * cfg.intermediate_size)
    head = H * V
    B, P, C, K = shape.batch, shape.prefix, shape.cont, shape.k
    if variant == "mle":
        tokens, head_tokens = B * (P + C), B * C
        pairs = B * ((P + C) * (P + C + 1) / 2)
    elif variant.startswith("naive"):
        tokens, head_tokens = B * (K + 1) * (P + C), B * (K + 1) * (P + C)  # naive takes full-vocab logits everywhere
        pairs = B * (K + 1) * ((P + C) * (P + C + 1) / 2)
    else:
        tokens, head_tokens = B * (P + (K + 1) * C), B * (K + 1) * C
        pairs = B * (P * (P + 1) / 2 + (K + 1) * (C * P + C * (C + 1) / 2))
    fwd = 2 * body * tokens + 2 * head * head_tokens + 4 * Lyr * H * pairs
    # forward + backward; a live reference adds one more forward over the same tokens
    return (4 if "live" in variant else 3) * fwd


def run_steps(model, ref, shape: Shape, variants, reps: int, device, seed: int, retry_ckpt: bool,
              negatives: str = "random", raw=None) -> list[dict]:
    """``negatives``: "random" (full-length random candidates, the floor of ``shape``) or "tn:2,bn:2" (the
    demo's negatives on random golds, ``harness.tn_bn_batch``; its own token floor, no FLOP count); or any
    label with ``raw``, a prepared ``CandidateBatch`` of mixed lengths (its real-token floor, no FLOP count)."""
    if raw is not None:
        pass
    elif negatives == "random":
        raw = random_batch(shape, model.config.vocab_size, seed=seed)
    else:
        raw = tn_bn_batch(shape, model.config.vocab_size, eos=2, seed=seed)
    batch = precompute_ref_logps(ref, raw)
    floor = shape.floor if negatives == "random" else batch_floor(batch)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps, status = {}, {}
    for v in variants:
        steps[v] = make_step(v, model, batch, ref_model=ref if "live" in v else None)

    def mem(name, fn):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        with RSSPeak() as peak:
            fn()
        return peak.peak_delta

    # memory run first, per variant, so an OOM drops only that variant (and maybe retries with checkpointing)
    mems = {}
    for v in list(steps):
        for ckpt in ((False, True) if retry_ckpt else (False,)):
            _set_ckpt(model, ckpt)
            try:
                model.zero_grad(set_to_none=True)
                mems[v] = mem(v, steps[v])  # also the warm-up (and the flex compile)
                status[v] = "ok, grad ckpt" if ckpt else "ok"
                break
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                status[v] = "OOM" + (" with grad ckpt" if ckpt else "")
            except Exception as err:  # one broken variant (e.g. a kernel this card lacks) must not stop the run
                model.zero_grad(set_to_none=True)
                status[v] = f"error: {type(err).__name__}: {str(err)[:300]}"
                print(f"# {shape.name} {v}: {status[v]}", flush=True)
                break
        _set_ckpt(model, False)
    runnable = {v: fn for v, fn in steps.items() if status[v].startswith("ok")}
    ckpt_vs = {v for v in runnable if "ckpt" in status[v]}
    timed = {v: (lambda fn=fn, v=v: (_set_ckpt(model, v in ckpt_vs), fn(), _set_ckpt(model, False))) for v, fn in runnable.items()}
    res = interleaved(timed, model, reps, sync=sync)
    rows = []
    base = res.median("mle") if "mle" in res.times else float("nan")
    for v in variants:
        row = dict(shape=shape.name if negatives == "random" else f"{shape.name} {negatives}", negatives=negatives,
                   batch=shape.batch, prefix=shape.prefix, cont=shape.cont, k=shape.k, variant=v,
                   status=status[v], floor=floor, peak_mem_gib=mems.get(v, float("nan")) / 2**30,
                   model_tflop=step_flops(model.config, shape, v) / 1e12 if negatives == "random" else float("nan"))
        if v in res.times:
            med = res.median(v)
            row.update(times_s=res.times[v], median_s=med, ratio=med / base,
                       ratio_over_floor=med / base / floor if v != "mle" else None,
                       tflops=row["model_tflop"] / med)
        rows.append(row)
    mle_mem = next((r["peak_mem_gib"] for r in rows if r["variant"] == "mle"), float("nan"))
    for r in rows:
        r["mem_vs_mle"] = r["peak_mem_gib"] / mle_mem
    return rows


def _set_ckpt(model, on: bool):
    if on and not model.is_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not on and model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def an_benchmark(model, n_prefix: int, k: int, prefix: int, new_tokens: int, reps: int, device, bandwidth: float,
                 backends=("shared_prefill", "hf", "vllm")) -> list[dict]:
    """AN tokens/s of each of ``backends`` ("vllm" only when installed and on CUDA); speedups against "hf"
    when it is among them."""
    from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig

    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, model.config.vocab_size, (prefix,), generator=g).tolist() for _ in range(n_prefix)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gens = {be: AutoregressiveNegatives(model, DecodingConfig(strategy="sample"), eos_token_id=-1, pad_token_id=0,
                                        max_new_tokens=new_tokens, backend=be, batch_size=n_prefix)
            for be in ("shared_prefill", "hf") if be in backends}
    from seqcpo.negatives.vllm_backend import VLLMDecoder, vllm_available

    if "vllm" in backends and vllm_available() and device.type == "cuda":
        # vLLM loads weights from disk: save the (random-init) model once; it takes its share of the card
        import tempfile

        path = tempfile.mkdtemp(prefix="seqcpo_vllm_")
        model.save_pretrained(path)
        try:
            dec = VLLMDecoder(path, dtype="bfloat16", gpu_memory_utilization=0.4, enforce_eager=False)
            dec.llm  # load now, outside the timed region
            gens["vllm"] = AutoregressiveNegatives(model, DecodingConfig(strategy="sample"), eos_token_id=-1,
                                                   pad_token_id=0, max_new_tokens=new_tokens, backend="vllm", vllm=dec)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            print(f"# vllm backend unavailable: {type(e).__name__}: {e}", flush=True)
    times = {be: [] for be in gens}
    tokens = {}
    for rep in range(reps + 1):  # rep 0 warms up
        for be, an in gens.items():
            sync()
            t = time.perf_counter()
            out = an._decode(prefixes, k, torch.Generator().manual_seed(rep))
            sync()
            if rep:
                times[be].append(time.perf_counter() - t)
            tokens[be] = sum(len(s) for row in out for s in row)
    # floor: every decoding step reads the weights once and the KV cache of every row
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    rows_ = n_prefix * k
    mean_cache = prefix + new_tokens / 2
    floor_step_s = (weight_bytes + rows_ * mean_cache * kv_per_token) / bandwidth
    floor_tps = rows_ / floor_step_s
    out = []
    for be in gens:
        med = statistics.median(times[be])
        out.append(dict(backend=be, rows=rows_, prefixes=n_prefix, k=k, prefix=prefix, new_tokens=new_tokens,
                        generated_tokens=tokens[be], times_s=times[be], median_s=med, tokens_per_s=tokens[be] / med,
                        floor_tokens_per_s=floor_tps))
    hf = next((r["tokens_per_s"] for r in out if r["backend"] == "hf"), float("nan"))
    for r in out:
        r["speedup_vs_hf"] = r["tokens_per_s"] / hf
        r["fraction_of_floor"] = r["tokens_per_s"] / floor_tps
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama and small shapes (any device)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, if not detected")
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="HBM bandwidth in TB/s, if not detected")
    ap.add_argument("--skip-memory-case", action="store_true")
    ap.add_argument("--skip-an", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json or benchmarks/results/gpu.json)")
    args = ap.parse_args(argv)

    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        sys.exit("run_gpu.py needs CUDA (or --tiny to exercise the code paths on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(TINY if args.tiny else OPENLLAMA_3B, device, dtype)
    model.train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    peak, bw = card_peaks(args)
    n_params = sum(p.numel() for p in model.parameters())
    result = {"machine": machine_info(), "model": "tiny llama" if args.tiny else "random-init Llama, OpenLLaMA-3B shape",
              "params": n_params, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
              "peak_flops": peak, "hbm_bytes_per_s": bw, "command": " ".join(["python"] + sys.argv),
              "memory_metric": "torch.cuda.max_memory_allocated over one step" if device.type == "cuda" else "peak RSS delta"}
    print(f"# model {n_params / 1e9:.2f} B params on {device} in {time.time() - t0:.0f} s", flush=True)

    main_shape = Shape(2, 16, 8, 4) if args.tiny else Shape(4, 256, 128, 4)
    mem_shape = Shape(2, 32, 16, 8) if args.tiny else Shape(2, 512, 256, 8)
    t = time.time()
    result["steps"] = run_steps(model, ref, main_shape, MAIN_VARIANTS, args.reps, device, seed=0, retry_ckpt=False)
    print(f"# {main_shape.name}: {time.time() - t:.0f} s", flush=True)
    # the demo's negatives: is the two-pass layout (what logps_layout auto picks for them) faster here too?
    t = time.time()
    result["steps"] += run_steps(model, ref, main_shape, TNBN_VARIANTS, args.reps, device, seed=2, retry_ckpt=False,
                                 negatives="tn:2,bn:2")
    print(f"# {main_shape.name} tn:2,bn:2: {time.time() - t:.0f} s", flush=True)
    for r in result["steps"]:
        r["mfu"] = r.get("tflops", float("nan")) * 1e12 / peak
    if not args.skip_memory_case:
        t = time.time()
        result["memory_case"] = run_steps(model, ref, mem_shape, MEMORY_VARIANTS, max(2, args.reps // 2), device,
                                          seed=1, retry_ckpt=True)
        for r in result["memory_case"]:
            r["mfu"] = r.get("tflops", float("nan")) * 1e12 / peak
        print(f"# {mem_shape.name}: {time.time() - t:.0f} s", flush=True)
    if not args.skip_an:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.time()
        kw = dict(n_prefix=4, k=4, prefix=16, new_tokens=8) if args.tiny else dict(n_prefix=16, k=4, prefix=256, new_tokens=128)
        result["an"] = an_benchmark(ref, reps=2, device=device, bandwidth=bw, **kw)
        print(f"# AN: {time.time() - t:.0f} s", flush=True)
    result["wall_s"] = time.time() - t0
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                                   "gpu_tiny.json" if args.tiny else "gpu.json")
    write_json(result, out)
    print(render(result))
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")
    return result


def render(result: dict) -> str:
    m = result["machine"]
    out = [f"device: {m.get('gpu', m.get('cpu'))}, torch {m['torch']}, {result['model']}, {result['dtype']}, {m['date_utc']}"]
    hdr = ["shape", "variant", "status", "median s", "ratio vs MLE", "floor", "ratio / floor", "peak GiB", "mem vs MLE",
           "TFLOP/s", "MFU"]

    def rows(rs):
        return [[r["shape"], r["variant"], r["status"], r.get("median_s", ""), r.get("ratio", ""), r["floor"],
                 r.get("ratio_over_floor") or "", r["peak_mem_gib"], r["mem_vs_mle"], r.get("tflops", ""), r.get("mfu", "")]
                for r in rs]

    out.append("\n" + markdown_table(hdr, rows(result["steps"])))
    if "memory_case" in result:
        out.append("\n" + markdown_table(hdr, rows(result["memory_case"])))
    if "an" in result:
        out.append("\n" + markdown_table(
            ["AN backend", "rows", "P", "new", "generated", "median s", "tokens/s", "vs hf", "floor tokens/s", "of floor"],
            [[r["backend"], r["rows"], r["prefix"], r["new_tokens"], r["generated_tokens"], r["median_s"],
              r["tokens_per_s"], r["speedup_vs_hf"], r["floor_tokens_per_s"], r["fraction_of_floor"]] for r in result["an"]]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
