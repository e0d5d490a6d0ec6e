"""Merge a LoRA adapter into its base model and save a plain transformers model folder.

Before any weight is loaded the adapter is checked against the base model by the same
loader inference and the server use (:mod:`lmforge.models.trained`), so a wrong ``base_model``
fails with a message that names the difference instead of a shape error deep inside peft.
The merge runs in float32 and is verified on a few tokens: the merged model's logits
must equal the adapter model's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import publish_into
from lmforge.errors import LmforgeError
from lmforge.models.adapters import check_adapter
from lmforge.models.trained import load_lora_model, load_tokenizer_for


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_diff: float  # merged vs. adapter-model logits on a probe sequence (fp32)
    resized_vocab: int | None


def _probe_logits(model: Any, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=generator)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@dataclass
class MergedModel:
    model: Any  # a plain transformers model in float32, adapter merged in
    tokenizer: Any
    max_abs_diff: float  # merged vs. adapter-model logits on a probe sequence (fp32)
    resized_vocab: int | None


def merge_lora_in_memory(base_model: str, lora_dir: str | os.PathLike[str], *, tolerance: float = 1e-3,
                         processor: Any = None) -> MergedModel:
    """Merge ``lora_dir`` into ``base_model`` in float32, in memory, checked like :func:`merge_lora`.

    `processor` (an image-text model's config, ``processor_type``): the image-text model is merged, and its
    processor (from the adapter folder when training saved one there) is saved with it in place of the tokenizer."""
    lora_dir = Path(lora_dir)
    check = check_adapter(base_model, lora_dir)
    tokenizer = load_tokenizer_for(base_model, lora_dir)
    model = load_lora_model(base_model, lora_dir, dtype=torch.float32, check=check, image_text=processor is not None)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise LmforgeError(
            f"the tokenizer has {len(tokenizer)} tokens but the merged model only {vocab} embeddings",
            where=str(lora_dir),
            fix="the adapter was saved without its grown embeddings; retrain with"
            " lora_modules_to_save: [embed_tokens, lm_head]",
        )
    before = _probe_logits(model, min(vocab, len(tokenizer)))
    inner = model.get_base_model()
    head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
    embed_weight = getattr(embed, "base_layer", embed).weight
    if head is not None and hasattr(embed, "base_layer") and head.weight is embed_weight:
        # LoRA on a tied embedding: the adapter model's lm_head still reads the
        # un-adapted matrix, but merging writes the delta into that shared tensor; give
        # the head its own copy so it keeps what the adapter model computed.
        head.weight = torch.nn.Parameter(embed_weight.detach().clone(), requires_grad=False)
    merged = model.merge_and_unload()
    after = _probe_logits(merged, min(vocab, len(tokenizer)))
    diff = (before - after).abs().max().item()
    if diff > tolerance:
        raise LmforgeError(
            f"merged model's logits differ from the adapter model's by {diff:.2e} (> {tolerance:g})",
            where=str(lora_dir),
            fix="this adapter type may not merge exactly; serve it unmerged with lora_model_dir",
        )

    config = merged.config
    head, embed = merged.get_output_embeddings(), merged.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None and head.weight is not embed.weight:
        # a separately trained lm_head (modules_to_save) broke the tie; saving it tied
        # would silently drop the trained head
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    if processor is not None:
        from lmforge.models.load import config_processor

        own = (lora_dir / "processor_config.json").is_file()
        tokenizer = config_processor(processor, tokenizer, source=str(lora_dir) if own else base_model)
    return MergedModel(model=merged, tokenizer=tokenizer, max_abs_diff=diff, resized_vocab=check.resize_to)


def merge_lora(
    base_model: str,
    lora_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    *,
    tolerance: float = 1e-3,
    processor: Any = None,
) -> MergeResult:
    """Merge ``lora_dir`` into ``base_model`` and write a safetensors model folder to ``out_dir``.

    ``dtype`` is the saved weight dtype (``None``: the base model's own dtype, else
    float32); the merge itself always runs in float32. Raises LmforgeError when the
    adapter does not fit the base model, or when the merged logits differ from the
    adapter model's by more than ``tolerance``.
    """
    lora_dir, out_dir = Path(lora_dir), Path(out_dir)
    if out_dir.resolve() == lora_dir.resolve():
        raise LmforgeError("the merged model would overwrite the adapter", where=str(out_dir),
                           fix="choose another output folder")
    result = merge_lora_in_memory(base_model, lora_dir, tolerance=tolerance, processor=processor)
    save_merged(result, out_dir, dtype)
    return MergeResult(out_dir=out_dir, max_abs_diff=result.max_abs_diff, resized_vocab=result.resized_vocab)


def save_merged(result: MergedModel, out_dir: str | os.PathLike[str], dtype: torch.dtype | str | None = None) -> Path:
    """Write a merged model as a safetensors folder (``dtype`` as in :func:`merge_lora`); casts it in place."""
    from lmforge.models.quantize import parse_dtype

    merged, config, out_dir = result.model, result.model.config, Path(out_dir)
    base_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    target = parse_dtype(dtype if dtype is not None else (base_dtype or torch.float32), where="dtype")
    merged = merged.to(target)
    config.dtype = target

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        result.tokenizer.save_pretrained(tmp)

    # each file renamed into place: a kill mid-save leaves no folder that looks complete but holds cut-off weights
    publish_into(out_dir, write)
    return out_dir
