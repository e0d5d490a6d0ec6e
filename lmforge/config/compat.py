"""axolotl keys that lmforge knows of but does not act on.

Users bring axolotl configs unchanged, so a key axolotl defines is never "unknown" here:
it is either supported, accepted because it asks for nothing (a switch left off, or a
hint lmforge does not need), or refused by name as "not supported yet".
"""

from __future__ import annotations

from typing import Any

# Keys that only describe or steer axolotl itself; lmforge needs none of them.
NO_EFFECT = {
    "strict": "lmforge always validates strictly",
    "is_llama_derived_model": "the architecture is read from the model config",
    "is_mistral_derived_model": "the architecture is read from the model config",
    "is_falcon_derived_model": "the architecture is read from the model config",
    "is_qwen_derived_model": "the architecture is read from the model config",
    "debug": "use --debug on the command line",
    "save_safetensors": "lmforge always saves safetensors",
    "hf_use_auth_token": "the Hub token is read from the environment",
    "logging_dir": "logs go to output_dir",
    "special_tokens_strict": "",
}

# axolotl features lmforge does not implement yet. Set to anything but off/empty they are refused.
NOT_SUPPORTED_YET = {
    "gptq", "peft_layers_to_transform",
    "pad_to_sequence_len", "sample_packing_eff_est",
    "flash_attention", "flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv",
    "flash_attn_fuse_mlp", "xformers_attention", "sdp_attention", "s2_attention",
    "deepspeed", "fsdp", "fsdp_config", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    "save_strategy", "evaluation_strategy",
    "eval_strategy", "lr_quadratic_warmup", "cosine_constant_lr_ratio", "lr_div_factor", "loss_watchdog_threshold", "loss_watchdog_patience",
    "neftune_noise_alpha", "noisy_embedding_alpha", "torch_compile",
    "torch_compile_backend", "rl", "dpo_beta", "reward_model", "hub_model_id", "hub_strategy", "push_dataset_to_hub",
    "dataset_shard_num",
    "dataset_shard_idx", "tokens", "resize_token_embeddings_to_32x", "embeddings_skip_upcast",
    "lora_on_cpu", "relora_steps", "relora_warmup_steps", "relora_cpu_offload", "noisy_embedding",
    "max_memory", "gpu_memory_limit", "low_cpu_mem_usage", "local_rank",
    "rope_scaling", "default_system_message", "eval_max_new_tokens",
    "eval_causal_lm_metrics", "do_causal_lm_eval", "eval_table_size", "lr_groups", "loraplus_lr_ratio",
    "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "unsloth_cross_entropy_loss",
    "liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_cross_entropy",
    "liger_fused_linear_cross_entropy", "adam_epsilon2", "max_packed_sequence_len",
    "skip_prepare_dataset", "remove_unused_columns",
}


def is_off(value: Any) -> bool:
    """A switch left off asks for nothing: false, null, 0, empty string/list/dict."""
    return value is None or value is False or value == 0 or value in ("", [], {})
