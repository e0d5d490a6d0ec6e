"""The one checked way to load a model for use after training: inference, chat, web UI, server, merge, export.

Three sources, one path:
- ``base_model`` plus a LoRA adapter folder (``lora_model_dir``): the adapter is checked against
  the base before any weight is read (module paths, LoRA matrix shapes, vocabulary size,
  architecture), so a wrong base fails with one line naming the model the adapter was trained on
  instead of a page of state-dict size mismatches from inside peft;
- a merged model folder (what ``merge-lora`` writes) or any Hugging Face folder;
- a ``.gguf`` file (de-quantized once and cached by :mod:`lmforge.models.load`).

The tokenizer comes from the adapter folder when the run saved one there (it may have grown
tokens or gained a chat template), else from the model.
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
class LoadedModel:
    """A model ready to generate: weights (adapter applied), tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    source: str  # what was loaded, for messages and the server's model id
    adapter: str | None = None


def read_adapter_config(lora_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; LmforgeError when the folder is not a LoRA adapter."""
    folder = Path(lora_dir)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        if (folder / "config.json").is_file():
            raise LmforgeError(
                f"no {ADAPTER_CONFIG}: this folder holds a full model, not a LoRA adapter", where=f"lora_model_dir: {lora_dir}",
                fix=f"load it as the model instead (--model {lora_dir}), or point lora_model_dir at the adapter",
            )
        raise LmforgeError(
            f"no {ADAPTER_CONFIG} in the adapter folder",
            where=f"lora_model_dir: {lora_dir}",
            fix="point at the output_dir of a LoRA/QLoRA run (the folder with adapter_model.safetensors)",
        )
    config = json.loads(path.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise LmforgeError(f"only LoRA adapters can be loaded, this one is {config.get('peft_type')}", where=str(path))
    return config


def trained_on(lora_dir: str | os.PathLike[str], adapter_config: dict[str, Any] | None = None) -> str:
    """The base model the adapter was trained on, as the user wrote it when lmforge saved its config."""
    saved = Path(lora_dir) / "config.yml"
    if saved.is_file():
        import yaml

        try:
            base = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("base_model")
        except yaml.YAMLError:
            base = None
        if base:
            return str(base)
    config = adapter_config if adapter_config is not None else read_adapter_config(lora_dir)
    return str(config.get("base_model_name_or_path") or "unknown (the adapter does not say)")


def _adapter_shapes(lora_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    path = lora_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        fix = "lmforge reads safetensors only; re-save the adapter with save_pretrained(safe_serialization=True)"
        if not (lora_dir / "adapter_model.bin").is_file():
            fix = "the training run did not finish saving; point at a complete adapter folder"
        raise LmforgeError(f"no {ADAPTER_WEIGHTS} in the adapter folder", where=str(lora_dir), fix=fix)
    from safetensors import SafetensorError

    try:  # opening checks the header and that the file is as long as it says (a cut-off copy is named here)
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix(_PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        raise LmforgeError(f"the adapter weights are damaged or cut off ({exc})", where=str(path),
                           fix="copy the adapter folder again, or use a checkpoint-N folder of the run") from exc


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
    origin = trained_on(lora_dir, adapter_config)
    fix_base = f"the adapter was trained on {origin}: set base_model to that model, or pick an adapter trained on {base_model}"

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
    targets = adapter_config.get("target_modules")
    if isinstance(targets, list):  # a string is a regex; the path check below covers it
        # peft matches an entry against a module's full name or any dotted suffix of it
        # (lmforge saves full paths for lora_target_linear, other tools leaf names like q_proj)
        suffixes = {name.split(".", i)[-1] for name in modules for i in range(name.count(".") + 1)}
        missing = sorted(set(targets) - suffixes)
        if missing:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in missing})  # 14 layer paths read as 7 names
            shown = ", ".join(leaves) + (f" ({len(missing)} module paths)" if len(missing) > len(leaves) else "")
            raise LmforgeError(
                f"target modules {shown} of the adapter do not exist in the base model",
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
    trust_remote_code: bool = False,
) -> Any:
    """The base model with the adapter applied (checked first; embeddings grown if needed)."""
    from peft import PeftModel

    from lmforge.models.load import load_model

    check = check if check is not None else check_adapter(base_model, lora_dir)
    base = load_model(base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    if check.resize_to is not None:
        # the saved rows overwrite whatever resize puts there; skip the slow mean-resizing
        base.resize_token_embeddings(check.resize_to, mean_resizing=False)
    return PeftModel.from_pretrained(base, str(lora_dir), is_trainable=False)


def load_tokenizer_for(
    model: str, lora_dir: str | os.PathLike[str] | None = None, tokenizer_config: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The tokenizer to use with ``model`` (+ adapter): a run that added tokens or a chat template saved its
    tokenizer with the adapter, so that one wins; else ``tokenizer_config`` or the model's own."""
    from lmforge.models.load import load_tokenizer

    own = lora_dir is not None and any((Path(lora_dir) / name).is_file() for name in _TOKENIZER_FILES)
    try:
        if own:
            return load_tokenizer(str(lora_dir), trust_remote_code=trust_remote_code)
        return load_tokenizer(model, tokenizer_config, trust_remote_code)
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
) -> LoadedModel:
    """A model in eval mode on ``device`` with its tokenizer: ``model`` (an HF folder, merged folder, .gguf,
    pkg:// file or Hub id), plus the LoRA adapter in ``lora_model_dir`` checked against it first."""
    from lmforge.models.load import fit_embeddings_to_tokenizer, load_model

    if lora_model_dir:
        check = check_adapter(model, lora_model_dir)  # before any weight is read
        tokenizer = load_tokenizer_for(model, lora_model_dir, tokenizer_config, trust_remote_code)
        loaded = load_lora_model(model, lora_model_dir, dtype=dtype, check=check, trust_remote_code=trust_remote_code)
        source = f"{model} + {lora_model_dir}"
    else:
        tokenizer = load_tokenizer_for(model, None, tokenizer_config, trust_remote_code)
        loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
        fit_embeddings_to_tokenizer(loaded, tokenizer)
        source = model
    vocab = loaded.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise LmforgeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} embeddings",
            where=str(lora_model_dir or model),
            fix="the adapter was saved without its grown embeddings; retrain with lora_modules_to_save: [embed_tokens, lm_head]",
        )
    loaded.to(device)
    loaded.eval()
    return LoadedModel(model=loaded, tokenizer=tokenizer, source=source, adapter=lora_model_dir)
