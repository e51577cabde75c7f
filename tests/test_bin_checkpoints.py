"""Checkpoints that ship only pickled ``.bin`` weights (OpenLLaMA-3B v2): read with
``torch.load(weights_only=True)``, converted once to safetensors in the seqcpo cache and reused; sharded
``.bin``; a pickle with a code payload refused before it runs; OpenLLaMA's SentencePiece tokenizer."""

import io
import json
import os

import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama, make_toy_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQCPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _bin_only(model, folder, tok=None, shards=1):
    """Save ``model`` as a .bin-only folder: one pytorch_model.bin, or ``shards`` files plus their index."""
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    state = model.state_dict()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return state
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        keys = names[i::shards]
        torch.save({k: state[k] for k in keys}, folder / part)
        weight_map.update({k: part for k in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_bin_folder_is_converted_once_and_reused(tmp_path, cache, monkeypatch):
    import seqcpo.models as models

    model = make_tiny_llama(seed=4)
    _bin_only(model, tmp_path / "llama")
    path = models.resolve_model_path(str(tmp_path / "llama"))
    assert path.startswith(str(cache / "models" / "bin-llama-"))
    assert sorted(f for f in os.listdir(path) if "safetensors" in f) == ["model.safetensors"]
    assert not [f for f in os.listdir(path) if f.endswith(".bin")]
    assert json.load(open(os.path.join(path, "seqcpo_converted.json")))["source"] == os.path.realpath(tmp_path / "llama")
    loaded = models.load_model(str(tmp_path / "llama"))
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p)

    def no_second_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models.pickled, "_convert_bin", no_second_conversion)
    assert models.resolve_model_path(str(tmp_path / "llama")) == path
    # a changed source file is another checkpoint: converted anew, not the stale copy
    monkeypatch.undo()
    monkeypatch.setenv("SEQCPO_CACHE", str(cache))
    other = make_tiny_llama(seed=5)
    torch.save(other.state_dict(), tmp_path / "llama" / "pytorch_model.bin")
    os.utime(tmp_path / "llama" / "pytorch_model.bin", ns=(1, 1))
    new_path = models.resolve_model_path(str(tmp_path / "llama"))
    assert new_path != path
    torch.testing.assert_close(models.load_model(new_path).lm_head.weight, other.lm_head.weight)


def test_sharded_bin_and_tied_weights(tmp_path, cache):
    from seqcpo.models import load_model, resolve_model_path

    llama = make_tiny_llama(seed=6)
    _bin_only(llama, tmp_path / "sharded", shards=3)
    path = resolve_model_path(str(tmp_path / "sharded"))
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == 3 and set(index["weight_map"]) == set(llama.state_dict())
    torch.testing.assert_close(load_model(str(tmp_path / "sharded")).lm_head.weight, llama.lm_head.weight)

    # GPT-2 ties lm_head to wte: the pickle holds one storage under two names, which safetensors refuses as is
    gpt2 = make_tiny_gpt2(seed=7)
    state = _bin_only(gpt2, tmp_path / "gpt2")
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    loaded = load_model(str(tmp_path / "gpt2"))
    torch.testing.assert_close(loaded.lm_head.weight, gpt2.transformer.wte.weight)
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, gpt2(input_ids=x).logits)


class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path, cache):
    from seqcpo.models import UnsafeCheckpointError, load_model

    folder = tmp_path / "evil"
    make_tiny_llama().save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    marker = tmp_path / "payload-ran"
    state = dict(make_tiny_llama().state_dict())
    state["model.embed_tokens.weight"] = _Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=rf"{folder / 'pytorch_model.bin'}: refused: torch.load\(weights_only=True\)"):
        load_model(str(folder))
    assert not marker.exists(), "the payload ran"
    assert not [f for f in os.listdir(cache / "models") if not f.endswith(".lock")]  # nothing half-converted left


