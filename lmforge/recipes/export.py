"""`lmforge merge-lora`, `lmforge export` and `lmforge inspect`: the after-training commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    result = merge_lora(cfg.model.base_model, adapter, target, processor=cfg if cfg.model.processor_type else None)
    say(f"merged {adapter} into {cfg.model.base_model}: {result.out_dir} (max logit diff vs adapter {result.max_abs_diff:.2e})")
    return result.out_dir


def run_export(
    cfg: LmforgeConfig,
    fmt: str,
    quant: str,
    lora_model_dir: str | None,
    output: str | None,
    *,
    tokenizer_pre: str | None = None,
    keep_merged: str | bool | None = None,
    imatrix: str | None = None,
    imatrix_chunks: int = 32,
) -> Path:
    """Export the model (adapter merged in memory) to GGUF, then check the file against it.

    ``keep_merged``: also save the merged model as a safetensors folder there (``True``:
    ``ADAPTER/merged``, where ``merge-lora`` writes it). ``imatrix``: llama.cpp importance-matrix
    file for the K-quant presets; when it does not exist yet, it is computed from the config's
    training data on the merged model (``imatrix_chunks`` windows of sequence_len tokens) and
    written there in llama.cpp's format first. Raises
    LmforgeError (after removing the file) when the written file's next-token
    distributions are far from the unquantized model's.
    """
    from lmforge.export.gguf import check_fidelity, check_quant, pre_tokenizer_for, write_gguf

    if fmt not in ("gguf", "gguf-lora"):
        raise LmforgeError(f"unknown export format '{fmt}'", where="--format", fix="use --format gguf or gguf-lora")
    if cfg.model.processor_type:
        raise LmforgeError("GGUF export of image-text models is not supported: llama.cpp keeps the vision tower and "
                           "projector in a separate mmproj file, which lmforge does not write", where="processor_type",
                           fix="merge with lmforge merge-lora, then convert with llama.cpp's convert_hf_to_gguf.py (and --mmproj)")
    check_quant(quant)
    if fmt == "gguf-lora":
        if imatrix:
            raise LmforgeError("--imatrix quantizes a model; a LoRA GGUF is not quantized with one", where="--imatrix",
                               fix="drop --imatrix, or use --format gguf with a K-quant --quant")
        return _export_gguf_lora(cfg, quant, lora_model_dir, output)
    from lmforge.export.kquants import KQUANT_PRESETS

    if imatrix and quant not in KQUANT_PRESETS:
        raise LmforgeError(f"--imatrix applies to the K-quant presets, not {quant}", where="--imatrix",
                           fix=f"use it with one of {', '.join(KQUANT_PRESETS)}, or drop --imatrix")
    base = cfg.model.base_model
    target = Path(output or Path(cfg.training.output_dir) / f"model-{quant}.gguf")
    adapter = _adapter_dir(cfg, lora_model_dir) if lora_model_dir or cfg.adapter.adapter else None
    if adapter is None and keep_merged:
        raise LmforgeError("--keep_merged needs an adapter to merge", where="--keep_merged",
                           fix="pass --lora_model_dir DIR, or drop --keep_merged")
    # a given imatrix file is read (and refused) before the weights load; a missing one is computed below
    importance = None
    if imatrix and Path(imatrix).exists():
        from lmforge.export.imatrix import read_imatrix

        importance = read_imatrix(imatrix)
    # the tokenizer decides whether llama.cpp can run the file at all: settle it before loading weights
    from lmforge.models.trained import load_tokenizer_for

    tokenizer = load_tokenizer_for(base, adapter, cfg.model.tokenizer_config, cfg.model.trust_remote_code)
    pre = pre_tokenizer_for(tokenizer, base_model=base, override=tokenizer_pre)
    if adapter:
        from lmforge.export.merge import merge_lora_in_memory

        merged = merge_lora_in_memory(base, adapter)
        model, tokenizer = merged.model, merged.tokenizer
        say(f"merged {adapter} into {base} in memory (max logit diff vs adapter {merged.max_abs_diff:.2e})")
        name = Path(adapter).resolve().name
    else:
        import torch

        from lmforge.models.load import load_model

        model = load_model(base, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)
        name = Path(base).stem
    chat = _trained_chat_format(cfg, tokenizer, model)
    if imatrix and importance is None:
        importance = _compute_importance_matrix(cfg, model, tokenizer, imatrix, imatrix_chunks)
    if importance is not None:
        say(f"quantizing with the importance matrix {imatrix} ({len(importance)} matrices)")
    write_gguf(model, tokenizer, target, quant, tokenizer_pre=pre, name=name, where=f"base_model: {base}", chat=chat,
               imatrix=importance)
    say(f"wrote {target} ({target.stat().st_size / 2**20:.0f} MiB, {quant}, pre-tokenizer {pre})")
    fidelity = check_fidelity(model, tokenizer, target, quant)
    say(fidelity.summary())
    if not fidelity.ok:
        target.unlink()
        raise LmforgeError(
            f"the {quant} file is far from the unquantized model (mean KL {fidelity.mean_kl:.2g},"
            f" top-1 agreement {fidelity.top1:.0%}); removed it",
            where=str(target),
            fix="export with a higher-precision --quant (q8_0 or f16)" if quant not in ("f16", "f32")
            else "an unquantized file should match; please report this as an lmforge bug with the model's config.json",
        )
    if keep_merged:
        from lmforge.export.merge import save_merged

        folder = save_merged(merged, Path(adapter) / "merged" if keep_merged is True else keep_merged)
        say(f"kept the merged model: {folder}")
    return target


def _compute_importance_matrix(cfg: LmforgeConfig, model: Any, tokenizer: Any, path: str, n_chunks: int) -> Any:
    """An imatrix computed from the config's training data on ``model``, written to ``path`` in llama.cpp's format."""
    from lmforge.export.imatrix import compute_imatrix, read_imatrix, training_chunks, write_imatrix

    if not cfg.data.datasets:
        raise LmforgeError(f"{path} does not exist, and this config has no training data to compute it from",
                           where="--imatrix", fix="pass an existing imatrix file, or a config with datasets:")
    chunks, size = training_chunks(cfg, tokenizer, n_chunks)
    say(f"computing an importance matrix from the training data ({len(chunks)} windows of up to {size} tokens)")
    sums, counts = compute_imatrix(model, chunks)
    write_imatrix(path, sums, counts, [str(d.path) for d in cfg.data.datasets], len(chunks), size)
    say(f"wrote {path} (llama.cpp's imatrix format, {len(sums)} matrices; llama-quantize --imatrix reads it too)")
    return read_imatrix(path)


def _trained_chat_format(cfg: LmforgeConfig, tokenizer: Any, model: Any) -> Any:
    """The prompt format lmforge's inference uses for this config, for llama.cpp's chat completion."""
    from lmforge.export.gguf import ChatFormat, instruction_template
    from lmforge.infer.prompts import PromptBuilder

    if not cfg.data.datasets:
        return None  # pretraining / no format: the tokenizer's own template, if any
    builder = PromptBuilder.from_config(cfg, tokenizer, model)
    if builder.chat is not None:
        template = builder.chat.template
    elif builder.fmt is not None:
        template = instruction_template(builder.single, tokenizer.bos_token)
    else:
        return None
    # the first stop token that is not EOS ends a turn (llama.cpp stops at EOS and at the EOT id)
    eot = next((i for i in builder.stop_token_ids if i != tokenizer.eos_token_id), None)
    return ChatFormat(template=template, end_of_turn_id=eot)


def _export_gguf_lora(cfg: LmforgeConfig, quant: str, lora_model_dir: str | None, output: str | None) -> Path:
    """The adapter alone, in llama.cpp's LoRA-adapter GGUF layout, for ``--lora`` on a base GGUF."""
    from lmforge.export.gguf_lora import write_gguf_lora

    if not (lora_model_dir or cfg.adapter.adapter):
        raise LmforgeError("--format gguf-lora exports an adapter, and this config trains none", where="--format",
                           fix="pass --lora_model_dir DIR (a LoRA training output_dir), or use --format gguf")
    adapter = _adapter_dir(cfg, lora_model_dir)
    target = Path(output or Path(adapter) / f"adapter-{quant}.gguf")
    write_gguf_lora(cfg.model.base_model, adapter, target, quant)
    say(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB, LoRA adapter for {cfg.model.base_model}, {quant});"
        f" apply it in llama.cpp with --lora {target} on the base model's GGUF")
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
