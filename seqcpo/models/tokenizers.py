"""OpenLLaMA's advised tokenizer: its model card advises the slow SentencePiece tokenizer over the auto-converted fast
one, which tokenizes runs of whitespace differently (needs the ``sentencepiece`` package)."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from seqcpo.models.pickled import CONVERTED_FILE

SENTENCEPIECE_MARK = "seqcpo_tokenizer"  # key in tokenizer_config.json of a folder saved from one


def _sentencepiece_advised(name: str, path: str) -> bool:
    """True for OpenLLaMA, whose model card advises the slow SentencePiece tokenizer (use_fast=False)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "tokenizer.model")):
        return False
    # a Hub id, or a local folder's own name (not the folders above it)
    hints = [os.path.basename(os.path.normpath(n)) if os.path.isdir(os.path.expanduser(n)) else n for n in (name, path)]
    for meta, field in ((CONVERTED_FILE, "source"), ("config.json", "_name_or_path")):
        try:
            with open(os.path.join(path, meta), encoding="utf-8") as fh:
                hints.append(os.path.basename(str(json.load(fh).get(field, "")).split("@")[0].rstrip("/")))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as fh:
            if json.load(fh).get(SENTENCEPIECE_MARK) == "sentencepiece":
                return True
    except (OSError, ValueError, AttributeError):
        pass
    return any("open_llama" in h.lower() or "open-llama" in h.lower() for h in hints)


def _sentencepiece_tokenizer(path: str) -> Any:
    if importlib.util.find_spec("sentencepiece") is None:
        raise ImportError(
            f"{path}: OpenLLaMA's model card advises its SentencePiece tokenizer; install it: pip install "
            "sentencepiece==0.2.1"
        )
    return _sentencepiece_class().from_pretrained(path, special_tokens_pattern="bos")


_SP_CLASS = None


def _sentencepiece_class():
    """A Llama tokenizer read straight from ``tokenizer.model`` (transformers 5 has no slow LlamaTokenizer).

    Like the slow LlamaTokenizer of transformers 4: the SentencePiece model's own pieces, BOS in front with
    ``add_special_tokens=True``. Saved as ``LlamaTokenizer`` (plain transformers reloads it) with a mark that
    makes seqcpo reload it the same way.
    """
    global _SP_CLASS
    if _SP_CLASS is None:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        class SentencePieceLlamaTokenizer(SentencePieceBackend):
            def save_pretrained(self, save_directory, *args, **kwargs):
                out = super().save_pretrained(save_directory, *args, **kwargs)
                cfg_path = os.path.join(str(save_directory), "tokenizer_config.json")
                with open(cfg_path, encoding="utf-8") as fh:
                    cfg = json.load(fh)
                cfg.update(tokenizer_class="LlamaTokenizer", **{SENTENCEPIECE_MARK: "sentencepiece"})
                with open(cfg_path, "w", encoding="utf-8") as fh:
                    json.dump(cfg, fh, indent=2)
                return out

        _SP_CLASS = SentencePieceLlamaTokenizer
    return _SP_CLASS

