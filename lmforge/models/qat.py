"""Quantization-aware training (``qat:``) through torchao: fake-quantised training, then conversion.

``prepare_qat`` swaps the model's linear layers (and, with quantize_embedding, its embeddings) for
torchao's fake-quantised ones, which round the weights (and activations) to the target format in the
forward pass and let the gradient through unchanged (straight-through), so training learns weights that
survive quantization. ``convert_qat`` swaps them back to plain layers holding the trained weights: the
saved model is an ordinary one, which ``lmforge quantize`` (torchao's post-training quantization with the
same settings) then quantizes for real. The fake-quantisation settings are axolotl's
(``axolotl/utils/quantization.py``), so a config trains the same numerics here.

torchao's NVFP4 layer runs its forward through ``torch._scaled_mm`` (Blackwell GPUs); elsewhere,
``_NVFP4OnAnyDevice`` rounds the same tensors with torchao's own ``NVFP4Tensor`` and multiplies the rounded
values in high precision, with the gradient torchao's backward gives (straight through the rounding).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torchao.prototype.qat import MXFakeQuantizedLinear, NVFP4FakeQuantizedLinear

from lmforge.config.sections import QatSpec
from lmforge.errors import LmforgeError


def _fake_quantize_configs(spec: QatSpec, activations: bool = True) -> Any:
    """torchao's QATConfig for `spec` (weights, and activations unless `activations` is false: embeddings)."""
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.fake_quantize_config import (
        Float8FakeQuantizeConfig,
        Int4WeightFakeQuantizeConfig,
        IntxFakeQuantizeConfig,
    )

    weight, activation = spec.weight_dtype, spec.activation_dtype if activations else None
    if weight in ("mxfp4", "nvfp4"):
        if weight == "mxfp4":
            from torchao.prototype.qat import MXFakeQuantizeConfig

            mx = MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=spec.group_size or 32)
        else:
            from torchao.prototype.qat import NVFP4FakeQuantizeConfig

            mx = NVFP4FakeQuantizeConfig()
        return QATConfig(weight_config=mx, activation_config=mx if activations else None)
    activation_config = None
    if activation == "int8":
        activation_config = IntxFakeQuantizeConfig(dtype=torch.int8, granularity="per_token", is_symmetric=False)
    elif activation == "float8_e4m3fn":
        activation_config = Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)
    if weight == "int4":
        # The int4 kernels these numerics target take bf16 or row-wise fp8 activations (int8 ones run as bf16).
        dtype = torch.float8_e4m3fn if activation == "float8_e4m3fn" else torch.bfloat16
        weight_config = Int4WeightFakeQuantizeConfig(group_size=spec.group_size or 128, activation_dtype=dtype)
    else:  # float8_e4m3fn (the schema refused the combinations torchao cannot quantize after training)
        weight_config = Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn)
    return QATConfig(weight_config=weight_config, activation_config=activation_config)


def _is_embedding(module: torch.nn.Module, _: str) -> bool:
    return isinstance(module, torch.nn.Embedding)


def _nvfp4_rounded(x: torch.Tensor, config: Any) -> torch.Tensor:
    """`x` rounded to NVFP4 and back by torchao's NVFP4Tensor, with the scales torchao's QAT forward uses."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    scale = per_tensor_amax_to_scale(x.abs().max()) if config.use_per_tensor_scale else None
    return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale, is_swizzled_scales=config.use_swizzled_scales).dequantize(x.dtype)


class _NVFP4OnAnyDevice(NVFP4FakeQuantizedLinear):
    """torchao's NVFP4 fake-quantised linear, with a forward that also runs where torch._scaled_mm cannot multiply
    NVFP4 (CPUs, and GPUs before Blackwell).

    There: x and the weight are rounded by torchao (`_nvfp4_rounded`) and multiplied by F.linear. Each rounding
    is straight-through (`rounded + (v - v.detach())`: the rounded value exactly, the gradient of v), so the input's
    gradient is grad @ rounded weight and the weight's is grad^T @ rounded input, as in torchao's own backward.
    Still an NVFP4FakeQuantizedLinear, so torchao's convert step turns it back into a plain linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (10, 0):
            return super().forward(x)  # torchao's NVFP4 matmul: Blackwell and later
        with torch.no_grad():
            x_rounded = _nvfp4_rounded(x.reshape(-1, x.shape[-1]), self.activation_config).reshape(x.shape)
            w_rounded = _nvfp4_rounded(self.weight, self.weight_config)
        return torch.nn.functional.linear(x_rounded + (x - x.detach()), w_rounded + (self.weight - self.weight.detach()),
                                          self.bias)


