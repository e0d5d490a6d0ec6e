"""The one checked way to load a model for use after training: inference, chat, web UI, server, merge, export.

Three sources, one path:
- ``base_model`` plus a LoRA adapter folder (``lora_model_dir``): the adapter is checked against
  the base before any weight is read (module paths, LoRA matrix shapes, vocabulary size, architecture:
  :func:`lmforge.models.adapters.check_adapter`), so a wrong base fails with one line naming the model the adapter was trained on
  instead of a page of state-dict size mismatches from inside peft;
- a merged model folder (what ``merge-lora`` writes) or any Hugging Face folder;
- a ``.gguf`` file (de-quantized once and cached by :mod:`lmforge.models.load`).

The tokenizer comes from the adapter folder when the run saved one there (it may have grown
tokens or gained a chat template), else from the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.models.adapters import AdapterCheck, check_adapter, load_adapter

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")


@dataclass
class LoadedModel:
    """A model ready to generate: weights (adapter applied), tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    source: str  # what was loaded, for messages and the server's model id
    adapter: str | None = None
    processor: Any = None  # an image-text model's processor (holding `tokenizer`)


def load_lora_model(
    base_model: str,
    lora_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    check: AdapterCheck | None = None,
    trust_remote_code: bool = False,
    image_text: bool = False,
) -> Any:
    """The base model with the adapter applied (checked before any weight is read; embeddings grown if needed)."""
    from lmforge.models.load import load_model

    check = check if check is not None else check_adapter(base_model, lora_dir)
    base = load_model(base_model, dtype=dtype, trust_remote_code=trust_remote_code, image_text=image_text)
    return load_adapter(base, lora_dir, trainable=False, check=check, base_model=base_model)


def load_tokenizer_for(
    model: str, lora_dir: str | os.PathLike[str] | None = None, tokenizer_config: str | None = None,
    trust_remote_code: bool = False, mistral_common: bool = False,
) -> Any:
    """The tokenizer to use with ``model`` (+ adapter): a run that added tokens or a chat template saved its
    tokenizer with the adapter, so that one wins; else ``tokenizer_config`` or the model's own. `mistral_common`
    (tokenizer_use_mistral_common) reads the Mistral tokenizer file (tekken.json), as training did."""
    from lmforge.models.load import load_tokenizer

    own = lora_dir is not None and any((Path(lora_dir) / name).is_file() for name in _TOKENIZER_FILES)
    try:
        if own:
            return load_tokenizer(str(lora_dir), trust_remote_code=trust_remote_code, mistral_common=mistral_common)
        return load_tokenizer(model, tokenizer_config, trust_remote_code, mistral_common=mistral_common)
    except (OSError, ValueError) as exc:
        source = str(lora_dir) if own else (tokenizer_config or model)
        raise LmforgeError(
            f"could not load the tokenizer: {str(exc).splitlines()[0]}", where=source,
            fix="save the tokenizer next to the model or adapter (tokenizer.save_pretrained(folder))",
        ) from exc


def load_for_generation(
    model: str,
    lora_model_dir: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer_config: str | None = None,
    trust_remote_code: bool = False,
    processor: Any = None,
    mistral_common: bool = False,
) -> LoadedModel:
    """A model in eval mode on ``device`` with its tokenizer: ``model`` (an HF folder, merged folder, .gguf,
    pkg:// file or Hub id), plus the LoRA adapter in ``lora_model_dir`` checked against it first.

    `processor` (an image-text model's config, ``processor_type``): load the image-text-to-text model and its
    processor, from the adapter folder when training saved one there, else from ``model``."""
    from lmforge.models.load import config_processor, fit_embeddings_to_tokenizer, load_model

    image_text = processor is not None
    if lora_model_dir:
        check = check_adapter(model, lora_model_dir)  # before any weight is read
        tokenizer = load_tokenizer_for(model, lora_model_dir, tokenizer_config, trust_remote_code, mistral_common)
        loaded = load_lora_model(model, lora_model_dir, dtype=dtype, check=check, trust_remote_code=trust_remote_code,
                                 image_text=image_text)
        source = f"{model} + {lora_model_dir}"
    else:
        tokenizer = load_tokenizer_for(model, None, tokenizer_config, trust_remote_code, mistral_common)
        loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, image_text=image_text)
        fit_embeddings_to_tokenizer(loaded, tokenizer)
        source = model
    vocab = loaded.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise LmforgeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} embeddings",
            where=str(lora_model_dir or model),
            fix="the adapter was saved without its grown embeddings; retrain with lora_modules_to_save: [embed_tokens, lm_head]",
        )
    if image_text:
        saved_with_adapter = lora_model_dir is not None and (Path(lora_model_dir) / "processor_config.json").is_file()
        processor = config_processor(processor, tokenizer, source=lora_model_dir if saved_with_adapter else model)
    loaded.to(device)
    loaded.eval()
    return LoadedModel(model=loaded, tokenizer=tokenizer, source=source, adapter=lora_model_dir, processor=processor)
