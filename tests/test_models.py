"""Model loading: the embedded SmolLM2 default (converted once from GGUF), local folders, Hub ids, LoRA."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama, make_toy_tokenizer
from seqcpo.models import (
    EMBEDDED_MODELS,
    apply_lora,
    load_model,
    load_tokenizer,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def smollm_path(tmp_path_factory):
    """Convert the embedded model once per test run into a session-wide temporary SEQCPO_CACHE."""
    cache = tmp_path_factory.getbasetemp() / "seqcpo-cache"
    previous = os.environ.get("SEQCPO_CACHE")
    os.environ["SEQCPO_CACHE"] = str(cache)
    try:
        yield resolve_model_path("smollm2-135m")
    finally:
        if previous is None:
            os.environ.pop("SEQCPO_CACHE", None)
        else:
            os.environ["SEQCPO_CACHE"] = previous


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


# -- the embedded default (integration: 15-20 s conversion once per run)


@pytest.mark.integration
def test_embedded_default_is_dense_llama(smollm_path, smollm):
    model, tok = smollm
    assert smollm_path == os.path.join(os.environ["SEQCPO_CACHE"], "models", "smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    with open(os.path.join(smollm_path, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert tok.chat_template and tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    assert not [f for f in os.listdir(os.path.dirname(smollm_path)) if ".tmp-" in f]  # no half checkpoint


@pytest.mark.integration
def test_second_resolve_uses_cache(smollm_path):
    before = os.stat(smollm_path).st_mtime_ns
    start = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == smollm_path
    model = load_model("smollm2-135m")
    assert time.perf_counter() - start < 2.0 * 3  # under 2 s alone; slack for a shared 2-core machine
    assert os.stat(smollm_path).st_mtime_ns == before
    del model


@pytest.mark.integration
def test_embedded_default_generates(smollm):
    model, tok = smollm
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.integration
def test_cached_folder_reloads_without_seqcpo(smollm_path, smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(smollm_path)
    assert AutoTokenizer.from_pretrained(smollm_path).vocab_size == 49152
    ours = smollm[0]
    torch.testing.assert_close(plain.model.embed_tokens.weight, ours.model.embed_tokens.weight)


# -- local folders and Hub ids


def test_local_folder_roundtrip(tmp_path):
    model = make_tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    half = load_model(str(tmp_path / "tiny"), dtype="bfloat16", gradient_checkpointing=True)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert getattr(half, "is_activation_checkpointing", None) or half.is_gradient_checkpointing
    assert half.config.use_cache is False


def test_bin_only_folder_loads_through_a_safetensors_copy(tmp_path, monkeypatch):
    """More in tests/test_bin_checkpoints.py."""
    monkeypatch.setenv("SEQCPO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "old"
    model = make_tiny_gpt2()
    model.save_pretrained(folder)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    loaded = load_model(str(folder))
    torch.testing.assert_close(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert resolve_model_path(str(folder)).startswith(str(tmp_path / "cache" / "models" / "bin-old-"))


def test_missing_local_folder(tmp_path):
    missing = str(tmp_path / "runs" / "mle")
    with pytest.raises(FileNotFoundError, match=rf"^{missing}: no such model folder"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_tokenizer(str(tmp_path))


def test_hub_ids_pass_through(monkeypatch):
    assert resolve_model_path("gpt2-xl") == "gpt2-xl"
    assert resolve_model_path("openlm-research/open_llama_3b_v2") == "openlm-research/open_llama_3b_v2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from seqcpo.models.loading import load_model_config

    for load in (load_model, load_tokenizer, load_model_config):  # the run, its tokenizer, --dry-run's shape
        with pytest.raises(OSError, match=r"^could not load 'someone/not-a-model'.*Hub id") as e:
            load("someone/not-a-model")
        assert "\n" not in str(e.value)
    from types import SimpleNamespace

    from seqcpo.training.run import _load

    cfg = SimpleNamespace(model_name_or_path="someone/not-a-model", trust_remote_code=False, model_dtype="float32",
                          attn_implementation=None, gradient_checkpointing=False)
    with pytest.raises(OSError, match=r"^model_name_or_path: could not load 'someone/not-a-model'"):
        _load(cfg)  # `seqcpo train` names the setting that gave the name


def test_invalid_dtype():
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_model("whatever", dtype="fp8")


def test_tokenizer_pad_defaults_to_eos(tmp_path, caplog):
    tok = make_toy_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a tokenizer-only folder still counts as a model folder
    with caplog.at_level(logging.INFO, logger="seqcpo.models"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 2
    assert "no pad token" in caplog.text


def test_embedded_registry():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m"}
    assert EMBEDDED_MODELS["smollm2-135m"].gguf_file.endswith(".gguf")


# -- LoRA


@pytest.mark.parametrize("make,expected", [(make_tiny_llama, {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                           (make_tiny_gpt2, {"c_attn", "c_proj"})])
def test_apply_lora_trains_only_adapters(make, expected):
    model = apply_lora(make(), r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == expected
    out = model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_apply_lora_explicit_and_unknown_targets():
    model = apply_lora(make_tiny_llama(), target_modules="q_proj, v_proj")
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="query not found in LlamaForCausalLM"):
        apply_lora(make_tiny_llama(), target_modules=["query"])


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("SEQCPO_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path("smollm2-135m")
    assert os.listdir(tmp_path / "models") == ["smollm2-135m.lock"]  # no checkpoint, no temp folder


def test_lora_checkpoint_folder_loads(tmp_path):
    make_tiny_llama(seed=1).save_pretrained(tmp_path / "base")
    model = apply_lora(load_model(str(tmp_path / "base")), r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.fill_(0.01)  # LoRA B starts at zero: make the adapter change the output
    model.eval()
    model.save_pretrained(tmp_path / "adapter")  # adapter_config.json + adapter_model.safetensors, no config.json
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = model(input_ids=x).logits
        loaded = load_model(str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(loaded(input_ids=x).logits, expected)


def test_model_digest_is_the_content_hashed_once_and_cached(tmp_path, monkeypatch):
    """A model's identity is its weights' content: one same-size change anywhere is another model, a copy or a
    touch is the same one, and each file is hashed once until it changes."""
    import seqcpo.models.digest as digest

    monkeypatch.setenv("SEQCPO_CACHE", str(tmp_path / "cache"))
    make_tiny_llama(seed=1).save_pretrained(tmp_path / "m")
    reads = []
    real = digest.sha256_file
    monkeypatch.setattr(digest, "sha256_file", lambda p: (reads.append(os.path.basename(p)), real(p))[1])
    first = digest.model_digest(str(tmp_path / "m"))
    assert len(first) == 32 and sorted(reads) == ["config.json", "generation_config.json", "model.safetensors"]
    digest._MEMO.clear()  # a new process: the on-disk cache answers
    reads.clear()
    assert digest.model_digest(str(tmp_path / "m")) == first and reads == []
    os.utime(tmp_path / "m" / "model.safetensors", ns=(5, 5))  # touched, not changed: re-read, same digest
    assert digest.model_digest(str(tmp_path / "m")) == first and reads == ["model.safetensors"]
    path = tmp_path / "m" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(5, 5))  # even with the modification time put back
    assert digest.model_digest(str(tmp_path / "m")) != first
    assert digest.model_digest("gpt2-xl") is None  # a Hub id: the Hub pins its revision