class _MXUnderAutocast(MXFakeQuantizedLinear):
    """torchao's MX fake-quantised linear under lmforge's mixed precision (fp32 weights, bf16/fp16 autocast).

    torchao's forward asserts that its output has its input's dtype, and is written for weights already in the
    compute dtype (axolotl loads bf16 weights): under autocast an fp32 input (after an RMSNorm, say) meets a matmul
    that autocast runs in bf16, and the assertion fails. Here the input, weight and bias enter in the autocast
    dtype with autocast off, which is what autocast would have multiplied; the gradient flows back through the casts
    to the fp32 weights. Without autocast it is torchao's forward unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.prototype.qat.mx import _MXQuantizedForwardFakeQuantizedBackward

        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _MXQuantizedForwardFakeQuantizedBackward.apply(x.to(dtype), self.weight.to(dtype), bias,
                                                                  self.activation_config, self.weight_config)


def prepare_qat(model: torch.nn.Module, spec: QatSpec) -> torch.nn.Module:
    """Swap the linear layers (and embeddings, with quantize_embedding) for torchao's fake-quantised ones."""
    from torchao.quantization import quantize_

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bad = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
           and spec.group_size and m.in_features % spec.group_size]
    if bad and spec.weight_dtype in ("int4", "mxfp4", "nvfp4"):
        raise LmforgeError(f"qat: group_size {spec.group_size} does not divide the input width of {bad[0]}",
                           where="qat.group_size", fix="choose a group_size that divides the model's layer widths (e.g. 32)")
    quantize_(model, _fake_quantize_configs(spec))
    if spec.weight_dtype == "nvfp4":
        for module in model.modules():
            if type(module) is NVFP4FakeQuantizedLinear:
                module.__class__ = _NVFP4OnAnyDevice  # same state; only the forward differs, and only before Blackwell
    if spec.weight_dtype == "mxfp4":
        for module in model.modules():
            if type(module) is MXFakeQuantizedLinear:
                module.__class__ = _MXUnderAutocast  # same state; only the forward differs, and only under autocast
    if spec.quantize_embedding:
        quantize_(model, _fake_quantize_configs(spec, activations=False), filter_fn=_is_embedding)
    return model


def convert_qat(model: torch.nn.Module, spec: QatSpec) -> torch.nn.Module:
    """Swap the fake-quantised layers back to plain ones with the trained weights (what gets saved)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
    if spec.quantize_embedding:
        quantize_(model, QATConfig(step="convert"), filter_fn=_is_embedding)
    return model


def _toggle(module: torch.nn.Module, enable: bool) -> None:
    for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
        quantizer = getattr(module, name, None)
        if quantizer is not None and hasattr(quantizer, "enabled"):
            quantizer.enabled = enable


def set_fake_quant(model: torch.nn.Module, enable: bool) -> None:
    """Turn fake quantization on or off in every fake-quantised layer (fake_quant_after_n_steps)."""
    model.apply(partial(_toggle, enable=enable))


def delay_fake_quant(model: torch.nn.Module, optimizer: torch.optim.Optimizer, after_steps: int, steps_done: int) -> None:
    """fake_quant_after_n_steps: the first `after_steps` optimizer steps train without fake quantization
    (axolotl's QATCallback), counted from `steps_done` on a resumed run."""
    done = {"steps": steps_done}
    set_fake_quant(model, steps_done >= after_steps)

    def count(*_: Any) -> None:
        done["steps"] += 1
        if done["steps"] == after_steps:
            set_fake_quant(model, True)

    optimizer.register_step_post_hook(count)


def post_training_config(spec: QatSpec) -> Any:
    """torchao's post-training quantization for the formats `spec` trained towards (``lmforge quantize``).

    Int8 dynamic activations with int4 grouped weights run on CPUs (torchao's Intx kernels); the other
    formats quantize for CUDA kernels and are refused here until they are tested on a GPU."""
    if (spec.weight_dtype, spec.activation_dtype) != ("int4", "int8"):
        raise LmforgeError(f"lmforge quantize: qat weight_dtype {spec.weight_dtype} with activation_dtype "
                           f"{spec.activation_dtype} is not supported yet", where="qat",
                           fix="quantize qat: {weight_dtype: int4, activation_dtype: int8} models, or export GGUF with "
                               "`lmforge export --quant`")
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(spec.group_size or 32))


def quantize_for_saving(model: torch.nn.Module, spec: QatSpec) -> torch.nn.Module:
    """Quantize `model`'s linear layers for real, and tell transformers how, so save_pretrained writes the
    quantized tensors and from_pretrained reads them back (transformers' TorchAoConfig)."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if spec.quantize_embedding:
        raise LmforgeError("lmforge quantize: quantize_embedding is not supported yet", where="qat.quantize_embedding",
                           fix="set quantize_embedding: false (the linear layers are quantized)")
    config = post_training_config(spec)
    quantize_(model, config)
    ao = TorchAoConfig(quant_type=config)
    model.config.quantization_config = ao
    model.hf_quantizer = TorchAoHfQuantizer(ao)
    return model
