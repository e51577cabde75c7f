"""`seqcpo negatives` with AN: several training batches decoded together against one batch at a time.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/offline_an_grouping_cpu.py           # SmolLM2-135M, minutes
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/offline_an_grouping_cpu.py --tiny    # a tiny Llama: seconds

Shape: the resolving grid's CPO-ANR arm (``configs/smollm2_grid_resolved.yaml``): the embedded SmolLM2-135M and
Wikipedia leads, 32-token prefix, 64-token continuation, training batch 4, K = 4 AN negatives ranked by ROUGE-L
to the gold (``--k 1``: the DPO arm's one negative), fp32, one torch thread, on the first ``--examples`` (64) training windows. Variants, each a whole
:func:`seqcpo.training.run.make_negatives` into a fresh folder (model loading excluded: the model is loaded once),
after one untimed batch of each, interleaved rep by rep, median:

    per_batch   ``an_batch_size: 4``: one training batch (4 prefixes, 4 K rows) per AN call, as before grouping.
    grouped     ``an_batch_size: 32``: 8 batches (32 prefixes, 32 K rows) per AN call, each batch then scored
                alone (:func:`seqcpo.training.offline._chunk_scorer`).

Reported: process CPU seconds (the machine is shared: CPU time, not wall time, is the figure to compare), wall
seconds, and whether the two folders hold the same negatives (sampling over a 49k vocabulary can flip a token
under float rounding when the decoding's batch shape changes; the count of differing rows says how often).
Writes ``benchmarks/results/offline_an_grouping_cpu.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_info, markdown_table, write_json  # noqa: E402


def _config(model: str, dataset: str, out: str, examples: int, an_batch_size: int, tiny: bool, k: int = 4):
    from seqcpo.training.config import load_config

    shape = dict(prefix_tokens=6, continuation_tokens=8, an_max_new_tokens=8) if tiny else \
        dict(prefix_tokens=32, continuation_tokens=64)
    return load_config(None, dict(
        model_name_or_path=model, dataset=dataset, task="continuation", windows_per_document=1,
        max_examples=examples, validation_size=0, test_size=0, objective="cpo_ranked", negatives="an",
        an_rank_by="rouge", num_negatives=k, per_device_train_batch_size=4, an_batch_size=an_batch_size,
        output_dir=out, use_cpu=True, seed=0, report_to="none", disable_tqdm=True, **shape))


def _rows(folder: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    rows = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("shard-") and f.endswith(".parquet"):
            t = pq.read_table(os.path.join(folder, f), columns=["id", "negatives"]).to_pylist()
            rows.update({r["id"]: r["negatives"] for r in t})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on a toy corpus (smoke run)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--k", type=int, default=4, help="negatives per example (1: the DPO arm's shape)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "offline_an_grouping_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    import seqcpo.training.offline as offline
    from seqcpo.models import load_model, load_tokenizer

    tmp = tempfile.mkdtemp(prefix="an_grouping_")
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from conftest import make_tiny_llama, make_toy_tokenizer

        tok = make_toy_tokenizer()
        make_tiny_llama(vocab_size=len(tok)).save_pretrained(os.path.join(tmp, "tiny"))
        tok.save_pretrained(os.path.join(tmp, "tiny"))
        words = "the river market bridge city wool salt square bread books fog".split()
        with open(os.path.join(tmp, "docs.txt"), "w") as fh:
            fh.write("".join(" ".join(words[(i * j + j) % 11] for j in range(16)) + ".\n\n"
                             for i in range(args.examples + 4)))
        model_name, dataset = os.path.join(tmp, "tiny"), os.path.join(tmp, "docs.txt")
    else:
        model_name, dataset = "smollm2-135m", "wiki"
    model, tok = load_model(model_name), load_tokenizer(model_name)
    variants = {"per_batch": 4, "grouped": 32}
    seconds: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    folders: dict[str, str] = {}
    for name, an_bs in variants.items():  # untimed warm-up on one batch (first-call allocations, lazy imports)
        from seqcpo.data import load_splits

        cfg = _config(model_name, dataset, os.path.join(tmp, "run"), args.examples, an_bs, args.tiny, args.k)
        warm = load_splits(cfg.data_config(), tok).train[:4]
        offline.make_offline_negatives(cfg, warm, model, tok, os.path.join(tmp, f"warm-{name}"), progress=False)
    for rep in range(args.reps):
        for name, an_bs in variants.items():
            cfg = _config(model_name, dataset, os.path.join(tmp, "run"), args.examples, an_bs, args.tiny, args.k)
            from seqcpo.data import load_splits

            examples = load_splits(cfg.data_config(), tok).train
            folder = folders[name] = os.path.join(tmp, f"{name}-{rep}")
            c0, w0 = time.process_time(), time.perf_counter()
            offline.make_offline_negatives(cfg, examples, model, tok, folder, progress=False)
            seconds[name].append((time.process_time() - c0, time.perf_counter() - w0))
    a, b = _rows(folders["per_batch"]), _rows(folders["grouped"])
    differing = sum(a[i] != b.get(i) for i in a)
    cpu = {v: statistics.median(s[0] for s in seconds[v]) for v in variants}
    wall = {v: statistics.median(s[1] for s in seconds[v]) for v in variants}
    result = {
        "machine": machine_info(), "model": model_name, "examples": len(a), "k": args.k, "batch": 4,
        "prefix_tokens": 6 if args.tiny else 32, "new_tokens": 8 if args.tiny else 64, "reps": args.reps,
        "cpu_s": cpu, "wall_s": wall, "cpu_ratio_per_batch_over_grouped": cpu["per_batch"] / cpu["grouped"],
        "rows_with_other_negatives": differing,
    }
    if not args.tiny:
        write_json(result, args.out)
    print(markdown_table(["variant", "an_batch_size", "CPU s", "wall s"],
                         [[v, variants[v], f"{cpu[v]:.1f}", f"{wall[v]:.1f}"] for v in variants]))
    print(f"per_batch / grouped CPU time: {result['cpu_ratio_per_batch_over_grouped']:.2f}x; "
          f"rows with other negatives: {differing} of {len(a)}")


if __name__ == "__main__":
    main()
