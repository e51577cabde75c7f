"""AN negatives decoded in bf16 on the CPU against ``generate(num_return_sequences=K)`` in fp32, same rows.

    python benchmarks/an_bf16_cpu.py                 # SmolLM2-135M, 4 prefixes x K = 4, prefix 32, 64 new tokens
    python benchmarks/an_bf16_cpu.py --tiny          # a tiny random Llama: exercises the code in seconds

AN negatives are made by the reference model (the paper's default, docs/method.md); ``reference_dtype: bfloat16`` keeps that copy in
bf16, so its negatives decode in bf16 (the CPU has AVX512-BF16: half the weight bytes per decoding step). What
this measures:

1. negatives per second: ``AutoregressiveNegatives`` with the bf16 copy (``shared_prefill`` and ``hf``) against
   the fp32 model's ``generate(num_return_sequences=K)`` (backend ``hf``), same prefixes, K, sampling at
   temperature 1, EOS suppressed so every row decodes ``max_new_tokens`` tokens; variants interleaved, median.
2. the distance of the negatives' distribution from fp32's: along the negatives the bf16 model sampled, the
   next-token distributions of the fp32 and the bf16 model (teacher-forced on prefix + negative), mean per-token
   KL(p_fp32 || p_bf16) in nats (target < 0.01), with its max over tokens.
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
from harness import machine_info, markdown_table, write_json  # noqa: E402


@torch.no_grad()
def next_token_kl(model_p, model_q, prefixes, negatives) -> tuple[float, float, int]:
    """Mean and max over negative tokens of KL(p || q) of the next-token distributions (nats), and the count."""
    total, worst, n = 0.0, 0.0, 0
    for prefix, rows in zip(prefixes, negatives):
        for neg in rows:
            if not neg:
                continue
            ids = torch.tensor([list(prefix) + list(neg)])
            P = len(prefix)
            lp = torch.log_softmax(model_p(input_ids=ids).logits[0, P - 1 : -1].float(), -1)  # (n, V)
            lq = torch.log_softmax(model_q(input_ids=ids).logits[0, P - 1 : -1].float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # (n,)
            total += kl.sum().item()
            worst = max(worst, kl.max().item())
            n += kl.numel()
    return total / max(n, 1), worst, n


class _BatchedGenerate:
    """The baseline: one ``model.generate(num_return_sequences=K)`` call over every prefix at once (the prefixes
    have one length, so no padding), sampling at temperature 1 with EOS suppressed. seqcpo's ``hf`` backend
    samples one prefix per call (per-example seeds), so it is timed beside this, not as the baseline."""

    def __init__(self, model, new_tokens: int, pad: int):
        self.model, self.new_tokens, self.pad = model, new_tokens, pad

    @torch.no_grad()
    def _decode(self, prefixes, k, generator):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        ids = torch.tensor(prefixes)  # (B, P)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, num_return_sequences=k, max_new_tokens=self.new_tokens,
                                  min_new_tokens=self.new_tokens, pad_token_id=self.pad)
        new = out[:, ids.shape[1]:].tolist()  # (B*k, new)
        return [new[b * k:(b + 1) * k] for b in range(len(prefixes))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "an_bf16_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
        args.prefixes, args.prefix, args.new_tokens, args.reps = 2, 8, 8, 1
    else:
        from seqcpo.models import load_model, resolve_model_path

        model = load_model(resolve_model_path(args.model), dtype="float32", attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, model.config.vocab_size, (args.prefix,), generator=g).tolist() for _ in range(args.prefixes)]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    make = lambda m, be: AutoregressiveNegatives(m, DecodingConfig(strategy="sample", temperature=1.0), eos_token_id=-1,  # noqa: E731
                                                 pad_token_id=pad, max_new_tokens=args.new_tokens, backend=be,
                                                 batch_size=args.prefixes)
    gens = {"fp32 hf (generate)": _BatchedGenerate(model, args.new_tokens, pad), "fp32 hf backend": make(model, "hf"),
            "bf16 hf": make(bf16, "hf"),
            "bf16 shared_prefill": make(bf16, "shared_prefill"), "fp32 shared_prefill": make(model, "shared_prefill")}
    times = {n: [] for n in gens}
    cpu = {n: [] for n in gens}  # process CPU seconds: the figure that survives a shared machine
    tokens, samples = {}, {}
    t0 = time.time()
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, an in gens.items():
            t, c = time.perf_counter(), time.process_time()
            out = an._decode(prefixes, args.k, torch.Generator().manual_seed(rep))
            dt, dc = time.perf_counter() - t, time.process_time() - c
            tokens[name] = sum(len(s) for row in out for s in row)
            samples[name] = out
            if rep:
                times[name].append(dt)
                cpu[name].append(dc)
    base = statistics.median(times["fp32 hf (generate)"])
    cpu_base = statistics.median(cpu["fp32 hf (generate)"])
    rows = []
    for name in gens:
        med = statistics.median(times[name])
        rows.append(dict(variant=name, rows=args.prefixes * args.k, prefix=args.prefix, new_tokens=args.new_tokens,
                         generated_tokens=tokens[name], times_s=times[name], median_s=med,
                         tokens_per_s=tokens[name] / med, speedup_vs_fp32_generate=base / med,
                         cpu_s=cpu[name], cpu_median_s=statistics.median(cpu[name]),
                         cpu_speedup_vs_fp32_generate=cpu_base / statistics.median(cpu[name])))
    kl_mean, kl_max, n_tok = next_token_kl(model, bf16, prefixes, samples["bf16 shared_prefill"])
    result = {"machine": machine_info(), "model": "tiny llama" if args.tiny else args.model, "an": rows,
              "kl_fp32_bf16": {"mean_nats_per_token": kl_mean, "max_nats": kl_max, "tokens": n_tok,
                               "along": "negatives sampled by bf16 shared_prefill"},
              "wall_s": time.time() - t0, "command": " ".join(sys.argv)}
    write_json(result, args.out)
    print(markdown_table(["variant", "rows", "P", "new", "median s", "tokens/s", "vs fp32 generate", "CPU s",
                          "vs fp32 generate (CPU time)"],
                         [[r["variant"], r["rows"], r["prefix"], r["new_tokens"], r["median_s"], r["tokens_per_s"],
                           r["speedup_vs_fp32_generate"], r["cpu_median_s"], r["cpu_speedup_vs_fp32_generate"]]
                          for r in rows]))
    print(f"\nKL(fp32 || bf16) of next-token distributions along the bf16 negatives: mean {kl_mean:.4g} nats/token, "
          f"max {kl_max:.3g}, over {n_tok} tokens")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
