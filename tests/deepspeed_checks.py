"""Run several training configs in one process (or one torchrun launch), recording what tests/test_deepspeed.py checks.

Usage: python tests/deepspeed_checks.py RESULTS.json A.yml B.yml ...   (one process: a gloo group of one)
   or: torchrun --nproc_per_node 2 tests/deepspeed_checks.py RESULTS.json A.yml ...

Each config runs `run_train` as `lmforge train` does; one failing config is recorded (its error's first line) and
the next one runs, so one launch checks many configs (every optimizer name) for one start-up cost. Per config,
rank 0 writes into RESULTS.json:
- ``error``: None, or the exception's type and first line;
- ``largest_gather``: the most parameter elements one ``deepspeed.zero.GatheredParameters`` held while lmforge
  gathered the weights to save them (ZeRO-3; a spy around DeepSpeed's own class);
- ``fused_calls``: how often the fused-loss stand-in ran;
- ``ds_fp16``, ``ds_allows_client_optimizer``: the fp16 section and zero_allow_untested_optimizer of the config
  lmforge passed to deepspeed.initialize; ``grad_scaler``: whether the loop got a torch GradScaler;
  ``loss_scaler_skips``: steps DeepSpeed's fp16 loss scaler skipped on an overflow (as the loop saw them).

The fused-loss stand-in: a config with ``liger_fused_linear_cross_entropy: true`` gets a pure-torch
``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss`` (the head's weight as the kernel receives it,
saved for backward like Cut Cross-Entropy does), and lmforge's kernel choice (which needs CUDA) says "liger".
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from lmforge.config import load_config
from lmforge.recipes.finetune import run_train

RECORD: dict[str, Any] = {}


class _FusedLinearCrossEntropyStandIn(torch.nn.Module):
    """Liger's call signature, plain torch inside: reads the weight it is given (a ZeRO-3 shard is empty)."""

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        RECORD["fused_calls"] = RECORD.get("fused_calls", 0) + 1
        if weight.numel() == 0:
            raise RuntimeError(f"the fused loss got an empty output-head weight {tuple(weight.shape)}: a ZeRO-3 shard")
        logits = F.linear(hidden, weight)  # autograd keeps `weight` for backward, as Cut Cross-Entropy's kernel does
        return F.cross_entropy(logits.float(), targets, reduction=self.reduction, label_smoothing=self.label_smoothing)


def _install_fused_stand_in() -> None:
    package, module = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = _FusedLinearCrossEntropyStandIn
    package.transformers = module
    sys.modules.update({"liger_kernel": package, "liger_kernel.transformers": module})
    import lmforge.recipes.run as training

    training.fused_loss = lambda speed, device, say: "liger" if speed.liger_fused_linear_cross_entropy else None


def _install_gather_spy() -> None:
    """Record the largest ZeRO-3 gather while lmforge gathers weights to save them."""
    import deepspeed

    from lmforge.train.deepspeed import DeepSpeedEngine

    real_gathered, real_full_state = deepspeed.zero.GatheredParameters, DeepSpeedEngine.full_state
    saving = [False]

    def gathered(params: Any, *args: Any, **kwargs: Any) -> Any:
        if saving[0]:
            listed = list(params) if isinstance(params, (list, tuple)) else [params]
            elements = sum(getattr(p, "ds_numel", p.numel()) for p in listed)
            RECORD["largest_gather"] = max(RECORD.get("largest_gather", 0), elements)
        return real_gathered(params, *args, **kwargs)

    def full_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        saving[0] = True
        try:
            return real_full_state(self, *args, **kwargs)
        finally:
            saving[0] = False

    deepspeed.zero.GatheredParameters = gathered
    DeepSpeedEngine.full_state = full_state


def _install_wiring_spies() -> None:
    """Record the DeepSpeed config lmforge hands to deepspeed.initialize, the loop's GradScaler, and fp16 overflow skips."""
    import deepspeed

    import lmforge.recipes.run as training
    from lmforge.train.deepspeed import _DeepSpeedSync

    real_initialize, real_train_loop = deepspeed.initialize, training.train_loop
    real_skipped = getattr(_DeepSpeedSync, "loss_scaler_skipped", None)

    def initialize(*args: Any, config: dict[str, Any], **kwargs: Any) -> Any:
        RECORD["ds_fp16"] = bool(config.get("fp16", {}).get("enabled"))
        RECORD["ds_allows_client_optimizer"] = bool(config.get("zero_allow_untested_optimizer"))
        return real_initialize(*args, config=config, **kwargs)

    def train_loop(model: Any, optimizer: Any, scheduler: Any, batches: Any, settings: Any, *args: Any, **kwargs: Any) -> Any:
        RECORD["grad_scaler"] = settings.grad_scaler is not None
        return real_train_loop(model, optimizer, scheduler, batches, settings, *args, **kwargs)

    def loss_scaler_skipped(self: Any) -> bool:
        skipped = real_skipped(self)
        RECORD["loss_scaler_skips"] = RECORD.get("loss_scaler_skips", 0) + int(skipped)
        return skipped

    deepspeed.initialize, training.train_loop = initialize, train_loop
    if real_skipped is not None:  # absent before DeepSpeed's own fp16 loss scaling was wired in
        _DeepSpeedSync.loss_scaler_skipped = loss_scaler_skipped


def main(results_path: Path, configs: list[str]) -> None:
    import lmforge.recipes.finetune as train_recipe
    import lmforge.recipes.run as training

    # fp16 runs on DeepSpeed's CPU accelerator where the CPU has fp16 kernels; lmforge itself refuses fp16 off CUDA.
    training.FP16_DEVICE_TYPES = ("cuda", "cpu")
    # Speed only, for many tiny runs in one process: a full gc.collect (over deepspeed's and torch's objects) and the
    # loss plot cost more than a tiny run's training; nothing checked here reads either.
    train_recipe.release_free_memory = lambda: None
    training.plot_losses = lambda *args, **kwargs: None
    _install_fused_stand_in()
    _install_gather_spy()
    _install_wiring_spies()
    results: dict[str, Any] = {}
    for path in configs:
        RECORD.clear()
        error = None
        try:
            fp16 = bool(yaml.safe_load(Path(path).read_text(encoding="utf-8")).get("fp16"))
            run_train(load_config(path, gpu=True if fp16 else None))  # fp16 validates as on a GPU machine
        except Exception as exc:  # noqa: BLE001 - recorded for the test, which names the config
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc()
        results[Path(path).stem] = {"error": error, **RECORD}
        if dist.get_rank() == 0:
            results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:  # one process: a group of one, as lmforge makes for itself (no launcher variables, LOCAL_RANK included)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        main(Path(sys.argv[1]), sys.argv[2:])
    finally:
        dist.destroy_process_group()
