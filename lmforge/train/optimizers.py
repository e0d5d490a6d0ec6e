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


def _torchao(name: str):  # noqa: ANN202
    try:
        import torchao.optim
    except ImportError as exc:
        raise LmforgeError(f"optimizer {name} needs torchao", where="optimizer", fix="pip install torchao==0.18.0") from exc
    return torchao.optim


def _embedding_weights(model: torch.nn.Module) -> set[int]:
    """ids of the input and output embedding matrices (a Hugging Face model names them; a plain module has none)."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None and getattr(module, "weight", None) is not None:
            found.add(id(module.weight))
    return found


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden weight matrices, AdamW on the rest (embeddings, output head, norms, biases).

    Muon orthogonalises the update of a matrix, which suits hidden layers only: embeddings and the
    head are lookups and classifiers, and vectors have no orthogonal form (torch.optim.Muon refuses
    them). That split is how Muon is used in practice (Keller Jordan's MuonWithAuxAdam, Moonshot's
    Moonlight). Muon's update is scaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``), so one
    learning_rate and one schedule drive both. Both optimizers' groups are this optimizer's groups,
    so the schedule sets their rates, and the state dict holds both.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
        embeddings = _embedding_weights(model)
        hidden, other = [], []
        for _, param in model.named_parameters():
            if param.requires_grad:
                (hidden if param.ndim == 2 and id(param) not in embeddings else other).append(param)
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw") if hidden else None
        other_groups = [g for g in _groups_of(other, weight_decay) if g["params"]]
        self.adamw = torch.optim.AdamW(other_groups, lr=lr, betas=betas, eps=eps) if other_groups else None
        self._parts = [part for part in (self.muon, self.adamw) if part is not None]
        super().__init__([{"params": hidden + other}], {"lr": lr})
        # The groups the schedule sees are the parts' own groups (the same dicts), so setting a rate sets it there.
        self.param_groups = [group for part in self._parts for group in part.param_groups]

    @property
    def parts(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers inside (Muon, AdamW): what torch.distributed.checkpoint saves and loads one by one,
        as it reads only the standard {state, param_groups} layout, not this optimizer's {muon, adamw}."""
        return list(self._parts)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = closure() if closure is not None else None
        for part in self._parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self._parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict() if self.muon else None, "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict) -> None:
        for name in ("muon", "adamw"):
            part = getattr(self, name)
            if (part is None) != (state_dict.get(name) is None):
                raise LmforgeError("the checkpoint's Muon/AdamW split does not match this model's parameters",
                                   where="optimizer: muon", fix="resume with the same model, adapter and unfrozen_parameters")
            if part is not None:
                part.load_state_dict(state_dict[name])
        # load_state_dict gives each part new group dicts: point this optimizer's groups at them again
        self.param_groups = [group for part in self._parts for group in part.param_groups]


def _groups_of(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    decay = [p for p in params if p.ndim >= 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


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
        # fused=True is the fastest AdamW on CUDA, and on the CPU too: there torch's default is neither fused
        # nor foreach but one small op per tensor, and measured on LoRA's 420 tensors (issue 28, bench/RESULTS.md)
        # the fused kernel stepped 3.0x faster than that default (foreach 1.5x), to within 1e-6 of its result.
        on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
        fused = True if (on_gpu or on_cpu or name == "adamw_torch_fused") else None
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "adamw_bnb_8bit":
        return _bitsandbytes(name).AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if name in ("paged_adamw_8bit", "paged_adamw_32bit"):
        # bitsandbytes pages the states into CUDA unified memory; on a CPU it keeps them unpaged (the same update).
        optim = _bitsandbytes(name)
        paged = optim.PagedAdamW8bit if name == "paged_adamw_8bit" else optim.PagedAdamW32bit
        return paged(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw_torch_4bit":
        # torchao's AdamW with both moments in 4 bits (block-wise, 128 values a block); tensors under 4096
        # values keep fp32 moments, as torchao decides. Its step is torch.compile'd per parameter shape.
        return _torchao(name).AdamW4bit(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw_torch_8bit":
        # torchao's AdamW with block-wise 8-bit moments: unlike bitsandbytes' kernels, its step runs on FSDP2's
        # sharded DTensor weights (axolotl's FSDP2 examples pick it for that)
        return _torchao(name).AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if name == "muon":
        return MuonWithAdamW(model, lr, weight_decay, betas, eps)
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
