"""The model a recipe trains: base weights (full, bf16 or k-bit), grown vocabulary, adapter."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmforge.config import LmforgeConfig
from lmforge.models.adapters import apply_lora, cover_new_token_rows, unfrozen_beside_adapter
from lmforge.models.fast_dropout import use_fast_dropout
from lmforge.models.kernels import apply_liger, attention_backend, compile_layers
from lmforge.models.load import fit_embeddings_to_tokenizer, load_model
from lmforge.models.params import freeze_all_but_language_model, freeze_except, language_model_linear_names, set_dropout


def _quantization_config(cfg: LmforgeConfig, bf16: bool) -> Any:
    """bitsandbytes settings for a 4/8-bit base (the config checks made sure an adapter goes with it)."""
    q = cfg.quantization
    if not (q.load_in_4bit or q.load_in_8bit):
        return None
    from lmforge.models.quantize import bnb_config

    return bnb_config(
        load_in_4bit=q.load_in_4bit,
        load_in_8bit=q.load_in_8bit,
        quant_type=q.bnb_4bit_quant_type,
        double_quant=q.bnb_4bit_use_double_quant,
        compute_dtype=compute_dtype_4bit(q.bnb_4bit_compute_dtype, bf16),
        # FSDP2 all-gathers each group in one dtype: the packed 4-bit weights are stored as bf16 (issue 11)
        quant_storage="bfloat16" if cfg.distributed.fsdp or cfg.distributed.fsdp_config else None,
    )


def compute_dtype_4bit(setting: str, bf16: bool) -> str:
    """`bnb_4bit_compute_dtype: auto` follows the run's precision: bf16 where it trains in bf16, else fp32
    (measured on an AVX2-only CPU: a QLoRA step of SmolLM2-135M took 73 s with bf16 compute, ~5 s with fp32)."""
    if setting != "auto":
        return setting
    return "bfloat16" if bf16 else "float32"


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


def training_model(cfg: LmforgeConfig, tokenizer: Any, device: torch.device, bf16: bool, new_model: Any = None,
                   say: Callable[[str], None] | None = None, train_device: torch.device | None = None) -> Any:
    """The model a recipe trains: `new_model` (built from scratch) or the base model in the cheapest
    dtype that trains correctly, then the same steps for both: embeddings grown to the tokenizer,
    dropout, frozen weights, gradient checkpointing, k-bit preparation, adapter, device.

    Cross-key mistakes (an adapter with unfrozen_parameters, a 4-bit base without an adapter, ...)
    were refused by the config checks before anything loaded.

    `device` is where the weights load; `train_device` (default: the same) is where they train. They
    differ under FSDP2 and ZeRO-3, which load on the CPU and move each rank's shards to its GPU: the
    kernel choices (attention backend, Liger, torch_compile: auto) follow the device that trains.
    """
    quantization = _quantization_config(cfg, bf16)
    # Frozen base weights need no fp32 master copy: holding them in bf16 halves their memory
    # and skips autocast's per-step casts. Trainable weights stay fp32.
    dtype = torch.bfloat16 if (bf16 and cfg.adapter.adapter) else torch.float32
    say = say or (lambda line: None)
    runs_on = train_device or device
    attention = attention_backend(cfg.model.attn_implementation, runs_on, say)
    if new_model is not None:
        model = new_model
        if attention is not None:
            model.set_attn_implementation(attention)
    else:
        extra = {"quantization_config": quantization} if quantization is not None else {}
        if cfg.model.model_quantization_config == "Mxfp4Config":  # an MXFP4 checkpoint (gpt-oss), loaded dequantized
            from transformers import Mxfp4Config

            extra["quantization_config"] = Mxfp4Config(**(cfg.model.model_quantization_config_kwargs or {}))
        if attention is not None:
            extra["attn_implementation"] = attention
        if cfg.model.experts_implementation is not None:
            extra["experts_implementation"] = cfg.model.experts_implementation
        if cfg.rl.reward_model:  # a score head on the last answer token; padding is found through pad_token_id
            extra.update(num_labels=cfg.rl.num_labels or 1, pad_token_id=tokenizer.pad_token_id)

        def load(extra: dict[str, Any]) -> Any:
            return load_model(cfg.model.base_model, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                               masked_lm=cfg.pretrain.objective == "mlm" and cfg.is_pretraining,
                               model_type=cfg.model.model_type, config_source=cfg.model.base_model_config,
                               config_overrides=cfg.model.overrides_of_model_config, reinit_weights=cfg.model.reinit_weights,
                               image_text=bool(cfg.model.processor_type), config_class=cfg.model.cls_model_config,
                               **({"revision": cfg.model.revision_of_model} if cfg.model.revision_of_model else {}), **extra)

        try:
            model = load(extra)
        except ValueError as exc:
            # sdpa (asked for, or what a CUDA-only backend falls back to on this device) is missing from some
            # architectures in transformers (Gemma2): eager is the same math.
            if extra.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            say("attn_implementation: this architecture has no sdpa attention in transformers: attention runs as eager")
            model = load({**extra, "attn_implementation": "eager"})
        if cfg.quantization.quantize_moe_experts:
            from lmforge.models.quantize import quantize_experts

            bits = 4 if cfg.quantization.load_in_4bit else 8
            count = quantize_experts(model, bits, cfg.quantization.bnb_4bit_quant_type, cfg.quantization.bnb_4bit_use_double_quant)
            say(f"quantize_moe_experts: {count} expert weight tensors held in {bits} bit" if count else
                "quantize_moe_experts: this model has no 3D expert weights (not a mixture of experts): nothing quantized")
    rows = model.get_input_embeddings().num_embeddings
    fit_embeddings_to_tokenizer(model, tokenizer, 32 if cfg.model.resize_token_embeddings_to_32x else None)
    new_tokens = [t for t in tokenizer.convert_ids_to_tokens(list(range(rows, len(tokenizer)))) if t != tokenizer.pad_token]
    if cfg.training.dropout is not None:
        set_dropout(model, cfg.training.dropout)
    if cfg.training.unfrozen_parameters and not cfg.adapter.adapter:
        freeze_except(model, cfg.training.unfrozen_parameters)
    elif cfg.model.processor_type and cfg.model.freeze_mm_modules is not False and not cfg.adapter.adapter:
        # A full fine-tune of an image-text model trains its language model; the vision tower and projector stay as
        # pretrained unless unfrozen_parameters (or freeze_mm_modules: false) asks for them.
        freeze_all_but_language_model(model)
    if cfg.quantization.qat is not None:
        from lmforge.models.qat import prepare_qat

        prepare_qat(model, cfg.quantization.qat)
    # torch.utils.checkpoint's arguments; lmforge's default is the non-reentrant form torch recommends.
    checkpointing = {"use_reentrant": False, **(cfg.speed.gradient_checkpointing_kwargs or {})}
    if quantization is not None:
        from lmforge.models.quantize import prepare_kbit_model

        model = prepare_kbit_model(model, gradient_checkpointing=cfg.training.gradient_checkpointing,
                                   gradient_checkpointing_kwargs=checkpointing)
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    apply_liger(model, cfg.speed, runs_on, say)
    if cfg.adapter.adapter:
        settings = cover_new_token_rows(cfg.adapter, model, new_tokens, say)
        if cfg.model.processor_type and settings.lora_target_linear:  # the language model's layers, not the vision tower's
            settings = settings.model_copy(update={"lora_target_linear": False,
                                                   "lora_target_modules": language_model_linear_names(model)})
        if cfg.rl.reward_model and "score" not in (settings.lora_modules_to_save or []):
            settings = settings.model_copy(update={"lora_modules_to_save": [*(settings.lora_modules_to_save or []), "score"]})
        if cfg.training.unfrozen_parameters:
            settings = unfrozen_beside_adapter(settings, model, cfg.training.unfrozen_parameters, say)
        model = apply_lora(model, settings)
        if quantization is not None:
            from lmforge.models.quantize import disable_cpu_weight_packing

            disable_cpu_weight_packing(model)  # peft may wrap new Linear4bit modules
        elif dtype == torch.bfloat16:
            keep_lora_inputs_in_compute_dtype(model)
            # peft upcasts the LoRA weights to fp32, but a modules_to_save copy (an embedding, the head) keeps
            # the base's bf16: its updates would be rounded away like any bf16 master weight. Every trainable
            # weight is an fp32 master weight under autocast; the frozen ones stay bf16.
            from peft import cast_mixed_precision_params

            cast_mixed_precision_params(model, torch.bfloat16)
        if runs_on.type == "cpu" and cfg.training.fast_dropout:
            use_fast_dropout(model)
    if cfg.speed.tiled_mlp:
        from lmforge.models.tiled_mlp import tile_mlps

        count = tile_mlps(model, cfg.speed.tiled_mlp_num_shards)
        slices = cfg.speed.tiled_mlp_num_shards
        say(f"tiled_mlp: {count} MLPs run over {f'{slices} slices' if slices else 'one slice per 32K tokens'} of each sequence")
    model = model if quantization is not None else model.to(device)
    compile_layers(model, cfg.speed, runs_on, say)
    return model