def test_a_bin_only_model_trains_and_reuses_its_copy(tmp_path, cache, monkeypatch):
    import seqcpo.models as models
    from seqcpo.training.config import load_config
    from seqcpo.training.run import train

    tok = make_toy_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    _bin_only(model, tmp_path / "model", tok)
    words = "the river market bridge city wool salt square bread books fog".split()
    (tmp_path / "docs.txt").write_text(
        "".join(" ".join(words[(i * j + j) % len(words)] for j in range(12)) + ".\n\n" for i in range(16))
    )
    calls = []
    convert = models.pickled._convert_bin
    monkeypatch.setattr(models.pickled, "_convert_bin", lambda *a: (calls.append(a[0]), convert(*a)))

    def run(out):
        cfg = load_config(None, {
            "model_name_or_path": str(tmp_path / "model"), "dataset": str(tmp_path / "docs.txt"),
            "task": "continuation", "prefix_tokens": 6, "continuation_tokens": 6, "validation_size": 2,
            "test_size": 2, "objective": "cpo", "num_negatives": 2, "negatives": "tn:2", "max_steps": 2,
            "per_device_train_batch_size": 2, "learning_rate": 1e-2, "save_strategy": "no", "report_to": "none",
            "use_cpu": True, "disable_tqdm": True, "output_dir": str(tmp_path / out), "logging_steps": 1,
        })
        return train(cfg)

    out = run("first")
    assert out["steps"] == 2 and out["model_path"].startswith(str(cache / "models" / "bin-model-"))
    trained = out["trainer"].model.lm_head.weight.detach()
    assert not torch.allclose(trained, model.lm_head.weight)  # the step changed the weights
    assert len(calls) == 1
    run("second")
    assert len(calls) == 1, "the second run converted again"


def _tiny_sentencepiece(folder):
    import sentencepiece as spm

    text = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return  x  +  1",
            "Paris is the capital of France."] * 30
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=400, model_type="bpe", bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, byte_fallback=True, remove_extra_whitespaces=False, minloglevel=2,
    )
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    # the files OpenLLaMA ships: tokenizer.model and a config naming the (slow) LlamaTokenizer
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "model_max_length": 2048,
    }))
    (folder / "config.json").write_text("{}")
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_open_llama_gets_its_sentencepiece_tokenizer(tmp_path):
    pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    from seqcpo.models import load_tokenizer

    sp = _tiny_sentencepiece(tmp_path / "open_llama_tiny")
    text = "def f(x):\n    return  x  +  1"
    tok = load_tokenizer(str(tmp_path / "open_llama_tiny"))
    assert type(tok).__name__ == "SentencePieceLlamaTokenizer"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok(text)["input_ids"] == [1, *sp.encode(text)]  # BOS in front, as the slow LlamaTokenizer
    assert tok.pad_token == "</s>"
    # why the rule: the auto-converted fast tokenizer reads this text differently (it keeps the newline byte)
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "open_llama_tiny"))
    assert fast(text, add_special_tokens=False)["input_ids"] != sp.encode(text)
    # a folder saved from it (a trained checkpoint) reloads the same way, and plain transformers still reads it
    tok.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text("{}")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert type(again).__name__ == "SentencePieceLlamaTokenizer" and again(text)["input_ids"] == tok(text)["input_ids"]
    assert json.load(open(tmp_path / "saved" / "tokenizer_config.json"))["tokenizer_class"] == "LlamaTokenizer"
    AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    # other Llama models keep the fast tokenizer
    sp_other = tmp_path / "other_llama"
    _tiny_sentencepiece(sp_other)
    assert type(load_tokenizer(str(sp_other))).__name__ == "LlamaTokenizer"


def test_hub_repo_with_only_bin_weights_is_converted_from_its_snapshot(tmp_path, cache, monkeypatch):
    """OpenLLaMA-3B v2's layout, as the Hub cache holds it offline: snapshot files linked to content-named blobs."""
    pytest.importorskip("sentencepiece")
    import huggingface_hub.constants

    import seqcpo.models as models

    hub = tmp_path / "hub"
    repo = hub / "models--org--open_llama_tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    src = tmp_path / "src"
    model = make_tiny_llama(seed=8)
    _bin_only(model, src)
    _tiny_sentencepiece(src / "tok")
    (src / "tokenizer.model").write_bytes((src / "tok" / "tokenizer.model").read_bytes())
    (src / "tokenizer_config.json").write_text((src / "tok" / "tokenizer_config.json").read_text())
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ("config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json"):
        blob = repo / "blobs" / f"blob-{f.replace('.', '-')}"
        blob.write_bytes((src / f).read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models._hub_bin_snapshot.cache_clear()
    try:
        path = models.resolve_model_path("org/open_llama_tiny")
        assert path.startswith(str(cache / "models" / "bin-open_llama_tiny-"))
        assert json.load(open(os.path.join(path, "seqcpo_converted.json")))["source"] == f"org/open_llama_tiny@{commit}"
        torch.testing.assert_close(models.load_model("org/open_llama_tiny").lm_head.weight, model.lm_head.weight)
        assert type(models.load_tokenizer("org/open_llama_tiny")).__name__ == "SentencePieceLlamaTokenizer"
        # an id the cache does not hold passes through unchanged, for transformers to report
        assert models.resolve_model_path("org/not-cached") == "org/not-cached"
    finally:
        models._hub_bin_snapshot.cache_clear()
