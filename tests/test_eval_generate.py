"""Generation (specs, left padding, resumability) and the local judge on tiny saved checkpoints."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import make_tiny_gpt2, make_tiny_llama, make_toy_tokenizer
from seqcpo.evaluation.generate import (
    DecodingConfig,
    generate_continuations,
    parse_decoding,
    read_generations,
)
from seqcpo.evaluation.judges import LocalJudge, load_judge_prompt
from seqcpo.types import Example

# tiny models run faster on one thread, and much faster on a CPU shared with other jobs
pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEXTS = [
    "The quick brown fox jumps",
    "Paris is the capital",
    "Machine learning models are trained on data to",
    "Wikipedia",
    "Instruction: summarise the text.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama + the toy tokenizer saved like a training checkpoint."""
    path = tmp_path_factory.mktemp("ckpt")
    tok = make_toy_tokenizer()
    make_tiny_llama(0, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def examples():
    tok = make_toy_tokenizer()
    return [Example(tok(t)["input_ids"], tok(" and more.")["input_ids"],
                    {"id": f"ex{i}", "prompt": t, "reference": " and more.", "category": "cat" if i % 2 else None})
            for i, t in enumerate(TEXTS)]


def test_parse_decoding_specs():
    g = parse_decoding("greedy", max_new_tokens=12)
    assert (g.name, g.strategy, g.max_new_tokens) == ("greedy", "greedy", 12)
    s = parse_decoding("sample:t=0.7,p=0.9")
    assert (s.strategy, s.temperature, s.top_p, s.top_k) == ("sample", 0.7, 0.9, 0)
    assert parse_decoding("beam:n=4").num_beams == 4 and parse_decoding("beam").num_beams == 4
    k = parse_decoding("topk:k=50,s=3,m=20")
    assert (k.strategy, k.top_k, k.seed, k.max_new_tokens, k.name) == ("sample", 50, 3, 20, "topk:k=50,s=3,m=20")
    assert parse_decoding("topp:p=0.8").top_p == 0.8
    assert s.generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9}
    for bad in ["nucleus", "topk", "sample:t=0", "beam:n=1", "sample:q=1", "greedy:t", "magic", "sample:p=1.5"]:
        with pytest.raises(ValueError):
            parse_decoding(bad)
    with pytest.raises(ValueError):
        DecodingConfig(strategy="contrastive")


def test_generation_left_padding_and_resume(checkpoint, examples, tmp_path):
    configs = [parse_decoding("greedy", max_new_tokens=6), parse_decoding("sample:t=0.7,p=0.9", max_new_tokens=6)]
    out = tmp_path / "gen.jsonl"
    rows = generate_continuations(checkpoint, examples, configs, out, batch_size=2, model_label="tiny", progress=False)
    assert len(rows) == 10
    assert {(r["id"], r["decoding"]) for r in rows} == {(f"ex{i}", c.name) for i in range(5) for c in configs}
    for r in rows:
        assert set(r) >= {"id", "model", "decoding", "prompt", "reference", "generation", "category"}
        assert r["model"] == "tiny" and 0 <= r["num_tokens"] <= 6
    assert rows[1]["category"] == "cat" and rows[0]["category"] is None

    # batched greedy (left-padded, mixed prefix lengths) == one example at a time
    single = generate_continuations(checkpoint, examples, configs[:1], tmp_path / "single.jsonl", batch_size=1,
                                    model_label="tiny", progress=False)
    assert [r["generation"] for r in single] == [r["generation"] for r in rows[:5]]

    # crash simulation: drop the last two rows and leave half of the one before them
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 10
    torn = b"".join(lines[:7]) + lines[7][: len(lines[7]) // 2]
    out.write_bytes(torn)
    assert len(read_generations(out)) == 7  # the torn line is skipped
    rows2 = generate_continuations(checkpoint, examples, configs, out, batch_size=2, model_label="tiny", progress=False)
    file_rows = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["id"], r["model"], r["decoding"]) for r in file_rows]
    assert len(keys) == len(set(keys)) == 10, "no duplicates, every row present"
    assert [r["generation"] for r in rows2 if r["decoding"] == "greedy"] == [r["generation"] for r in rows[:5]]

    # nothing left to do: the checkpoint is not even loaded (its files are only read for their identity)
    import seqcpo.evaluation.generate as G

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when every row is present")

    real_load, G.load_checkpoint = G.load_checkpoint, no_load
    try:
        rows3 = generate_continuations(checkpoint, examples, configs, out, model_label="tiny", progress=False)
    finally:
        G.load_checkpoint = real_load
    assert rows3 == rows2

    # same decoding name, other settings: refused rather than silently mixed
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_continuations(checkpoint, examples, [parse_decoding("greedy", max_new_tokens=9)], out,
                               model_label="tiny", progress=False)


