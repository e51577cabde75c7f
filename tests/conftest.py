"""Shared fixtures: tiny random-init models built from configs and a small trained tokenizer.

Nothing here touches the network. The tiny models are fp32 and deterministic under a seed.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 96
TINY_EOS = 2
TINY_PAD = 0


def make_tiny_llama(seed: int = 0, vocab_size: int = TINY_VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=TINY_EOS,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    return model


def make_tiny_gpt2(seed: int = 0, vocab_size: int = TINY_VOCAB):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=TINY_EOS,
        pad_token_id=TINY_PAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).float().eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_tiny_llama() if request.param == "llama" else make_tiny_gpt2()


_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Wikipedia is a free online encyclopedia written by volunteers.",
    "Instruction: summarise the text. Response: a short summary.",
    "Paris is the capital of France and its largest city.",
    "Machine learning models are trained on data to make predictions.",
] * 4


def make_toy_tokenizer():
    """A byte-level BPE tokenizer trained in memory (vocab about 300) with eos/pad/bos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_llama(folder, seed: int = 0):
    """A tiny random Llama and the toy tokenizer saved together into ``folder`` (a model folder that
    ``seqcpo train`` and ``seqcpo negatives`` load by path); returns the folder as a string."""
    tok = make_toy_tokenizer()
    make_tiny_llama(seed=seed, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def toy_tokenizer():
    return make_toy_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny-model tests (thread overhead dominates their work)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def free_port() -> str:
    """A loopback port no process holds right now, for a test's process group (fixed ports collide when two test
    runs share a machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])

