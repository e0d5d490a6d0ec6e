"""Optimizers over the trainable parameters, with weight decay kept off norms and biases."""

from __future__ import annotations

import torch


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


def build_optimizer(
    model: torch.nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name in ("adamw_torch", "adamw", "adamw_hf", "adamw_torch_fused"):
        on_gpu = any(p.is_cuda for g in groups for p in g["params"])
        # fused=True is the fastest AdamW on CUDA; on CPU the foreach path is.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_gpu or None)
    raise ValueError(f"unknown optimizer {name}")
