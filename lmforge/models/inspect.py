"""Describe a model without loading its weights: shape, size and LoRA target candidates.

Everything is computed from ``config.json`` plus a skeleton model built on the ``meta``
device (no memory, no weights read), so inspecting a model costs well under a second
whatever its size. A loaded model can be passed instead of a path; only its config is
used, so it is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError

_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn", "experts", "moe")


@dataclass
class ModelInspection:
    """What ``lmforge inspect`` shows."""

    source: str
    architecture: str
    model_type: str
    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    intermediate_size: int | None
    vocab_size: int | None
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    num_parameters: int
    # linear-layer leaf names by group: attention / mlp / embeddings / head / other
    modules: dict[str, list[str]] = field(default_factory=dict)

    @property
    def lora_target_candidates(self) -> list[str]:
        """Leaf names worth listing in ``lora_target_modules`` (attention + MLP linears)."""
        return self.modules.get("attention", []) + self.modules.get("mlp", [])


@dataclass
class TrainableShare:
    """How many parameters a LoRA config trains."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _config_of(path_or_model: Any) -> tuple[Any, str]:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(path_or_model, PretrainedConfig):
        return path_or_model, getattr(path_or_model, "_name_or_path", "") or "<config>"
    if isinstance(path_or_model, torch.nn.Module):
        config = getattr(path_or_model, "config", None)
        if config is None:
            raise LmforgeError("this module has no Hugging Face config to inspect", where=type(path_or_model).__name__)
        return config, getattr(config, "_name_or_path", "") or type(path_or_model).__name__
    from lmforge.models.load import local_model_dir

    source = local_model_dir(str(path_or_model))
    try:
        return AutoConfig.from_pretrained(source), str(path_or_model)
    except (OSError, ValueError) as exc:
        raise LmforgeError(
            f"could not read the model config: {str(exc).splitlines()[0]}",
            where=str(path_or_model),
            fix="point at a model folder with a config.json, a .gguf file or a Hub id",
        ) from exc


def model_skeleton(config: Any) -> torch.nn.Module:
    """The model's module tree on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        try:  # an image-text model (processor_type): its module tree as it trains, vision tower included
            with torch.device("meta"):
                return AutoModelForImageTextToText.from_config(config)
        except ValueError:
            pass
        raise LmforgeError(
            f"'{type(config).__name__}' is not a causal language model transformers knows: {str(exc).splitlines()[0]}",
            where=getattr(config, "_name_or_path", None) or "model",
            fix="lmforge trains causal LMs (AutoModelForCausalLM)",
        ) from exc


def _group(path: str, leaf: str, head_names: set[str], embed_names: set[str]) -> str:
    if path in head_names:
        return "head"
    if path in embed_names:
        return "embeddings"
    parts = path.lower().split(".")[:-1]
    if any(h in p for p in parts for h in _ATTENTION_HINTS):
        return "attention"
    if any(h in p for p in parts for h in _MLP_HINTS):
        return "mlp"
    return "other"


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def inspect_model(path_or_model: Any) -> ModelInspection:
    """Inspect a model folder, ``.gguf``/``pkg://`` path, Hub id, config or loaded model."""
    config, source = _config_of(path_or_model)
    # multimodal configs keep the language model's numbers in a sub-config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    skeleton = model_skeleton(config)
    names = {id(m): n for n, m in skeleton.named_modules()}
    head = skeleton.get_output_embeddings()
    embed = skeleton.get_input_embeddings()
    head_names = {names[id(head)]} if head is not None and id(head) in names else set()
    embed_names = {names[id(embed)]} if embed is not None and id(embed) in names else set()

    modules: dict[str, list[str]] = {"attention": [], "mlp": [], "embeddings": [], "head": [], "other": []}
    for path, module in skeleton.named_modules():
        if not (isinstance(module, torch.nn.Linear) or path in embed_names):
            continue
        leaf = path.rsplit(".", 1)[-1]
        group = modules[_group(path, leaf, head_names, embed_names)]
        if leaf not in group:
            group.append(leaf)

    heads = _first(text, "num_attention_heads", "n_head")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    head_dim = _first(text, "head_dim") or (hidden // heads if hidden and heads else None)
    archs = getattr(config, "architectures", None) or [type(skeleton).__name__]
    return ModelInspection(
        source=source,
        architecture=archs[0],
        model_type=getattr(config, "model_type", ""),
        hidden_size=hidden,
        num_layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        num_heads=heads,
        num_kv_heads=_first(text, "num_key_value_heads", "num_kv_heads") or heads,
        head_dim=head_dim,
        intermediate_size=_first(text, "intermediate_size", "n_inner", "ffn_dim"),
        vocab_size=_first(text, "vocab_size"),
        max_position_embeddings=_first(text, "max_position_embeddings", "n_positions"),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
        # parameters() yields a tied weight once, so this is the real count
        num_parameters=sum(p.numel() for p in skeleton.parameters()),
        modules={k: v for k, v in modules.items() if v},
    )


def trainable_share(path_or_model: Any, **lora_kwargs: Any) -> TrainableShare:
    """Trainable parameters for ``peft.LoraConfig(**lora_kwargs)`` on this model.

    Uses a meta-device skeleton, so a loaded model is never wrapped or modified. Example:
    ``trainable_share("model_dir", r=16, target_modules=["q_proj", "v_proj"])``.
    """
    from peft import LoraConfig, get_peft_model

    config, source = _config_of(path_or_model)
    skeleton = model_skeleton(config)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    try:
        peft_model = get_peft_model(skeleton, LoraConfig(**lora_kwargs))
    except ValueError as exc:
        raise LmforgeError(
            f"LoRA config does not fit this model: {str(exc).splitlines()[0]}",
            where="lora_target_modules",
            fix=f"choose from: {', '.join(inspect_model(config).lora_target_candidates)}",
        ) from exc
    trainable, total = peft_model.get_nb_trainable_parameters()
    return TrainableShare(trainable=int(trainable), total=int(total))


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_inspection(info: ModelInspection, share: TrainableShare | None = None) -> str:
    """A terminal-friendly, plain-text report of an inspection."""
    rows = [
        ("model", info.source),
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("parameters", f"{_count(info.num_parameters)} ({info.num_parameters:,})"),
        ("hidden size", info.hidden_size),
        ("layers", info.num_layers),
        ("attention heads", f"{info.num_heads} (kv heads {info.num_kv_heads}, head dim {info.head_dim})"),
        ("intermediate size", info.intermediate_size),
        ("vocabulary", info.vocab_size),
        ("context length", info.max_position_embeddings),
        ("tied embeddings", "yes" if info.tie_word_embeddings else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("linear layers (lora_target_modules candidates: attention + mlp)")
    for group, leaves in info.modules.items():
        lines.append(f"  {group:<10}  {', '.join(leaves)}")
    if share is not None:
        lines.append("")
        lines.append(
            f"LoRA trains {share.trainable:,} of {share.total:,} parameters ({100 * share.share:.3f}%)"
        )
    return "\n".join(lines)
