"""AN on vLLM (seqcpo.negatives.vllm_backend), against a stand-in for vLLM's offline interface.

vLLM needs CUDA and its own torch build, so it is not installed here. The stand-in implements the part of the
interface we call (``LLM(**engine)``, ``LLM.generate(prompts, params)``, ``SamplingParams``, ``TokensPrompt``)
by really sampling from the tiny model the engine was pointed at, seeded by each request's seed, so the tests
check what we send (prompts, n, temperatures, top-k, max tokens, stop rule, seeds) and what we make of the
answers (K continuations per prefix, EOS kept or restored, columns in order).
"""

import importlib.machinery
import sys
import types

import pytest
import torch

from conftest import TINY_EOS, make_tiny_llama
from seqcpo.negatives import build_negative_generator
from seqcpo.negatives.vllm_backend import vllm_available
from seqcpo.types import Example


class _Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _LLM:
    instances: list["_LLM"] = []
    drop_stop_token = False

    def __init__(self, **kw):
        from transformers import AutoModelForCausalLM

        self.kw = kw
        self.model = AutoModelForCausalLM.from_pretrained(kw["model"]).eval()
        self.requests = []
        _LLM.instances.append(self)

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for prompt, p in zip(prompts, params):
            self.requests.append((prompt, p))
            g = torch.Generator().manual_seed(p.seed)
            seqs = []
            for _ in range(p.n):
                ids, reason = list(prompt["prompt_token_ids"]), "length"
                new = []
                for _ in range(p.max_tokens):
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
                    if p.top_k > 0:
                        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
                    tok = int(torch.multinomial(torch.softmax(logits / p.temperature, -1), 1, generator=g))
                    ids.append(tok)
                    new.append(tok)
                    if tok in p.stop_token_ids:
                        reason = "stop"
                        if _LLM.drop_stop_token:
                            new.pop()
                        break
                seqs.append(types.SimpleNamespace(token_ids=tuple(new), finish_reason=reason))
            outs.append(types.SimpleNamespace(outputs=seqs))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM, mod.SamplingParams = _LLM, _Params
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    _LLM.instances.clear()
    _LLM.drop_stop_token = False
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_llama().save_pretrained(path)
    return str(path)


def _examples():
    return [Example(prefix_ids=[5, 6, 7], continuation_ids=[8, 9, 10, 11]), Example(prefix_ids=[12], continuation_ids=[13, 14])]


def test_vllm_backend_sends_the_decoding_settings_and_returns_k_continuations(fake_vllm, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    gen = build_negative_generator("an", 3, model=model, eos_token_id=TINY_EOS, pad_token_id=0,
                                   options={"an_backend": "vllm", "an_max_new_tokens": 5, "an_top_k": 20})
    neg = gen(_examples(), 3, torch.Generator().manual_seed(1))
    (llm,) = _LLM.instances
    assert llm.kw["model"] == tiny_dir and llm.kw["skip_tokenizer_init"] and llm.kw["gpu_memory_utilization"] == 0.3
    assert llm.kw["trust_remote_code"] is False
    assert [r[0]["prompt_token_ids"] for r in llm.requests] == [[5, 6, 7], [12]]
    for _, p in llm.requests:
        assert (p.n, p.max_tokens, p.top_k, p.temperature) == (3, 5, 20, 1.0)
        assert p.ignore_eos and p.stop_token_ids == [TINY_EOS]
    assert [len(row) for row in neg.ids] == [3, 3] and neg.sources == [["an"] * 3] * 2
    for row in neg.ids:
        for seq in row:
            assert 1 <= len(seq) <= 5 and (len(seq) == 5 or seq[-1] == TINY_EOS)
    # the request seeds come from the step's generator: the same seed asks for the same negatives
    again = gen(_examples(), 3, torch.Generator().manual_seed(1))
    other = gen(_examples(), 3, torch.Generator().manual_seed(2))
    assert again.ids == neg.ids and other.ids != neg.ids
    assert len(_LLM.instances) == 1, "the engine is created once"


def test_vllm_backend_one_request_per_temperature_column_and_eos_restored(fake_vllm, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    gen = build_negative_generator(
        "an", 2, model=model, eos_token_id=TINY_EOS, pad_token_id=0,
        options={"an_backend": "vllm", "an_max_new_tokens": 40, "an_temperatures": [0.5, 2.0], "an_rank_by": "temperature"},
    )
    _LLM.drop_stop_token = True  # an engine that leaves the stop token out of token_ids
    neg = gen(_examples(), 2, torch.Generator().manual_seed(0), ranked=True)
    (llm,) = _LLM.instances
    assert [(p.n, p.temperature) for _, p in llm.requests] == [(1, 0.5), (1, 2.0)] * 2
    assert neg.scores == [[-0.5, -2.0]] * 2
    stopped = [s for row in neg.ids for s in row if len(s) < 40]
    assert stopped and all(s[-1] == TINY_EOS for s in stopped)


def test_vllm_backend_choice_and_refusals(fake_vllm, tiny_dir, monkeypatch, tmp_path):
    from seqcpo.training.config import ConfigError, load_config

    base = dict(model_name_or_path=tiny_dir, dataset="wiki", output_dir=str(tmp_path), negatives="an:2", num_negatives=2,
                report_to="none", use_cpu=True)
    cfg = load_config(None, base)
    assert cfg.an_backend == "auto" and cfg.resolved_an_backend() == "shared_prefill"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.resolved_an_backend(offline=True) == "vllm"  # `seqcpo negatives` on a GPU with vllm installed
    assert cfg.resolved_an_backend(offline=False) == "shared_prefill"  # training opts in explicitly
    assert cfg.negative_options(offline=True)["an_vllm_gpu_memory_utilization"] == 0.3
    with pytest.raises(ConfigError, match="cannot follow the policy"):
        load_config(None, {**base, "an_backend": "vllm", "negatives_model": "policy"})


def test_vllm_backend_without_vllm_says_how_to_get_it():
    if vllm_available():
        pytest.skip("vllm is installed here")
    from seqcpo.negatives.vllm_backend import VLLMDecoder

    with pytest.raises(ValueError, match="pip install vllm"):
        VLLMDecoder("some/model")
