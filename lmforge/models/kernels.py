"""How the model runs: attention backend, torch.compile, and the fused-kernel plugins (Liger, Cut Cross-Entropy).

Each is a switch read here, in one place, and applied to one model instance (never a global
monkeypatch). The GPU-only ones degrade on a machine without CUDA to the plain PyTorch ops
with one line saying so (``lmforge validate`` says it before the run too): the result is the
same, only slower.

Packed rows (sample_packing) carry ``position_ids`` that restart per example and no 2D
attention mask; transformers turns them into a block-diagonal causal mask for eager, sdpa and
flex attention. For flash_attention_2 it finds the segments in ``position_ids`` only when a batch
holds one row, so lmforge's loss passes the collator's segment boundaries (``cu_seq_lens``) and
flash-attention's variable-length kernel runs per example for any micro_batch_size
(``train.loss.flash_segments``); no backend lets one example attend to another.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from lmforge.config.sections import SpeedSection
from lmforge.errors import LmforgeError

CUDA_ONLY_ATTENTION = ("flash_attention_2", "flex_attention")
LIGER_KEYS = {  # config key -> the argument of liger's apply_liger_kernel_to_<model>
    "liger_rope": "rope", "liger_rms_norm": "rms_norm", "liger_layer_norm": "layer_norm", "liger_glu_activation": "swiglu",
}


def attention_backend(requested: str | None, device: torch.device, say: Callable[[str], None]) -> str | None:
    """The attn_implementation to load with: the requested one, or sdpa where it needs CUDA and the device has none."""
    if requested in CUDA_ONLY_ATTENTION and device.type != "cuda":
        say(f"attn_implementation: {requested} needs CUDA and the device is {device.type}: attention runs as sdpa "
            "(the same math; packed rows stay apart)")
        return "sdpa"
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        from lmforge.config.checks import FLASH_ATTN_FIX

        # validate refuses it too; this catches a config validated on another machine, before any weights load
        raise LmforgeError("attn_implementation: flash_attention_2 needs the flash-attn package, and it is not installed",
                           where="attn_implementation", fix=FLASH_ATTN_FIX)
    return requested


def compile_layers(model: Any, speed: SpeedSection, device: torch.device, say: Callable[[str], None]) -> int:
    """torch.compile each decoder layer in place (names and state dict unchanged); returns how many were compiled.

    Per-layer compilation (as torchtune does) compiles one graph reused by every layer and leaves
    lmforge's loss, which runs the head only on labelled positions, outside the graph.
    """
    wanted = speed.torch_compile
    if wanted == "auto":
        wanted = device.type == "cuda"
    if not wanted:
        return 0
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer") or type(m).__name__ in ("GPT2Block", "BertLayer")]
    if not layers:
        raise LmforgeError(f"torch_compile: found no decoder layers in {type(model).__name__} to compile", where="torch_compile",
                           fix="remove torch_compile for this architecture")
    options = {k: v for k, v in (("backend", speed.torch_compile_backend), ("mode", speed.torch_compile_mode)) if v}
    for layer in layers:
        layer.compile(**options)
        layer._compiled_call_impl = _sequence_length_dynamic(layer._compiled_call_impl)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
        # A frozen embedding (LoRA) hands the first layer hidden states without requires_grad and every later
        # layer ones with it: two graphs for one code. Asking for the input's gradient (only layer 0's
        # backward computes one more, unused) keeps every layer on one graph and halves the compile time.
        model.enable_input_require_grads()
    say(f"torch_compile: {len(layers)} decoder layers compiled ({options.get('backend', 'inductor')}, "
        "sequence length dynamic)")
    return len(layers)


def _sequence_length_dynamic(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled`, with the sequence-length dimension of its tensor arguments marked dynamic before each call.

    Unmarked, dynamo specialises the first batch's length, recompiles at the second length, and only then
    goes dynamic; mixed in with the other guards (attention mask present or not, one row or several) that
    spent a minutes-long inductor compile per new length and ran into the recompile limit. Marked, one
    graph serves every length. The marking happens here, outside the compiled frame, where it takes effect.
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 and hidden.shape[1] > 1:
            length = hidden.shape[1]
            for value in (*args, *kwargs.values()):
                for tensor in value if isinstance(value, tuple) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        for dim in _length_dims(tensor):
                            if tensor.shape[dim] == length:
                                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(*args, **kwargs)

    return call


def _length_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where a decoder layer's argument keeps the sequence length, by its rank. Never a feature dim: a length
    that equals the hidden size or the head dim must not make those dynamic too (that is another graph)."""
    if tensor.dim() == 4:
        return (2, 3)  # the attention mask: (batch, heads, query, key)
    if tensor.dim() == 1:
        return (0,)  # cache positions
    return (1,)  # hidden states, rotary cos/sin, position ids: (batch, length, ...)


def apply_liger(model: Any, speed: SpeedSection, device: torch.device, say: Callable[[str], None]) -> list[str]:
    """Swap in Liger's fused RoPE / RMSNorm / LayerNorm / GLU modules on this model instance (CUDA only).

    Returns the keys applied. Without CUDA, one line says the plain PyTorch ops run instead.
    """
    chosen = [key for key in LIGER_KEYS if getattr(speed, key)]
    if not chosen:
        return []
    if device.type != "cuda":
        say(f"{', '.join(chosen)}: Liger's kernels need CUDA and the device is {device.type}: the plain PyTorch ops run "
            "instead (the same result)")
        return []
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise LmforgeError(f"{chosen[0]} needs the liger-kernel package", where=chosen[0],
                           fix="pip install liger-kernel, or remove the liger_* keys") from exc
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # lmforge computes the loss itself (liger_fused_linear_cross_entropy is read by train/loss.py).
    _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False,
                                    **{LIGER_KEYS[key]: True for key in LIGER_KEYS if key in chosen})
    say(f"Liger kernels: {', '.join(chosen)}")
    return chosen


def fused_loss(speed: SpeedSection, device: torch.device, say: Callable[[str], None]) -> str | None:
    """Which fused output-head + loss kernel the loss uses: 'liger', 'cce' or None (plain PyTorch)."""
    key = ("liger_fused_linear_cross_entropy" if speed.liger_fused_linear_cross_entropy
           else "cut_cross_entropy" if speed.cut_cross_entropy else None)
    if key is None:
        return None
    if device.type != "cuda":
        say(f"{key}: the fused kernel needs CUDA and the device is {device.type}: lmforge's loss runs the output head "
            "only on labelled positions instead (the same loss)")
        return None
    package, module = ("liger-kernel", "liger_kernel") if key.startswith("liger") else ("cut-cross-entropy", "cut_cross_entropy")
    if importlib.util.find_spec(module) is None:
        raise LmforgeError(f"{key} needs the {package} package", where=key, fix=f"pip install {package}, or remove {key}")
    return "liger" if key.startswith("liger") else "cce"
