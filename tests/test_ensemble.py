"""Weight-space ensembles: exact endpoints, the mean at 0.5, A's dtype and sharding, clear mismatch errors,
and folders that plain transformers reloads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_gpt2, make_tiny_llama, make_toy_tokenizer
from seqcpo.ensemble import EnsembleError, interpolate_checkpoints


def _save(model, path, tok=None, **kw):
    model.save_pretrained(path, **kw)
    if tok is not None:
        tok.save_pretrained(path)
    return str(path)


def _weights(path):
    import glob

    out = {}
    for f in sorted(glob.glob(f"{path}/*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    tok = make_toy_tokenizer()
    a = _save(make_tiny_llama(seed=0, vocab_size=len(tok)), root / "a", tok)
    b = _save(make_tiny_llama(seed=1, vocab_size=len(tok)), root / "b", tok)
    return a, b, root


def test_endpoints_are_bitwise_and_half_is_the_mean(pair, tmp_path):
    a, b, _ = pair
    paths = interpolate_checkpoints(a, b, [0, 0.5, 1], tmp_path / "ens")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["alpha-0", "alpha-0.5", "alpha-1"]
    wa, wb = _weights(a), _weights(b)
    w0, wh, w1 = (_weights(p) for p in paths)
    assert set(w0) == set(wa) == set(wh) == set(w1)
    for k in wa:
        assert torch.equal(w0[k], wa[k]), k
        assert torch.equal(w1[k], wb[k]), k
        torch.testing.assert_close(wh[k], (wa[k] + wb[k]) / 2, rtol=0, atol=1e-7)
    meta = json.loads(open(f"{paths[1]}/seqcpo_ensemble.json").read())
    assert meta["alpha"] == 0.5 and meta["from"].endswith("/a") and meta["to"].endswith("/b")
    assert "alpha = 0.5" in open(f"{paths[1]}/README.md").read()
    assert not any(p.name.startswith(".") for p in (tmp_path / "ens").iterdir()), "temporary folders left behind"


def test_result_reloads_with_plain_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b, _ = pair
    (path,) = interpolate_checkpoints(a, b, [0.25], tmp_path / "ens")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, 0.75 * sa[k] + 0.25 * sb[k], rtol=0, atol=1e-6)
    ids = torch.tensor([tok("The river")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_saved_in_a_dtype_and_sharding(tmp_path):
    a = make_tiny_llama(seed=0).to(torch.bfloat16)
    b = make_tiny_llama(seed=1)  # float32: B's dtype does not matter
    pa = _save(a, tmp_path / "a", max_shard_size="20KB")
    pb = _save(b, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    (p0, ph) = interpolate_checkpoints(pa, pb, [0, 0.5], tmp_path / "ens")
    assert (tmp_path / "ens" / "alpha-0.5" / "model.safetensors.index.json").exists()
    wa, wb, w0, wh = _weights(pa), _weights(pb), _weights(p0), _weights(ph)
    for k in wa:
        assert wh[k].dtype == torch.bfloat16
        assert torch.equal(w0[k], wa[k])
        expected = (0.5 * wa[k].float() + 0.5 * wb[k].float()).to(torch.bfloat16)
        assert torch.equal(wh[k], expected), k
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(ph).dtype == torch.bfloat16


def test_rerun_replaces_an_existing_alpha_folder(pair, tmp_path):
    a, b, _ = pair
    interpolate_checkpoints(a, b, [0.5], tmp_path / "ens")
    (tmp_path / "ens" / "alpha-0.5" / "stale.txt").write_text("x")
    interpolate_checkpoints(a, b, [0.5], tmp_path / "ens")
    assert not (tmp_path / "ens" / "alpha-0.5" / "stale.txt").exists()


def test_architecture_mismatches_say_what_differs(pair, tmp_path):
    a, _, _ = pair
    gpt2 = _save(make_tiny_gpt2(), tmp_path / "gpt2")
    with pytest.raises(EnsembleError, match="model_type differs.*'llama'.*'gpt2'"):
        interpolate_checkpoints(a, gpt2, [0.5], tmp_path / "out")

    from transformers import LlamaConfig, LlamaForCausalLM

    base = make_tiny_llama().config.to_dict()
    wider = LlamaForCausalLM(LlamaConfig(**{**base, "vocab_size": 300, "intermediate_size": 48}))
    p_wider = _save(wider, tmp_path / "wider")
    shapes = r"shapes differ for 6 tensors, first .*mlp.down_proj.weight: \[32, 64\] in .* vs \[32, 48\]"
    with pytest.raises(EnsembleError, match=shapes):
        interpolate_checkpoints(a, p_wider, [0.5], tmp_path / "out")

    tied = LlamaForCausalLM(LlamaConfig(**{**base, "vocab_size": 300, "tie_word_embeddings": True}))
    p_tied = _save(tied, tmp_path / "tied")
    with pytest.raises(EnsembleError, match=r"parameter names differ: 1 only in .*lm_head.weight"):
        interpolate_checkpoints(a, p_tied, [0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_inputs(pair, tmp_path):
    a, b, _ = pair
    with pytest.raises(EnsembleError, match="no such folder"):
        interpolate_checkpoints(a, tmp_path / "missing", [0.5], tmp_path / "out")
    with pytest.raises(EnsembleError, match="distinct"):
        interpolate_checkpoints(a, b, [0.5, 0.5], tmp_path / "out")
    with pytest.raises(EnsembleError, match="safetensors"):
        (tmp_path / "nobin").mkdir()
        (tmp_path / "nobin" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        interpolate_checkpoints(a, tmp_path / "nobin", [0.5], tmp_path / "out")


def test_an_alpha_that_overflows_the_weights_is_refused_and_leaves_nothing(pair, tmp_path):
    """Defect (campaign 3): `--alphas 1e300` wrote a checkpoint of infinite weights without a word."""
    a, b, _ = pair
    with pytest.raises(EnsembleError, match=r"alpha 1e\+300 takes the weights past what float32 holds"):
        interpolate_checkpoints(a, b, [1e300], tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # no alpha folder, no temp folder
    interpolate_checkpoints(a, b, [-0.5, 1.5], tmp_path / "out")  # extrapolation within range still works


def test_cli_ensemble(pair, tmp_path, capsys):
    from seqcpo.cli import main

    a, b, _ = pair
    assert main(["ensemble", "--from", a, "--to", b, "--alphas", "0,1", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "alpha=0\t" in out and "alpha-1" in out
