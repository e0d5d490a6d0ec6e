"""tiled_mlp: each decoder layer's MLP computed over slices of the sequence, recomputed in backward (ALST's TiledMLP).

An MLP's intermediate activations (gate, up, their product: three tensors of ``intermediate_size`` per token, several
times the hidden size) are the largest a decoder layer saves for backward at long sequence lengths. Tiled, the
forward runs the MLP slice by slice under ``no_grad`` and keeps only its input; backward recomputes one slice at a
time and takes that slice's gradients, so at most one slice's intermediates exist at once. The result is the
untiled MLP's: the same ops on the same rows (an MLP acts on each position alone), the gradients summed over slices.

The MLP modules are wrapped per instance (their ``forward`` attribute), never by patching a transformers class, and
their parameters keep their names: checkpoints, LoRA targets and saved files are unchanged. Gradients reach the
parameters through the autograd function's own inputs (``torch.autograd.grad`` per slice, summed), so each
parameter's gradient is accumulated once per backward, as DDP's and FSDP2's hooks expect (FSDP2 unshards the layer's
weights before its backward, so the recomputation sees them whole; checked on 2 gloo ranks against the untiled run).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from lmforge.errors import LmforgeError

# axolotl's default: about 32K tokens per slice (its sweep found smaller slices slow at long context).
TOKENS_PER_SHARD = 32768
MLP_NAMES = ("mlp", "feed_forward")  # the child of a decoder layer that holds its MLP (Llama/Qwen/Gemma/..., Llama 4)
MOE_MARKERS = ("experts", "router")  # a mixture-of-experts block: its router outputs are recorded in forward


def shard_count(seq_len: int, configured: int | None) -> int:
    """tiled_mlp_num_shards, or axolotl's default: one slice per 32K tokens (so shorter sequences run untiled)."""
    return configured if configured else max(1, math.ceil(seq_len / TOKENS_PER_SHARD))


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shards: int,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.forward, ctx.shards, ctx.params = forward, shards, params
        device = x.device.type
        # Backward runs outside the forward's autocast and RNG position: both are restored for the recomputation
        # (as torch.utils.checkpoint does), so dropout draws the same masks and matmuls run in the same dtype.
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([forward(piece) for piece in x.chunk(shards, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        wants_x = ctx.needs_input_grad[1]
        trained = [i for i, wanted in enumerate(ctx.needs_input_grad[3:]) if wanted]
        grad_x = torch.empty_like(x) if wants_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(ctx.params)
        device, autocast_on, autocast_dtype = ctx.autocast
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), torch.enable_grad(), \
                torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            start = 0
            for piece, grad_piece in zip(x.chunk(ctx.shards, dim=-2), grad_output.chunk(ctx.shards, dim=-2)):
                piece = piece.detach().requires_grad_(wants_x)
                out = ctx.forward(piece)
                wrt = ([piece] if wants_x else []) + [ctx.params[i] for i in trained]
                grads = list(torch.autograd.grad(out, wrt, grad_piece, allow_unused=True))
                if wants_x:
                    grad_x.narrow(-2, start, piece.shape[-2]).copy_(grads.pop(0))
                for i, grad in zip(trained, grads):
                    if grad is not None:
                        grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
                start += piece.shape[-2]
        return (None, grad_x, None, *grad_params)


def _tiled_forward(module: torch.nn.Module, untiled: Callable[..., torch.Tensor], configured: int | None,
                   x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    shards = min(shard_count(x.shape[-2], configured), x.shape[-2]) if x.dim() >= 2 else 1
    params = [p for p in module.parameters() if p.requires_grad]  # read each call: LISA changes which layers train
    if shards <= 1 or args or kwargs or not torch.is_grad_enabled() or not (x.requires_grad or params):
        return untiled(x, *args, **kwargs)  # an MLP called with more than the hidden states runs as written
    return _TiledMLP.apply(untiled, x, shards, *params)


def decoder_mlps(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The MLP module of every decoder layer: the `mlp` (or `feed_forward`) child of each entry of a layer list."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        for index, layer in enumerate(module):
            for child in MLP_NAMES:
                mlp = getattr(layer, child, None)
                if isinstance(mlp, torch.nn.Module):
                    found.append((f"{name}.{index}.{child}", mlp))
                    break
    return found


def tile_mlps(model: torch.nn.Module, num_shards: int | None) -> int:
    """Wrap every decoder layer's MLP (see the module docstring); returns how many were wrapped."""
    mlps = decoder_mlps(model)
    if not mlps:
        raise LmforgeError(f"tiled_mlp: found no decoder-layer MLP (a child named {' or '.join(MLP_NAMES)}) in "
                           f"{type(model).__name__}", where="tiled_mlp", fix="remove tiled_mlp for this model, or use "
                           "gradient_checkpointing")
    for name, mlp in mlps:
        inner = {n.rsplit(".", 1)[-1] for n, _ in mlp.named_modules()}
        if inner & set(MOE_MARKERS):
            raise LmforgeError(f"tiled_mlp: {name} is a mixture-of-experts block, whose router outputs (the auxiliary "
                               "loss) are recorded in forward and would be lost when its slices run without gradients",
                               where="tiled_mlp", fix="remove tiled_mlp for a mixture-of-experts model (gradient_checkpointing "
                               "saves activation memory there)")
    for _, mlp in mlps:
        untiled = mlp.forward  # the class's forward, bound: a PEFT adapter added later still runs inside it
        mlp.forward = partial(_tiled_forward, mlp, untiled, num_shards)  # this instance only
    return len(mlps)


@contextlib.contextmanager
def untiled(model: torch.nn.Module):  # noqa: ANN201
    """The model with its MLPs' own forwards for the block (a reference to compare a tiled model against)."""
    saved = [(mlp, mlp.__dict__.pop("forward")) for _, mlp in decoder_mlps(model) if "forward" in mlp.__dict__]
    try:
        yield model
    finally:
        for mlp, forward in saved:
            mlp.forward = forward
