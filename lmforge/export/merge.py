"""Merge a LoRA adapter into its base model and save a plain transformers model folder.

Before any weight is loaded the adapter is checked against the base model (module paths,
LoRA matrix shapes, vocabulary size, architecture) so that a wrong ``base_model`` fails
with a message that names the difference instead of a shape error deep inside peft.
The merge runs in float32 and is verified on a few tokens: the merged model's logits
must equal the adapter model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class AdapterCheck:
    """What the adapter needs from the base model, found by :func:`check_adapter`."""

    adapter_vocab: int | None  # rows of the adapter's saved embeddings / lm_head, if any
    base_vocab: int
    resize_to: int | None  # grow the base embeddings to this before loading the adapter


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_diff: float  # merged vs. adapter-model logits on a probe sequence (fp32)
    resized_vocab: int | None


def read_adapter_config(lora_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; LmforgeError when it is not a LoRA adapter."""
    path = Path(lora_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LmforgeError(
            f"no {ADAPTER_CONFIG} in the adapter folder",
            where=f"lora_model_dir: {lora_dir}",
            fix="point at the output_dir of a LoRA/QLoRA run (the folder with adapter_model.safetensors)",
        )
    config = json.loads(path.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise LmforgeError(
            f"only LoRA adapters can be merged, this one is {config.get('peft_type')}", where=str(path)
        )
    return config


def _adapter_shapes(lora_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    path = lora_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        fix = "lmforge reads safetensors only; re-save the adapter with save_pretrained(safe_serialization=True)"
        if not (lora_dir / "adapter_model.bin").is_file():
            fix = "the training run did not finish saving; point at a complete adapter folder"
        raise LmforgeError(f"no {ADAPTER_WEIGHTS} in the adapter folder", where=str(lora_dir), fix=fix)
    with safe_open(str(path), framework="pt") as f:
        return {k.removeprefix(_PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _module_path(key: str) -> str:
    """Adapter key → the base module it belongs to."""
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B",
                   ".base_layer.", ".modules_to_save.", ".original_module."):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]  # a modules_to_save copy: "<module>.weight"


def check_adapter(base_model: str, lora_dir: str | os.PathLike[str]) -> AdapterCheck:
    """Refuse an adapter that does not fit ``base_model``, reading only configs and headers."""
    from transformers import AutoConfig

    from lmforge.models.inspect import _skeleton
    from lmforge.models.load import local_model_dir

    lora_dir = Path(lora_dir)
    adapter_config = read_adapter_config(lora_dir)
    shapes = _adapter_shapes(lora_dir)
    base_config = AutoConfig.from_pretrained(local_model_dir(base_model))
    fix_base = (
        f"set base_model to the model the adapter was trained on"
        f" (its adapter_config.json says '{adapter_config.get('base_model_name_or_path')}')"
    )

    # A run that saved the base config next to the adapter pins the architecture.
    saved = lora_dir / "config.json"
    if saved.is_file():
        trained = json.loads(saved.read_text())
        for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key in trained and trained[key] != getattr(base_config, key, None):
                raise LmforgeError(
                    f"the adapter was trained on a different architecture: {key} is {trained[key]}"
                    f" there but {getattr(base_config, key, None)} in the base model",
                    where=f"base_model: {base_model}",
                    fix=fix_base,
                )

    skeleton = _skeleton(base_config)
    modules = dict(skeleton.named_modules())
    leaves = {name.rsplit(".", 1)[-1] for name in modules}
    targets = adapter_config.get("target_modules")
    if isinstance(targets, list):  # a string is a regex; the path check below covers it
        missing = sorted(set(targets) - leaves)
        if missing:
            raise LmforgeError(
                f"target modules {', '.join(missing)} of the adapter do not exist in the base model",
                where=f"base_model: {base_model}",
                fix=fix_base,
            )

    embed_path = next(n for n, m in modules.items() if m is skeleton.get_input_embeddings())
    head = skeleton.get_output_embeddings()
    head_path = next((n for n, m in modules.items() if m is head), None)
    base_vocab = skeleton.get_input_embeddings().weight.shape[0]
    vocab_seen: dict[str, int] = {}

    order = {name: i for i, name in enumerate(modules)}
    # walk in model order so the first reported mismatch is the most telling (layer 0 q_proj)
    for key, shape in sorted(shapes.items(), key=lambda kv: order.get(_module_path(kv[0]), -1)):
        path = _module_path(key)
        if path not in modules:
            raise LmforgeError(
                f"the adapter has weights for '{path}', which the base model does not have"
                f" (the base has {getattr(base_config, 'num_hidden_layers', '?')} layers)",
                where=f"base_model: {base_model}",
                fix=fix_base,
            )
        module = modules[path]
        if path in (embed_path, head_path):
            if key.endswith("lora_embedding_A"):
                vocab_seen[key] = shape[1]
            elif path == head_path and ".lora_B." in key:
                vocab_seen[key] = shape[0]
            elif key.endswith((".weight",)) and ".lora_" not in key:
                vocab_seen[key] = shape[0]
            continue
        if isinstance(module, torch.nn.Linear):
            expected = None
            if ".lora_A." in key:
                expected, got = module.in_features, shape[1]
            elif ".lora_B." in key:
                expected, got = module.out_features, shape[0]
            if expected is not None and expected != got:
                raise LmforgeError(
                    f"'{path}' has {'input' if '.lora_A.' in key else 'output'} size {expected} in the base model"
                    f" but {got} in the adapter: the adapter was trained on a different model size",
                    where=f"base_model: {base_model}",
                    fix=fix_base,
                )

    if len(set(vocab_seen.values())) > 1:
        raise LmforgeError(
            f"the adapter's embedding shapes disagree: {vocab_seen}",
            where=str(lora_dir / ADAPTER_WEIGHTS),
            fix="the adapter file is inconsistent; re-save it from training",
        )
    adapter_vocab = next(iter(vocab_seen.values()), None)
    resize_to = None
    if adapter_vocab is not None and adapter_vocab != base_vocab:
        # Grown rows are only reproducible when the adapter saved every matrix that
        # holds them; otherwise resize_token_embeddings would invent fresh random rows.
        tied = bool(getattr(base_config, "tie_word_embeddings", False))
        def saved_full(path: str | None) -> bool:
            return any(k in shapes for k in (f"{path}.weight", f"{path}.base_layer.weight"))

        embed_full = saved_full(embed_path)
        head_full = tied or saved_full(head_path)
        if adapter_vocab < base_vocab or not (embed_full and head_full):
            raise LmforgeError(
                f"vocabulary size differs: the adapter's embeddings have {adapter_vocab} rows,"
                f" the base model has {base_vocab}",
                where=f"base_model: {base_model}",
                fix=fix_base
                + "; if tokens were added for training, train with lora_modules_to_save: [embed_tokens, lm_head]"
                " so the grown embeddings are saved with the adapter",
            )
        resize_to = adapter_vocab
    return AdapterCheck(adapter_vocab=adapter_vocab, base_vocab=base_vocab, resize_to=resize_to)


def load_lora_model(
    base_model: str,
    lora_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    check: AdapterCheck | None = None,
) -> Any:
    """The base model with the adapter applied (checked first; embeddings grown if needed)."""
    from peft import PeftModel

    from lmforge.models.load import load_model

    check = check if check is not None else check_adapter(base_model, lora_dir)
    base = load_model(base_model, dtype=dtype)
    if check.resize_to is not None:
        # the saved rows overwrite whatever resize puts there; skip the slow mean-resizing
        base.resize_token_embeddings(check.resize_to, mean_resizing=False)
    return PeftModel.from_pretrained(base, str(lora_dir), is_trainable=False)


def _probe_logits(model: Any, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=generator)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load_tokenizer_for(base_model: str, lora_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from lmforge.models.load import local_model_dir

    # a run that added tokens or a chat template saved its tokenizer with the adapter
    own = any((lora_dir / name).is_file() for name in _TOKENIZER_FILES)
    source = str(lora_dir) if own else local_model_dir(base_model)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise LmforgeError(
            f"could not load the tokenizer: {str(exc).splitlines()[0]}",
            where=source,
            fix="save the tokenizer next to the adapter (tokenizer.save_pretrained(lora_model_dir))",
        ) from exc


@dataclass
class MergedModel:
    model: Any  # a plain transformers model in float32, adapter merged in
    tokenizer: Any
    max_abs_diff: float  # merged vs. adapter-model logits on a probe sequence (fp32)
    resized_vocab: int | None


def merge_lora_in_memory(base_model: str, lora_dir: str | os.PathLike[str], *, tolerance: float = 1e-3) -> MergedModel:
    """Merge ``lora_dir`` into ``base_model`` in float32, in memory, checked like :func:`merge_lora`."""
    lora_dir = Path(lora_dir)
    check = check_adapter(base_model, lora_dir)
    tokenizer = _load_tokenizer_for(base_model, lora_dir)
    model = load_lora_model(base_model, lora_dir, dtype=torch.float32, check=check)
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
    return MergedModel(model=merged, tokenizer=tokenizer, max_abs_diff=diff, resized_vocab=check.resize_to)


def merge_lora(
    base_model: str,
    lora_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    *,
    tolerance: float = 1e-3,
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
    result = merge_lora_in_memory(base_model, lora_dir, tolerance=tolerance)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    result.tokenizer.save_pretrained(out_dir)
    return out_dir
