"""Optimizers over the trainable parameters, with weight decay kept off norms and biases."""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError

ADAMW_NAMES = ("adamw_torch", "adamw", "adamw_hf", "adamw_torch_fused")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: decaying norm scales and biases pulls them to zero for no benefit."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _bitsandbytes(name: str):  # noqa: ANN202
    try:
        import bitsandbytes
    except ImportError as exc:
        raise LmforgeError(f"optimizer {name} needs bitsandbytes", where="optimizer", fix="pip install bitsandbytes") from exc
    return bitsandbytes.optim


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])
    if name in ADAMW_NAMES:
        # fused=True is the fastest AdamW on CUDA; on CPU the foreach path usually is, so the
        # fused CPU kernel is used only when asked for by name.
        fused = True if (on_gpu or name == "adamw_torch_fused") else None
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "adamw_bnb_8bit":
        return _bitsandbytes(name).AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if name in ("lion_8bit", "lion_32bit"):
        optim = _bitsandbytes(name)
        return (optim.Lion8bit if name == "lion_8bit" else optim.Lion)(groups, lr=lr, betas=betas)
    if name == "sgd":
        # Plain SGD's weight_decay is L2 (added to the gradient), not decoupled as in AdamW.
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # An explicit learning rate, so the configured schedule drives it like every other optimizer.
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    raise LmforgeError(f"unknown optimizer {name}", where="optimizer")
