"""`lmforge merge-lora`, `lmforge export` and `lmforge inspect`: the after-training commands."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import LmforgeConfig
from lmforge.recipes.console import say
from lmforge.errors import LmforgeError


def _adapter_dir(cfg: LmforgeConfig, lora_model_dir: str | None) -> str:
    folder = lora_model_dir or cfg.adapter.lora_model_dir or cfg.training.output_dir
    if not (Path(folder) / "adapter_config.json").is_file():
        raise LmforgeError("no trained adapter found", where=folder, fix="pass --lora_model_dir DIR (a training output_dir)")
    return folder


def run_merge(cfg: LmforgeConfig, lora_model_dir: str | None, output_dir: str | None) -> Path:
    """Merge the adapter into the base model; a plain transformers folder in safetensors."""
    from lmforge.export.merge import merge_lora

    adapter = _adapter_dir(cfg, lora_model_dir)
    target = Path(output_dir or Path(adapter) / "merged")
    result = merge_lora(cfg.model.base_model, adapter, target)
    say(f"merged {adapter} into {cfg.model.base_model}: {result.out_dir} (max logit diff vs adapter {result.max_abs_diff:.2e})")
    return result.out_dir


def run_export(cfg: LmforgeConfig, fmt: str, quant: str, lora_model_dir: str | None, output: str | None) -> Path:
    """Export the (merged) model; GGUF is the format supported today."""
    from lmforge.export.gguf import export_gguf

    if fmt != "gguf":
        raise LmforgeError(f"unknown export format '{fmt}'", where="--format", fix="use --format gguf")
    has_adapter = bool(lora_model_dir or cfg.adapter.adapter)
    source = str(run_merge(cfg, lora_model_dir, None)) if has_adapter else cfg.model.base_model
    target = Path(output or Path(cfg.training.output_dir) / f"model-{quant}.gguf")
    export_gguf(source, target, quant=quant)
    say(f"wrote {target} ({target.stat().st_size / 2**20:.0f} MiB, {quant})")
    return target


def run_inspect(model: str, cfg: LmforgeConfig | None) -> str:
    """Architecture facts and LoRA target candidates; with a config, its trainable share."""
    from lmforge.models.adapters import lora_targets
    from lmforge.models.inspect import format_inspection, inspect_model, trainable_share
    from lmforge.models.load import local_model_dir

    source = local_model_dir(model)
    share = None
    if cfg is not None and cfg.adapter.adapter:
        a = cfg.adapter
        share = trainable_share(source, r=a.lora_r, lora_alpha=a.lora_alpha, target_modules=lora_targets(a), modules_to_save=a.lora_modules_to_save)
    info = inspect_model(source)
    info.source = model
    text = format_inspection(info, share)
    print(text)
    return text
