"""LoRA adapters through PEFT, configured from axolotl's lora_* keys."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmforge.config.sections import AdapterSection
from lmforge.errors import LmforgeError


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (the `lora_target_modules` candidates), output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    conv1d = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if type(module).__name__ == "Conv1D"}
    return sorted(names | conv1d)


def lora_targets(settings: AdapterSection) -> Any:
    """peft's target_modules for the config: "all-linear", a list of names, or None (peft's default)."""
    if settings.lora_target_linear:
        return "all-linear"
    if isinstance(settings.lora_target_modules, str):
        return [settings.lora_target_modules]
    return settings.lora_target_modules


def ties_embeddings(model: torch.nn.Module) -> bool:
    """True when the output head shares the input embedding's weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


def embedding_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the input embedding and (unless tied to it) the output head: what modules_to_save takes."""
    wanted = [model.get_input_embeddings()]
    if not ties_embeddings(model) and model.get_output_embeddings() is not None:
        wanted.append(model.get_output_embeddings())
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return [names[id(module)] for module in wanted if id(module) in names]


def cover_new_token_rows(
    settings: AdapterSection, model: torch.nn.Module, new_tokens: list[str], say: Callable[[str], None] | None = None
) -> AdapterSection:
    """Under LoRA the base weights stay frozen, so the embedding rows of tokens added for this run train only
    through lora_modules_to_save: put the embedding layers there when the user left it unset, else say what
    stays untrained."""
    if not new_tokens or not settings.adapter:
        return settings
    names = embedding_layer_names(model)
    listed = ", ".join(new_tokens[:6]) + (", ..." if len(new_tokens) > 6 else "")
    if settings.lora_modules_to_save is None:
        size = sum(p.numel() for module in _modules_named(model, names) for p in module.parameters())
        if say:
            say(f"{len(new_tokens)} tokens were added ({listed}) and their embedding rows start untrained: "
                f"lora_modules_to_save: [{', '.join(names)}] is set so they train ({size:,} more trainable parameters, "
                "saved with the adapter); set lora_modules_to_save yourself (e.g. []) to choose otherwise")
        return settings.model_copy(update={"lora_modules_to_save": names})
    missing = [name for name in names if name not in settings.lora_modules_to_save]
    if missing and say:
        say(f"warning: {len(new_tokens)} tokens were added ({listed}) but lora_modules_to_save lacks {', '.join(missing)}, "
            f"so their rows keep their initial values and the model can hardly learn to emit them; add {', '.join(missing)} to train them")
    return settings


def _modules_named(model: torch.nn.Module, leaves: list[str]) -> list[torch.nn.Module]:
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in leaves]


def lora_config(settings: AdapterSection, model: torch.nn.Module) -> Any:
    """A peft LoraConfig for a causal LM from the adapter section."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_targets(settings),
        fan_in_fan_out=settings.lora_fan_in_fan_out,
        modules_to_save=settings.lora_modules_to_save,
        target_parameters=settings.lora_target_parameters,
        use_dora=settings.peft_use_dora,
        use_rslora=settings.peft_use_rslora,
        # A trained copy of a tied embedding must stay tied to the output head (peft unties it otherwise).
        ensure_weight_tying=bool(settings.lora_modules_to_save) and ties_embeddings(model),
    )


def apply_lora(model: torch.nn.Module, settings: AdapterSection) -> Any:
    """Wrap `model` with a new LoRA adapter, or load `lora_model_dir` to continue training it."""
    from peft import PeftModel, get_peft_model

    if settings.lora_model_dir:
        try:
            return PeftModel.from_pretrained(model, settings.lora_model_dir, is_trainable=True)
        except (ValueError, OSError) as exc:
            raise LmforgeError(
                f"could not load the adapter: {str(exc).splitlines()[0]}", where=f"lora_model_dir: {settings.lora_model_dir}"
            ) from exc
    try:
        return get_peft_model(model, lora_config(settings, model))
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            raise LmforgeError(
                f"lora_target_modules {settings.lora_target_modules} do not match any layer of this model",
                where="lora_target_modules",
                fix=f"choose from: {', '.join(linear_layer_names(model))} (or set lora_target_linear: true)",
            ) from exc
        raise


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_weights(model: Any, folder: Any, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, safe_serialization=True, **kwargs)``, without peft's two-line
    "Setting `save_embedding_layers` to `True`" warning: lmforge said so itself, in one line, when it
    added the tokens or put the embeddings in lora_modules_to_save; peft's "auto" still decides."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
