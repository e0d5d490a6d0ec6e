"""k-bit (QLoRA) loading and training preparation through bitsandbytes.

``bnb_config`` turns the plain config keys (``load_in_4bit``, ``bnb_4bit_quant_type``...)
into a ``transformers.BitsAndBytesConfig``; ``prepare_kbit_model`` readies a loaded
k-bit model for adapter training.

CPU caveat (bitsandbytes 0.50.x): on a CPU with AVX512-BF16, ``Linear4bit.forward``
repacks its weight into an inference-only layout the first time it sees an input
without grad in eval mode (``generate``, an eval loop). The packed matmul has no
backward, so later training silently gets no gradient through the frozen base
weights (only a "no autograd kernel" warning) and every LoRA layer below the top
one learns from a wrong gradient. :func:`disable_cpu_weight_packing` turns that
repacking off (and undoes it where it already happened); ``prepare_kbit_model``
calls it, and code that builds the peft model itself should call it too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lmforge.errors import LmforgeError

BNB_PIN = "bitsandbytes==0.50.2"
QUANT_TYPES = ("nf4", "fp4")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' import-time warning about the optional ``kernels`` package.

    On AVX512-BF16 CPUs bitsandbytes 0.50 tries to fetch an inference kernel from the
    Hub at import (peft imports it as soon as it is installed) and logs a failure that
    is irrelevant to training. Call before the first ``import peft``.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


quiet_bitsandbytes()


def require_bitsandbytes() -> Any:
    """Import bitsandbytes or raise an error that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise LmforgeError(
            "QLoRA / k-bit loading needs bitsandbytes, which is not installed",
            where="adapter: qlora / load_in_4bit / load_in_8bit",
            fix=f"pip install {BNB_PIN}",
        ) from exc
    return bitsandbytes


def parse_dtype(dtype: str | torch.dtype, where: str = "bnb_4bit_compute_dtype") -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` → ``torch.bfloat16`` (and so on)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise LmforgeError(
            f"unknown dtype '{dtype}'", where=where, fix="use one of float32, bfloat16, float16"
        )
    return _DTYPES[key]


def bnb_config(
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "bfloat16",
    quant_storage: str | torch.dtype | None = None,
) -> Any:
    """A ``BitsAndBytesConfig`` for 4-bit (QLoRA) or 8-bit loading.

    ``quant_type``/``double_quant``/``compute_dtype`` map to the ``bnb_4bit_*`` keys and
    are ignored for 8-bit. Pass the result to ``load_model(..., quantization_config=...)``.
    """
    from transformers import BitsAndBytesConfig

    if load_in_4bit == load_in_8bit:
        raise LmforgeError(
            "exactly one of load_in_4bit and load_in_8bit must be true"
            + (" (both are set)" if load_in_4bit else " (neither is set)"),
            where="load_in_4bit / load_in_8bit",
            fix="set load_in_4bit: true for QLoRA, or load_in_8bit: true for 8-bit LoRA",
        )
    if quant_type not in QUANT_TYPES:
        raise LmforgeError(
            f"unknown 4-bit quantization type '{quant_type}'",
            where="bnb_4bit_quant_type",
            fix="use nf4 (recommended for QLoRA) or fp4",
        )
    require_bitsandbytes()
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype),
        # FSDP shards the packed 4-bit weights as tensors of this dtype (the FSDP-QLoRA recipe: bf16, like the rest)
        **({"bnb_4bit_quant_storage": parse_dtype(quant_storage)} if quant_storage is not None else {}),
    )


def _linear4bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_weight_packing(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking on every ``Linear4bit``; return how many.

    Weights already repacked (a ``generate`` ran before this call) are converted back,
    because the flag alone only prevents future repacking.
    """
    modules = _linear4bit_modules(model)
    for module in modules:
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            module.weight.data = data
            module.weight.quant_state = state
    return len(modules)


class _Int8Experts(torch.nn.Module):
    """Dequantizes a row-wise int8 expert weight on access (bitsandbytes' int8 vectorwise format)."""

    def __init__(self, row_stats: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("row_stats", row_stats)
        self.dtype = dtype

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        rows = bnb.functional.int8_vectorwise_dequant(quantized.reshape(-1, quantized.shape[-1]), self.row_stats)
        return rows.reshape(quantized.shape).to(self.dtype)


def _replace_parameter_8bit(module: torch.nn.Module, name: str) -> None:
    import bitsandbytes as bnb
    from torch.nn.utils import parametrize

    weight = getattr(module, name)
    flat = weight.data.reshape(-1, weight.shape[-1]).to(torch.float16)
    quantized, row_stats, _ = bnb.functional.int8_vectorwise_quant(flat)
    setattr(module, name, torch.nn.Parameter(quantized.reshape(weight.shape), requires_grad=False))
    parametrize.register_parametrization(module, name, _Int8Experts(row_stats, weight.dtype), unsafe=True)


def quantize_experts(model: torch.nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Hold every mixture-of-experts expert weight in 4 or 8 bit; return how many were quantized (quantize_moe_experts).

    transformers stores a MoE layer's experts as 3D parameters (experts x out x in), which
    ``load_in_4bit``/``load_in_8bit`` leave in full precision since they only replace ``nn.Linear``; yet
    they are most of the model. Each is stored quantized and dequantized on access (a parametrization):
    4 bit through bitsandbytes' ``replace_parameter_4bit``, 8 bit in bitsandbytes' row-wise int8, as
    axolotl's quantize_moe_experts does. The experts are frozen (the adapter trains beside them).
    """
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    count = 0
    for module in model.modules():
        for name, weight in list(module.named_parameters(recurse=False)):
            if weight.ndim == 3 and weight.is_floating_point():
                if bits == 4:
                    replace_parameter_4bit(module, name, compress_statistics=double_quant, quant_type=quant_type)
                else:
                    _replace_parameter_8bit(module, name)
                count += 1
    return count


def is_kbit_model(model: torch.nn.Module) -> bool:
    """True when ``model`` was loaded in 4 or 8 bit through bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_kbit_model(
    model: torch.nn.Module,
    *,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Ready a k-bit model for adapter training (call before ``get_peft_model``).

    peft's ``prepare_model_for_kbit_training`` upcasts the remaining small float params
    to fp32 and makes the embeddings' output require grad so that checkpointed layers
    still backpropagate; then the CPU repacking bug is switched off.
    """
    from peft import prepare_model_for_kbit_training

    if not is_kbit_model(model):
        raise LmforgeError(
            "the model was not loaded in 4 or 8 bit",
            where="adapter: qlora",
            fix="load it with quantization_config=bnb_config(load_in_4bit=True)",
        )
    kwargs = gradient_checkpointing_kwargs if gradient_checkpointing_kwargs is not None else {"use_reentrant": False}
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=kwargs
    )
    disable_cpu_weight_packing(model)
    return model