def test_generation_with_gpt2_and_beam(tmp_path, examples):
    path = tmp_path / "gpt2"
    tok = make_toy_tokenizer()
    make_tiny_gpt2(0, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    rows = generate_continuations(str(path), examples[:3], [parse_decoding("beam:n=2", max_new_tokens=4)],
                                  tmp_path / "g.jsonl", batch_size=3, progress=False)
    assert len(rows) == 3 and all(r["model"] == str(path) for r in rows)


def test_local_judge_is_deterministic(checkpoint):
    judge = LocalJudge(checkpoint)
    v1 = judge.judge("The quick brown fox", "jumps over the lazy dog.", "is a free online encyclopedia.")
    v2 = LocalJudge(checkpoint).judge("The quick brown fox", "jumps over the lazy dog.", "is a free online encyclopedia.")
    assert v1.winner in ("A", "B", "tie") and not v1.failed
    assert (v1.winner, v1.raw) == (v2.winner, v2.raw)
    scores = json.loads(v1.raw)["logp"]
    assert set(scores) == {"A", "B", "tie"} and v1.winner == max(scores, key=scores.get)
    desc = judge.describe()
    assert desc["backend"] == "local" and desc["answer_tokens"]["A"] == [35]  # the toy tokenizer's "A"
    assert desc["prompt_sha256"] == load_judge_prompt()[1]


def test_judge_prompt_file(tmp_path):
    good = tmp_path / "judge.txt"
    good.write_text("Q: {prompt}\n1: {a}\n2: {b}\nAnswer:")
    text, digest = load_judge_prompt(good)
    assert digest == hashlib.sha256(good.read_bytes()).hexdigest()
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: {prompt} {a}")
    with pytest.raises(ValueError, match="{b}"):
        load_judge_prompt(bad)


def test_eos_ids_include_the_models_end_of_turn_tokens():
    tok = make_toy_tokenizer()
    model = make_tiny_llama(0, vocab_size=len(tok))
    model.generation_config.eos_token_id = [2, 7]
    from seqcpo.evaluation.generate import eos_ids_of, left_pad

    assert eos_ids_of(model, tok) == [2, 7]
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_local_judge_batched_equals_one_at_a_time(checkpoint):
    """Left-padded batches of prompts of different lengths give the single-prompt log-probs."""
    triples = [
        ("The quick brown fox", "jumps over the lazy dog.", "is a free online encyclopedia."),
        ("Paris", "is the capital of France and its largest city.", "fox"),
        ("Machine learning models are trained on data", "to make predictions.", "Wikipedia is written by volunteers."),
    ]
    single = [LocalJudge(checkpoint, batch_size=1).judge(*t) for t in triples]
    batched = LocalJudge(checkpoint, batch_size=8).judge_many(triples, progress=False)
    for s, b in zip(single, batched):
        assert s.winner == b.winner
        ls, lb = json.loads(s.raw)["logp"], json.loads(b.raw)["logp"]
        for k in ls:
            assert abs(ls[k] - lb[k]) < 1e-4, (k, ls, lb)


def test_sampling_with_one_token_left_is_greedy(checkpoint, examples, tmp_path):
    """top-k = 1, or a top-p mass only the most likely token reaches, leaves one token: sampling is then greedy,
    row by row (the per-row sampler filters like transformers' warpers)."""
    greedy = generate_continuations(checkpoint, examples, [parse_decoding("greedy", max_new_tokens=6)],
                                    tmp_path / "g.jsonl", batch_size=2, model_label="tiny", progress=False)
    for spec in ("topk:k=1,t=1.5", "topp:p=0.000001"):
        rows = generate_continuations(checkpoint, examples, [parse_decoding(spec, max_new_tokens=6)],
                                      tmp_path / "s.jsonl", batch_size=2, model_label="tiny", progress=False)
        assert [r["generation"] for r in rows] == [r["generation"] for r in greedy], spec
