"""The evaluation pieces on the real embedded SmolLM2-135M (chat template, real tokenizer). Slower."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seqcpo.evaluation.checkpoints import load_checkpoint
from seqcpo.evaluation.generate import generate_continuations, parse_decoding
from seqcpo.evaluation.judges import LocalJudge
from seqcpo.types import Example

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_checkpoint(MODEL)
    finally:
        torch.set_num_threads(previous)


def test_local_judge_on_smollm2(smollm):
    judge = LocalJudge(MODEL, model_and_tokenizer=smollm)
    assert judge.use_chat_template
    ids = judge.render_ids("Q", "x", "y")
    assert judge.tokenizer.decode(ids).rstrip().endswith("assistant")  # answer slot = first assistant token
    prompt, good, bad = "What is the capital of France?", "The capital of France is Paris.", "Bananas purple the of."
    v1, v2 = judge.judge(prompt, good, bad), judge.judge(prompt, good, bad)
    assert v1.winner in ("A", "B", "tie") and (v1.winner, v1.raw) == (v2.winner, v2.raw)
    mass = sum(math.exp(x) for x in json.loads(v1.raw)["logp"].values())
    assert mass > 0.05, "the prompt should make a letter a likely first answer token"


def test_batched_generation_matches_single_on_smollm2(smollm, tmp_path):
    """Greedy and sampled rows (each sampled row from its own seed) do not depend on the batch."""
    model, tok = smollm
    texts = ["Paris is the capital of", "The Amazon river flows through several countries in South", "Water"]
    examples = [Example(tok(t)["input_ids"], tok(" x")["input_ids"], {"id": str(i)}) for i, t in enumerate(texts)]
    cfg = [parse_decoding("greedy", max_new_tokens=6), parse_decoding("sample:t=1.0,p=0.95", max_new_tokens=6)]
    batched = generate_continuations(MODEL, examples, cfg, tmp_path / "b.jsonl", batch_size=3, progress=False,
                                     model_and_tokenizer=smollm)
    single = generate_continuations(MODEL, examples, cfg, tmp_path / "s.jsonl", batch_size=1, progress=False,
                                    model_and_tokenizer=smollm)
    assert [r["generation"] for r in batched] == [r["generation"] for r in single]
    assert all(r["generation"].strip() for r in batched)
