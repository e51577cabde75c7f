"""Memory and start-up of `seqcpo train --streaming true` do not grow with the corpus (issue 11, point 2).

    python benchmarks/streaming.py                      # 10k and 1M documents, in /tmp (not committed)
    python benchmarks/streaming.py --sizes 10000 100000 --workdir /tmp/x --out results.json

For each size it writes a JSONL corpus of generated documents (about 470 bytes each: 1M documents ~ 470 MB), a
tiny random-init Llama and a byte-level BPE tokenizer saved to a local folder (no Hub), then runs a 2-step
`seqcpo train --dataset FILE.jsonl --task continuation --streaming true` as a child process and records

- peak RSS: the child and all its descendants, polled every 50 ms with psutil;
- start-up: seconds from launch to the first optimizer step's log line (model load, split planning and the
  first batch's tokenization included);
- total: wall seconds of the run.

Targets (BENCHMARKS.md): peak RSS of the 1M run within 1.25x + 200 MiB of the 10k run's; start-up within
+90 s. ``--baseline`` also runs the in-memory path (streaming false) on the sizes up to 100k (the 1M in-memory run
took 18.4 GB, more than a shared machine should be asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time

WORDS = (
    "the of and in to was is for on as by with he at from his an were are which this also be has or had first one "
    "their its new after who they two her she been other when there all during into school time may years more most "
    "only over city some world would where later up such used many can state about national out known university "
    "united then made river village war season album team film county music series game church"
).split()


def write_corpus(path: str, n: int, seed: int = 0) -> None:
    """n JSON lines {"id", "text"}: 60-100 words of Wikipedia-like filler each (deterministic)."""
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(n):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 100)))
            f.write(json.dumps({"id": f"doc{i}", "text": body.capitalize() + "."}) + "\n")
    os.replace(tmp, path)


def write_tiny_model(folder: str) -> None:
    """A 2-layer Llama (hidden 64) and a BPE tokenizer trained on WORDS, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def run_train(corpus: str, model: str, out: str, streaming: bool) -> dict:
    """One 2-step run as a child process: peak RSS (with descendants), start-up and total seconds."""
    import psutil

    cmd = [sys.executable, "-m", "seqcpo.cli", "train", "--dataset", corpus, "--task", "continuation",
           "--streaming", "true" if streaming else "false", "--model_name_or_path", model,
           "--prefix_tokens", "32", "--continuation_tokens", "64", "--max_steps", "2",
           "--per_device_train_batch_size", "4", "--objective", "cpo", "--negatives", "tn:2,bn:2",
           "--logging_steps", "1", "--save_steps", "1000", "--report_to", "none", "--use_cpu", "true",
           "--disable_tqdm", "true", "--output_dir", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step: list[float] = []
    tail: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            tail.append(line)
            del tail[:-40]
            if not first_step and "'loss'" in line:
                first_step.append(time.time() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    reader.join(timeout=10)
    total = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (exit {proc.returncode}): {''.join(tail)}")
    return {"peak_rss_mib": round(peak / 2**20, 1), "startup_s": round(first_step[0], 1) if first_step else None,
            "total_s": round(total, 1)}


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--workdir", default="/tmp/seqcpo-streaming-bench")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    ap.add_argument("--baseline", action="store_true", help="also run streaming false on sizes up to 100k")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    model = os.path.join(args.workdir, "tiny-llama")
    if not os.path.exists(os.path.join(model, "config.json")):
        write_tiny_model(model)
    results = {"machine": machine(), "runs": []}
    for n in args.sizes:
        corpus = os.path.join(args.workdir, f"corpus_{n}.jsonl")
        if not os.path.exists(corpus):
            t = time.time()
            write_corpus(corpus, n)
            print(f"wrote {corpus} ({os.path.getsize(corpus) / 2**20:.0f} MiB) in {time.time() - t:.0f} s", flush=True)
        modes = [True] + ([False] if args.baseline and n <= 100_000 else [])
        for streaming in modes:
            r = run_train(corpus, model, os.path.join(args.workdir, f"run_{n}_{streaming}"), streaming)
            r.update(docs=n, corpus_mib=round(os.path.getsize(corpus) / 2**20, 1), streaming=streaming)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    stream = sorted((r for r in results["runs"] if r["streaming"]), key=lambda r: r["docs"])
    if len(stream) >= 2:
        small, large = stream[0], stream[-1]
        results["check"] = {
            "rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "rss_limit_mib": round(1.25 * small["peak_rss_mib"] + 200, 1),
            "rss_ok": large["peak_rss_mib"] <= 1.25 * small["peak_rss_mib"] + 200,
            "startup_delta_s": round(large["startup_s"] - small["startup_s"], 1),
            "startup_ok": large["startup_s"] - small["startup_s"] <= 90,
        }
        print(json.dumps(results["check"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
