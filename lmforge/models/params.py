"""Which weights train and how they regularise: unfrozen_parameters and the dropout override."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from lmforge.errors import LmforgeError


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> int:
    """Train only parameters whose name matches one of `patterns` (re.match, from the name's start).

    Returns the number of trainable parameters. A pattern matching nothing is an error: a typo
    would otherwise silently freeze the whole model.
    """
    compiled = check_patterns(model, patterns)
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(unfrozen(name, compiled))
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def check_patterns(model: torch.nn.Module, patterns: list[str]) -> list[re.Pattern[str]]:
    """unfrozen_parameters compiled, each checked to be a regex that matches some parameter of `model`."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise LmforgeError(f"unfrozen_parameters: invalid regex {pattern!r} ({exc})", where="unfrozen_parameters") from exc
    names = [name for name, _ in model.named_parameters()]
    for pattern, regex in zip(patterns, compiled):
        if not any(regex.match(name) for name in names):
            raise LmforgeError(
                f"unfrozen_parameters: {pattern!r} matches no parameter", where="unfrozen_parameters",
                fix=f"parameter names look like {names[0]!r}, {names[-1]!r}",
            )
    return compiled


def unfrozen(name: str, patterns: Sequence[str | re.Pattern[str]]) -> bool:
    """The rule of unfrozen_parameters: a parameter trains when a pattern matches its name from the start
    (re.match). freeze_except applies it to a model; the planner counts what would train by it."""
    return any(re.match(pattern, name) for pattern in patterns)


def _is_dropout_key(key: str) -> bool:
    return ("dropout" in key or key.endswith("pdrop")) and "lora" not in key


def set_dropout(model: torch.nn.Module, p: float) -> list[str]:
    """Set every dropout probability in the model config, and the live modules built from it.

    Models copy config values into modules at construction (e.g. Llama's
    ``self.attention_dropout``), so changing the config alone would do nothing. Returns the config
    fields changed; an error when the model has none.
    """
    config = model.config
    fields = sorted(k for k, v in config.to_dict().items() if _is_dropout_key(k) and isinstance(v, float | int) and not isinstance(v, bool))
    if not fields:
        raise LmforgeError(f"dropout: the {config.model_type} model config has no dropout settings", where="dropout",
                           fix="remove dropout from the config")
    for key in fields:
        setattr(config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for key in fields:
            if isinstance(getattr(module, key, None), float | int) and not isinstance(getattr(module, key), bool):
                setattr(module, key, p)
    return fields


def language_model_prefix(model: torch.nn.Module) -> str:
    """The module path of an image-text model's language model (``model.language_model`` in LLaVA, ``model.text_model``
    in Idefics3): what trains by default, where its vision tower and projector stay frozen."""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def freeze_all_but_language_model(model: torch.nn.Module) -> int:
    """Freeze the vision tower and projector (and any other non-language module) of an image-text model: train the
    language model and its output head. Returns the trainable parameter count."""
    keep = {id(p) for p in model.get_decoder().parameters()}
    head = model.get_output_embeddings()
    keep |= {id(p) for p in head.parameters()} if head is not None else set()
    trainable = 0
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def language_model_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the language model's linear layers: lora_target_linear's targets on an image-text model (the
    vision tower's linear layers stay out, as axolotl's `model.language_model.layers...` regexes keep them)."""
    prefix = language_model_prefix(model) + "."
    return [name for name, module in model.named_modules() if name.startswith(prefix) and isinstance(module, torch.nn.Linear)]
