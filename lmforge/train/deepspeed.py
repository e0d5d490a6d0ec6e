"""DeepSpeed ZeRO (stages 1, 2, 3, with CPU offload) through DeepSpeed's own engine, on CUDA GPUs
(or, where deepspeed is installed and there is no CUDA, on its CPU accelerator with gloo: the tests).

``deepspeed: deepspeed_configs/zero2.json`` (axolotl's key and files) hands the step to
``deepspeed.initialize``: the engine partitions optimizer state (ZeRO-1), gradients (ZeRO-2) and
weights (ZeRO-3) over the ranks. lmforge fills the JSON's "auto" values from the config
(micro_batch_size, gradient_accumulation_steps, max_grad_norm, bf16), keeps its own optimizer,
schedule, data order and token-weighted loss, and calls the engine once per micro-batch
(``engine.backward`` and ``engine.step``, which steps the optimizer at the end of each step).

Traps guarded here: under ZeRO-3 every weight is partitioned, so a plain ``save_pretrained``
writes empty tensors (an adapter of zero-size LoRA matrices, the classic ZeRO-3 + LoRA bug):
lmforge gathers the weights first and refuses to publish an empty tensor. ZeRO-3 with a 4/8-bit
base is refused by the config checks before anything loads.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.config.checks import deepspeed_json, zero_settings
from lmforge.errors import LmforgeError
from lmforge.train.engine import RootModule, ShardedEngine, StepSync, call_root

DS_TAG = "state"


def require_deepspeed() -> Any:
    """The deepspeed module; on a machine without CUDA, with its CPU accelerator (gloo between ranks)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        if not torch.cuda.is_available():
            raise LmforgeError("DeepSpeed ZeRO runs on CUDA GPUs and this machine has none", where="deepspeed",
                               fix="use fsdp_config (FSDP2 shards the same way and runs on CPUs too), or pip install deepspeed "
                                   "for its CPU accelerator")
        raise LmforgeError("deepspeed is not installed", where="deepspeed", fix="pip install 'lmforge[deepspeed]' (or pip install deepspeed)")
    if not torch.cuda.is_available():
        # Its CPU accelerator (gloo without oneCCL); it builds a small C++ shared-memory op on first use.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def resolve_auto(ds: dict[str, Any], cfg: LmforgeConfig, world_size: int, bf16: bool, hidden_size: int | None,
                 fp16: bool = False) -> dict[str, Any]:
    """The DeepSpeed config with axolotl's "auto" values filled in from the lmforge config.

    fp16 turns on the JSON's fp16 section: DeepSpeed's engine does the dynamic loss scaling (and skips an
    overflowed step) itself, so the run has no torch GradScaler of its own (Engine.owns_loss_scaling).
    """
    t = cfg.training
    ds = copy.deepcopy(ds)
    fixed = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    for key, value in fixed.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise LmforgeError(f"the deepspeed config sets {key}: {ds[key]}, but the lmforge config means {value}",
                               where="deepspeed", fix=f"set {key}: auto in the JSON (lmforge fills it in)")
        ds[key] = value
    for name, on in (("bf16", bf16), ("fp16", fp16)):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    zero = ds.setdefault("zero_optimization", {})
    if hidden_size:
        autos = {"reduce_bucket_size": hidden_size * hidden_size, "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in autos.items():
            if zero.get(key) == "auto":
                zero[key] = value
    ds.setdefault("steps_per_print", 10**9)  # lmforge logs the steps itself
    # lmforge builds the optimizer itself (bitsandbytes' 8-bit AdamW and Lion, SGD, Adafactor, ...) and hands it to
    # deepspeed.initialize, which refuses every class outside its short ZeRO list (Adam, AdamW, Adagrad, its own)
    # unless this is set. ZeRO only shards the optimizer's param groups, and transformers and accelerate set it too
    # whenever they pass their own optimizer.
    ds["zero_allow_untested_optimizer"] = True
    return ds


class _DeepSpeedSync(StepSync):
    """The loop's view of the DeepSpeed engine: it owns backward, clipping and the optimizer step."""

    def __init__(self, engine: "DeepSpeedEngine") -> None:
        super().__init__(engine, engine.world_size)
        self.ds = engine
        self._overflowed = False

    def accumulating(self, model: Any, more_to_come: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # lmforge's scaling already weighs every token of the step over all ranks: no 1/accumulation on top.
        self.ds.ds_engine.backward(loss, scale_wrt_gas=False)
        skipped = self.ds.ds_engine.skipped_steps
        self.ds.ds_engine.step()  # a micro-step; at the step's last micro-batch: clip, optimizer step, zero grads
        self._overflowed |= self.ds.ds_engine.skipped_steps > skipped

    def clip(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        norm = self.ds.ds_engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def loss_scaler_skipped(self) -> bool:
        # fp16: an overflow makes the engine skip the update, lower its loss scale and report an inf norm;
        # that is loss scaling at work (as torch's GradScaler skips a step), not a diverged run.
        overflowed, self._overflowed = self._overflowed, False
        return overflowed and self.ds.ds_engine.fp16_enabled()


class _SteppedByEngine:
    """Stands in for the optimizer in the loop: the DeepSpeed engine has stepped it already."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()


class DeepSpeedEngine(ShardedEngine):
    name = "DeepSpeed"
    owns_loss_scaling = True  # fp16: the engine's dynamic loss scaler (the JSON's fp16 section)

    def __init__(self, cfg: LmforgeConfig) -> None:
        self.deepspeed = require_deepspeed()
        super().__init__(cfg)
        self.cfg = cfg
        self.config = deepspeed_json(cfg.distributed.deepspeed)
        self.stage = zero_settings(self.config).stage
        self.ds_engine: Any = None
        self.peft = False
        self._sync = _DeepSpeedSync(self)

    def describe(self) -> str:
        return super().describe() + f"; ZeRO stage {self.stage}"

    @property
    def needs_lockstep(self) -> bool:  # type: ignore[override]
        return self.stage == 3  # ZeRO-3 gathers each layer's weights in every forward: a collective

    @property
    def sync(self) -> StepSync:
        return self._sync  # the engine's step goes through it even on one rank

    @property
    def load_device(self) -> torch.device:
        return torch.device("cpu") if self.stage == 3 else self.device

    def prepare(self, model: Any, cfg: LmforgeConfig, bf16: bool, say: Callable[[str], None]) -> Any:
        self.peft, self.bf16 = hasattr(model, "peft_config"), bf16
        if cfg.training.optimizer == "adafactor" and self.stage >= 1:
            # Measured on the tiny Llama: after 2 steps the LoRA weights point ~0.88 (cosine) the way plain adafactor's do.
            say("note: adafactor under DeepSpeed ZeRO steps DeepSpeed's flat 1-D partitions of the weights, so its second "
                "moment is not factored (one full-size state per weight) and its update clipping spans a whole partition: "
                "the updates differ from adafactor without ZeRO")
        return model

    def for_training(self, model: Any, loss_fn: Callable, optimizer: Any) -> tuple[Any, Callable, Any]:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        config = resolve_auto(self.config, self.cfg, self.world_size, self.bf16, hidden, fp16=self.cfg.speed.fp16)
        # DeepSpeed reads LOCAL_RANK, which a launcher sets; `lmforge train` in one process (one GPU, ZeRO-3
        # offload) has none, and deepspeed.initialize would fail an assertion naming the launcher.
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
        self.ds_engine, _, _, _ = self.deepspeed.initialize(model=RootModule(model), optimizer=optimizer, config=config)
        return self.ds_engine, call_root(self.ds_engine, loss_fn), _SteppedByEngine(optimizer)

    def call(self, model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.stage == 3 and self.ds_engine is not None:
            return self.ds_engine(fn, *args, **kwargs)  # ZeRO-3 gathers each layer's weights around its forward
        return fn(model, *args, **kwargs)

    # -- checkpoints: DeepSpeed's own per-rank files
    state_folder = "deepspeed"
    state_kind, state_writer, state_key = "DeepSpeed state", "a deepspeed run", "deepspeed"

    def save_state(self, model: Any, optimizer: Any, folder: Path) -> None:
        self.ds_engine.save_checkpoint(str(folder), tag=DS_TAG)

    def load_state(self, model: Any, optimizer: Any, folder: Path) -> None:
        self.ds_engine.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)

    def full_state(self, model: Any, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Every weight (trainable only, for an adapter) whole, on rank 0's CPU (on every rank's with `every_rank`;
        the others get {}): gathered from the partitions under ZeRO-3. Every rank must call.

        ZeRO-3 gathers one module's own weights at a time (all ranks take part in each all-gather), so the
        peak is one layer's weights, never the whole model on every rank; only the ranks that keep a copy
        move it to CPU. DeepSpeed's _zero3_consolidated_16bit_state_dict works the same way, but gathers the
        frozen base weights of an adapter too, and broadcasts every module back after copying it.
        """
        keep = self.is_main or every_rank
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()  # a tied weight is saved once, under its first name (as named_parameters gives it)
        for prefix, module in model.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
                   if (p.requires_grad or not self.peft) and id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for _, p in own)
            gather = (self.deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None) if self.stage == 3
                      else contextlib.nullcontext())
            with gather:
                if keep:
                    state.update((n, p.detach().to("cpu", copy=True)) for n, p in own)
        empty = [n for n, t in state.items() if t.numel() == 0]
        if empty:
            raise LmforgeError(f"{len(empty)} weight(s) came out empty ({empty[0]}, ...): ZeRO-3 partitions were not gathered",
                               where="deepspeed", fix="this is an lmforge bug; the last checkpoint holds the full DeepSpeed state")
        return state

    def assert_finite(self, model: Any, step: int) -> None:
        pass  # ZeRO holds the weights in its partitions; a NaN step already stopped the loop (nan_policy: stop)

    def trainable_state(self, model: Any) -> dict[str, torch.Tensor]:
        return self.full_state(model, every_rank=True)  # the best weights: every rank restores them
