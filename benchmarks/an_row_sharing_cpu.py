"""AN negatives at the anchors of one document row: one shared prefill of the row against one prefill per anchor.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/an_row_sharing_cpu.py          # SmolLM2-135M, minutes
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/an_row_sharing_cpu.py --tiny   # a tiny Llama: seconds

Shape: one row of ``--row`` (1,024) random tokens, ``--anchors`` (8) anchors every (row - C) / anchors tokens
(``anchor_stride``; ``--random-anchors``: drawn as ``anchors_per_row`` draws them, seed 0;
:func:`seqcpo.document_rows.choose_anchors`, C = ``--new-tokens``), every anchor a window ``row[:a]``
(:func:`seqcpo.document_rows.anchor_examples`), K = 4 negatives each, sampled at temperature 1 with EOS
suppressed so every negative has ``--new-tokens`` (64) tokens, all anchors in one chunk (``batch_size`` = anchors),
fp32, one torch thread. Variants, after one untimed call of each, interleaved rep by rep, median:

    shared     ``AutoregressiveNegatives`` (shared_prefill backend), the anchors' prefixes prefilled once, as the
               row (:mod:`seqcpo.negatives.prefix_kv`).
    unshared   the same with ``share_prefix_kv=False``: the anchors' prefixes left-padded and prefilled as a batch.

Reported: process CPU seconds of the whole call and of its prefill forward (the machine is shared: CPU time, not
wall time, is the figure to compare), wall seconds, the prefill's tokens (rows x width as run, padding included,
and real tokens), and whether the two variants' negatives are token-identical (sampling over a 49k vocabulary
flips a token now and then under float rounding, and the rest of that negative follows; so also the largest
difference of the first-step logits, shared against unshared and, for scale, unshared against each prefix
prefilled alone).
Writes ``benchmarks/results/an_row_sharing_cpu.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_info, markdown_table, write_json  # noqa: E402


class PrefillMeter:
    """Forward hooks on the model: CPU seconds, rows x width and real tokens of every forward over more than one
    position (the prefills; a decoding step runs one position)."""

    def __init__(self, model):
        self.cpu = 0.0
        self.padded = self.real = 0
        self._t = None
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post)

    def reset(self):
        self.cpu, self.padded, self.real = 0.0, 0, 0

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            self.padded += ids.numel()
            self.real += int(kwargs["attention_mask"].sum())
            self._t = time.process_time()

    def _post(self, module, args, output):
        if self._t is not None:
            self.cpu += time.process_time() - self._t
            self._t = None


@torch.no_grad()
def first_logits_diff(variants, prefixes) -> dict:
    """Largest |difference| of the (B, V) first-step logits: shared against unshared prefill, and unshared
    (left-padded batch) against each prefix prefilled alone (the float rounding the unshared path already has)."""
    shared = variants["shared"]._prefill(prefixes)[2].float()
    unshared = variants["unshared"]._prefill(prefixes)[2].float()
    alone = torch.cat([variants["unshared"]._prefill([p])[2].float() for p in prefixes])
    return {"shared_vs_unshared": (shared - unshared).abs().max().item(),
            "unshared_vs_alone": (unshared - alone).abs().max().item(),
            "logit_scale": unshared.abs().max().item()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--row", type=int, default=1024)
    ap.add_argument("--anchors", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--random-anchors", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "an_row_sharing_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from seqcpo.document_rows import anchor_examples, choose_anchors
    from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
        args.row, args.new_tokens, args.reps = 128, 8, 1
    else:
        from seqcpo.models import load_model, resolve_model_path

        model = load_model(resolve_model_path(args.model), dtype="float32")
    model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    row = torch.randint(3, model.config.vocab_size, (args.row,), generator=g).tolist()
    stride = None if args.random_anchors else (args.row - args.new_tokens) // args.anchors
    anchors = choose_anchors(len(row), args.new_tokens, args.anchors, stride, g)
    windows = anchor_examples([row], ["row0"], [anchors], args.new_tokens)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    make = lambda share: AutoregressiveNegatives(  # noqa: E731
        model, DecodingConfig(strategy="sample", temperature=1.0), eos_token_id=-1, pad_token_id=pad,
        max_new_tokens=args.new_tokens, batch_size=len(windows), share_prefix_kv=share)
    variants = {"shared": make(True), "unshared": make(False)}
    meter = PrefillMeter(model)
    # warm-up, untimed: one full call of each variant (in a first run the cold first call of a variant ran
    # 1.4-1.8x slower than its second)
    for an in variants.values():
        an(windows, args.k, [torch.Generator().manual_seed(i) for i in range(len(windows))])
    res = {n: dict(cpu=[], wall=[], prefill_cpu=[]) for n in variants}
    negatives = {}
    t0 = time.time()
    for rep in range(args.reps):
        for name, an in (variants.items() if rep % 2 == 0 else reversed(variants.items())):
            gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(windows))]
            meter.reset()
            t, c = time.perf_counter(), time.process_time()
            negatives[name] = an(windows, args.k, gens).ids
            res[name]["wall"].append(time.perf_counter() - t)
            res[name]["cpu"].append(time.process_time() - c)
            res[name]["prefill_cpu"].append(meter.cpu)
            res[name].update(prefill_rows_x_width=meter.padded, prefill_real_tokens=meter.real)
    logits_diff = first_logits_diff(variants, [w.prefix_ids for w in windows])
    rows = []
    for name, r in res.items():
        rows.append(dict(variant=name, cpu_median_s=statistics.median(r["cpu"]),
                         prefill_cpu_median_s=statistics.median(r["prefill_cpu"]),
                         wall_median_s=statistics.median(r["wall"]), **r))
    base = rows[1]["cpu_median_s"]
    identical = negatives["shared"] == negatives["unshared"]
    same = sum(a == b for x, y in zip(negatives["shared"], negatives["unshared"]) for a, b in zip(x, y))
    result = {"machine": machine_info(), "model": "tiny llama" if args.tiny else args.model, "row": args.row,
              "anchors": anchors, "k": args.k, "new_tokens": args.new_tokens, "reps": args.reps, "an": rows,
              "negatives_identical": identical, "identical_negatives": same, "first_logits_max_abs_diff": logits_diff,
              "negatives": len(windows) * args.k, "wall_s": time.time() - t0, "command": " ".join(sys.argv)}
    write_json(result, args.out)
    print(f"anchors {anchors}, K = {args.k}, {args.new_tokens} new tokens, one torch thread, median of {args.reps}")
    print(markdown_table(["variant", "CPU s", "prefill CPU s", "wall s", "prefill rows x width", "prefill real tokens",
                          "CPU vs unshared"],
                         [[r["variant"], r["cpu_median_s"], r["prefill_cpu_median_s"], r["wall_median_s"],
                           r["prefill_rows_x_width"], r["prefill_real_tokens"], base / r["cpu_median_s"]]
                          for r in rows]))
    print(f"negatives token-identical: {same} of {len(windows) * args.k}; first-step logits, max |diff|: "
          + ", ".join(f"{k} {v:.3g}" for k, v in logits_diff.items()))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
