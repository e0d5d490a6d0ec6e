"""The model a recipe trains: base weights (full, bf16 or k-bit), grown vocabulary, adapter."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmforge.config import LmforgeConfig
from lmforge.errors import LmforgeError
from lmforge.models.adapters import apply_lora, cover_new_token_rows
from lmforge.models.fast_dropout import use_fast_dropout
from lmforge.models.load import fit_embeddings_to_tokenizer, load_model, load_tokenizer
from lmforge.models.params import freeze_except, set_dropout


def load_training_tokenizer(cfg: LmforgeConfig, say: Callable[[str], None] | None = None) -> Any:
    """The tokenizer with the configured special tokens and the chat template's marker tokens added."""
    tokenizer = load_tokenizer(cfg.model.base_model, cfg.model.tokenizer_config, cfg.model.trust_remote_code)
    if cfg.model.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.model.special_tokens))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    # A named chat template's markers (chatml's <|im_start|>, ...) join this one tokenizer, which the data is
    # tokenized with, the embeddings grow to and the output saves; and a configured template becomes its own.
    from lmforge.data.formats.templates import prepare_chat_tokenizer

    added = prepare_chat_tokenizer(tokenizer, cfg.data)
    if added and say:
        say(f"chat_template: added {', '.join(added)} to the tokenizer as special tokens (the embeddings grow to match)")
    return tokenizer


def _quantization_config(cfg: LmforgeConfig) -> Any:
    q = cfg.quantization
    if cfg.adapter.adapter == "qlora" and not (q.load_in_4bit or q.load_in_8bit):
        raise LmforgeError("adapter: qlora needs a quantized base", where="adapter", fix="add load_in_4bit: true")
    if not (q.load_in_4bit or q.load_in_8bit):
        return None
    if not cfg.adapter.adapter:
        raise LmforgeError(
            "a 4/8-bit base model cannot be fully fine-tuned", where="load_in_4bit", fix="set adapter: qlora (or lora)"
        )
    from lmforge.models.quantize import bnb_config

    return bnb_config(
        load_in_4bit=q.load_in_4bit,
        load_in_8bit=q.load_in_8bit,
        quant_type=q.bnb_4bit_quant_type,
        double_quant=q.bnb_4bit_use_double_quant,
        compute_dtype=q.bnb_4bit_compute_dtype,
    )


def keep_lora_inputs_in_compute_dtype(model: Any) -> None:
    """Stop peft from copying every LoRA input to fp32 (the adapter weights' dtype).

    Training runs under bf16 autocast, which computes the LoRA matmuls in bf16 anyway; the
    fp32 copy (and its dropout) only costs time and, saved for backward, a large share of
    activation memory. The adapter weights themselves stay fp32.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def load_training_model(cfg: LmforgeConfig, tokenizer: Any, device: torch.device, bf16: bool, say: Callable[[str], None] | None = None) -> Any:
    """Base model in the cheapest dtype that trains correctly, then the adapter."""
    quantization = _quantization_config(cfg)
    # Frozen base weights need no fp32 master copy: holding them in bf16 halves their memory
    # and skips autocast's per-step casts. Trainable weights stay fp32.
    dtype = torch.bfloat16 if (bf16 and cfg.adapter.adapter) else torch.float32
    extra = {"quantization_config": quantization} if quantization is not None else {}
    model = load_model(cfg.model.base_model, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, **extra)
    rows = model.get_input_embeddings().num_embeddings
    fit_embeddings_to_tokenizer(model, tokenizer)
    new_tokens = [t for t in tokenizer.convert_ids_to_tokens(list(range(rows, len(tokenizer)))) if t != tokenizer.pad_token]
    if cfg.training.dropout is not None:
        set_dropout(model, cfg.training.dropout)
    if cfg.training.unfrozen_parameters:
        if cfg.adapter.adapter:
            raise LmforgeError(
                "unfrozen_parameters selects weights for full fine-tuning; it does not combine with an adapter",
                where="unfrozen_parameters",
                fix="remove adapter, or use lora_modules_to_save",
            )
        freeze_except(model, cfg.training.unfrozen_parameters)
    if quantization is not None:
        from lmforge.models.quantize import prepare_kbit_model

        model = prepare_kbit_model(model, gradient_checkpointing=cfg.training.gradient_checkpointing)
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapter.adapter:
        model = apply_lora(model, cover_new_token_rows(cfg.adapter, model, new_tokens, say))
        if quantization is not None:
            from lmforge.models.quantize import disable_cpu_weight_packing

            disable_cpu_weight_packing(model)  # peft may wrap new Linear4bit modules
        elif dtype == torch.bfloat16:
            keep_lora_inputs_in_compute_dtype(model)
        if device.type == "cpu" and cfg.training.fast_dropout:
            use_fast_dropout(model)
    return model if quantization is not None else model.to(device)
