"""The benchmark helpers whose numbers go into BENCHMARKS.md: the instruction-like mix, padding overhead, and the
KL that says whether bf16 negatives are the fp32 model's negatives."""

import copy
import sys
from pathlib import Path

import torch

from conftest import make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from an_bf16_cpu import next_token_kl  # noqa: E402
from harness import instruction_mix_batch, padding_overhead  # noqa: E402


def test_instruction_mix_lengths_and_padding_overhead():
    b = instruction_mix_batch(16, 4, vocab_size=96, eos=2, seed=0)
    assert all(10 <= len(p) <= 256 for p in b.prefix_ids)
    assert all(1 <= len(c[0]) <= 128 for c in b.candidate_ids)
    assert all(len(c) == 5 and c[1][-1] == 2 and c[3] == b.candidate_ids[(i + 1) % 16][0]
               for i, c in enumerate(b.candidate_ids))  # gold, 2 truncations ending in EOS, 2 batch negatives
    lengths = [len(p) + sum(map(len, c)) for p, c in zip(b.prefix_ids, b.candidate_ids)]
    assert padding_overhead(b, "packed") == 0.0
    assert abs(padding_overhead(b, "shared") - (16 * max(lengths) / sum(lengths) - 1)) < 1e-12


def test_next_token_kl_is_zero_for_the_same_model_and_positive_for_another():
    model = make_tiny_llama()
    prefixes, negs = [[5, 6, 7]], [[[8, 9, 10], [11]]]
    mean, worst, n = next_token_kl(model, model, prefixes, negs)
    assert n == 4 and abs(mean) < 1e-7 and abs(worst) < 1e-6
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    assert next_token_kl(model, other, prefixes, negs)[0] > 1e-4
