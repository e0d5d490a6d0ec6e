"""Training on several devices or machines: one process per device (a rank) under torchrun, with
torch's DDP or FSDP2 (``fully_shard``), or DeepSpeed's ZeRO engine on GPUs.

The shared training setup (:mod:`lmforge.recipes.run`) asks an :class:`Engine` for everything
that differs between one process and many, so a recipe reads the same either way:

- **data**: every rank walks one global order of micro-batches (the order one process would see)
  and takes every world_size-th; one optimizer step uses ``gradient_accumulation_steps`` of them on
  every rank. The global batch is micro_batch_size × gradient_accumulation_steps × ranks (as in
  axolotl and transformers), and N ranks with gradient_accumulation_steps k train exactly as one
  rank with k·N: the same micro-batches in every step, every labelled token weighing the same.
- **the step**: each rank scales its summed loss by ranks / (labelled tokens over all ranks), so
  the gradient average DDP and FSDP take is the gradient of the global per-token loss. The loss,
  token counts and a stop request are summed over ranks on the host (a gloo group), so every rank
  decides the same (NaN, early stopping, SIGTERM) without a device sync.
- **the model**: DDP keeps a full copy per rank; FSDP2 shards every decoder layer (and the rest at
  the root) over the ranks. Both see a small root module (:class:`lmforge.train.engine.RootModule`) whose forward runs any
  function on the model (the loss, an evaluation, generate), so lmforge's loss can run the model's
  backbone and head itself and every use of a sharded model goes through its root's hooks.
- **checkpoints**: DDP ranks hold the same weights, so rank 0 writes the usual checkpoint; FSDP
  writes the weights and optimizer state with torch.distributed.checkpoint (DCP: each rank its
  shards, readable by any number of ranks), and the final output is consolidated into plain
  safetensors (or a PEFT adapter) on rank 0. RNG states are saved per rank.
- **output**: only rank 0 prints, logs and writes (lmforge.recipes.console checks RANK too).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.config.sections import FsdpSettings, resolve_fsdp
from lmforge.errors import LmforgeError
from lmforge.train.engine import (
    Engine,
    RootModule,
    ShardedEngine,
    TorchEngine,
    call_root,
    env_rank,
    launched,
)

RNG_RANKS = "rng_ranks.pt"  # inside a checkpoint: every rank's RNG states (several ranks)


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes."""
    return env_rank() == 0


class DDPEngine(TorchEngine):
    """torch DistributedDataParallel: a full copy of the model per rank, gradients averaged every step."""

    name = "DDP"

    def __init__(self, cfg: LmforgeConfig) -> None:
        super().__init__(cfg)
        d = cfg.distributed
        self.ddp_options = {
            "find_unused_parameters": bool(d.ddp_find_unused_parameters),
            "broadcast_buffers": bool(d.ddp_broadcast_buffers),
            **({"bucket_cap_mb": d.ddp_bucket_cap_mb} if d.ddp_bucket_cap_mb else {}),
        }

    def for_training(self, model: Any, loss_fn: Callable, optimizer: Any) -> tuple[Any, Callable, Any]:
        from torch.nn.parallel import DistributedDataParallel

        if self.world_size == 1:
            return model, loss_fn, optimizer
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(RootModule(model), device_ids=ids, **self.ddp_options)
        return wrapped, call_root(wrapped, loss_fn), optimizer


class FSDPEngine(ShardedEngine):
    """torch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the ranks."""

    name = "FSDP2"
    needs_lockstep = True

    def __init__(self, cfg: LmforgeConfig, settings: FsdpSettings) -> None:
        super().__init__(cfg)
        self.settings = settings
        self.root: Any = None
        self.peft = False

    def describe(self) -> str:
        s = self.settings
        return (super().describe() + f"; {'full_shard' if s.reshard_after_forward else 'shard_grad_op'}"
                + (", parameters offloaded to CPU" if s.offload_params and self.device.type == "cuda" else "")
                + f", checkpoints {s.state_dict_type}")

    @property
    def load_device(self) -> torch.device:
        return torch.device("cpu")  # fully_shard moves each rank's shards to its device, never the whole model

    def prepare(self, model: Any, cfg: LmforgeConfig, bf16: bool, say: Callable[[str], None]) -> Any:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        s = self.settings
        self.peft = hasattr(model, "peft_config")
        if s.activation_checkpointing and not cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        precision = s.mixed_precision or ("bf16" if bf16 else "fp32")
        low = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}.get(precision)
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
        offload: OffloadPolicy = OffloadPolicy()
        if s.offload_params:
            if self.device.type == "cuda":
                offload = CPUOffloadPolicy(pin_memory=s.cpu_offload_pin_memory)
            else:
                say("fsdp offload_params: the weights are in CPU memory already on this machine; nothing to offload")
        from torch.distributed.device_mesh import init_device_mesh

        replicate = cfg.distributed.dp_replicate_size or 1
        # HSDP (dp_replicate_size > 1): each group of world/replicate ranks shards one copy of the weights, and the
        # groups replicate it (gradients reduce-scattered within a group, all-reduced across groups). Else a 1-D mesh.
        mesh = (init_device_mesh(self.device.type, (replicate, self.world_size // replicate),
                                 mesh_dim_names=("dp_replicate", "dp_shard")) if replicate > 1
                else init_device_mesh(self.device.type, (self.world_size,)))
        options = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
        groups = _shard_groups(model, s)
        for module in groups:
            fully_shard(module, reshard_after_forward=s.reshard_after_forward, **options)
        self.root = RootModule(model)
        fully_shard(self.root, reshard_after_forward=s.reshard_after_forward, **options)
        over = (f"over {self.world_size // replicate} rank(s), replicated in {replicate} groups (HSDP)" if replicate > 1
                else f"over {self.world_size} rank(s)")
        say(f"fsdp: {len(groups)} {'+'.join(sorted({type(m).__name__ for m in groups})) or 'no'} group(s) and the root sharded "
            f"{over}, {precision} weights in compute")
        return model

    def for_training(self, model: Any, loss_fn: Callable, optimizer: Any) -> tuple[Any, Callable, Any]:
        return self.root, call_root(self.root, loss_fn), optimizer

    def call(self, model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.root(fn, *args, **kwargs)

    # -- checkpoints: DCP shards
    state_folder = "dcp"  # torch.distributed.checkpoint: each rank its shards, readable by any number of ranks
    state_kind, state_writer, state_key = "sharded (DCP) weights", "an FSDP run", "fsdp"

    def _state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Frozen weights (a LoRA base) never change: the adapter's checkpoint skips them.
        options = StateDictOptions(ignore_frozen_params=self.peft)
        model_state, optim_state = get_state_dict(model, _optimizers_of(optimizer), options=options)
        return {"model": model_state, "optimizer": optim_state}

    @property
    def checkpoint_has_full_weights(self) -> bool:
        return self.settings.state_dict_type == "FULL_STATE_DICT"

    def save_state(self, model: Any, optimizer: Any, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(model, optimizer), checkpoint_id=str(folder))

    def load_state(self, model: Any, optimizer: Any, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state(model, optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, _optimizers_of(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=self.peft, strict=not self.peft))

    def trainable_state(self, model: Any) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def full_state(self, model: Any) -> dict[str, torch.Tensor]:
        """The consolidated weights (trainable only for an adapter) on rank 0's CPU; every rank must call."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.peft)
        return get_model_state_dict(model, options=options)


def _optimizers_of(optimizer: Any) -> Any:
    """The torch optimizers DCP saves: a composite optimizer's parts (MuonWithAdamW), else the optimizer itself."""
    return getattr(optimizer, "parts", optimizer)


def _shard_groups(model: Any, s: FsdpSettings) -> list[torch.nn.Module]:
    """The modules FSDP shards as one group each (decoder layers by default), innermost first."""
    if s.wrap == "NO_WRAP":
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if s.wrap == "SIZE_BASED_WRAP":
        chosen: list[torch.nn.Module] = []
        covered: set[int] = set()
        for module in reversed(list(base.modules())):  # children before parents
            inner = sum(p.numel() for p in module.parameters() if id(p) not in covered)
            if module is not base and inner >= (s.min_num_params or 0):
                chosen.append(module)
                covered |= {id(p) for p in module.parameters()}
        return chosen
    names = set(s.layer_classes or getattr(base, "_no_split_modules", None) or ())
    found = [m for m in base.modules() if type(m).__name__ in names]
    if not found:
        have = sorted({type(m).__name__ for m in base.modules() if "Layer" in type(m).__name__ or "Block" in type(m).__name__})
        raise LmforgeError(f"no module of class {', '.join(sorted(names)) or '(none named)'} in the model to shard",
                           where="fsdp_config.transformer_layer_cls_to_wrap",
                           fix=f"name the model's layer class ({', '.join(have[:4]) or 'see `lmforge inspect`'})")
    return found


# ----------------------------------------------------------------------------------------------- choosing


def check_shard_size(dp_shard_size: int | None, ranks: int, dp_replicate_size: int | None = None) -> None:
    """axolotl's dp_shard_size: the ranks one copy of the weights is sharded over. Without replicated groups
    (dp_replicate_size) that is every rank; with them (HSDP), dp_replicate_size × dp_shard_size must be every rank."""
    replicate = dp_replicate_size or 1
    if replicate > 1:
        shard = dp_shard_size or ranks // replicate
        if replicate * shard != ranks:
            raise LmforgeError(f"dp_replicate_size: {replicate} groups × dp_shard_size: {shard} is {replicate * shard} ranks "
                               f"and this run has {ranks}", where="dp_replicate_size",
                               fix=f"start {replicate * shard} ranks (lmforge train --nproc {replicate * shard}, or torchrun "
                               "across nodes), or change the sizes")
        return
    if dp_shard_size is not None and dp_shard_size != ranks:
        raise LmforgeError(f"dp_shard_size: {dp_shard_size} shards the weights over {dp_shard_size} ranks and this run has "
                           f"{ranks}; lmforge's FSDP2 shards over every rank without dp_replicate_size",
                           where="dp_shard_size", fix=f"start {dp_shard_size} ranks (lmforge train --nproc {dp_shard_size}, or "
                           "torchrun across nodes), set dp_replicate_size for replicated groups, or remove dp_shard_size")


def engine_for(cfg: LmforgeConfig, device: torch.device) -> Engine:
    """The engine a config and its launch ask for: FSDP2 or DeepSpeed when configured, DDP under several ranks."""
    d = cfg.distributed
    check_shard_size(d.dp_shard_size, int(os.environ["WORLD_SIZE"]) if launched() else 1, d.dp_replicate_size)
    fsdp = resolve_fsdp(d.fsdp, d.fsdp_config, d.fsdp_version, d.fsdp_final_state_dict_type)
    if d.deepspeed:
        from lmforge.train.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg)
    if fsdp is not None:
        return FSDPEngine(cfg, fsdp)
    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        return DDPEngine(cfg)
    return Engine(device)


# ----------------------------------------------------------------------------------------------- launching


def without_nproc(argv: list[str]) -> list[str]:
    """The command line with --nproc N / --nproc=N taken out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun on this machine with `nproc` ranks (a free port of its own), running the same lmforge command."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lmforge", *without_nproc(argv)]


def relaunch(nproc: int, argv: list[str], quiet: bool = False) -> None:
    """`lmforge train CONFIG --nproc N`: become torchrun with N ranks (signals reach it, and it passes them on).

    Returns (and the command runs in this process) under torchrun already, where the launcher decided
    the ranks, and for N = 1. `quiet` (no --verbose): torchrun's own banner is left out.
    """
    if nproc < 1:
        raise LmforgeError(f"--nproc {nproc}: the number of ranks must be at least 1", where="--nproc", fix="e.g. --nproc 2")
    if launched() or nproc == 1:
        return
    command = launch_command(nproc, argv)
    env = dict(os.environ)
    if quiet:
        # torchrun gives each rank OMP_NUM_THREADS=1 when it is unset, under a four-line banner saying so;
        # the same value set here, for torchrun and its ranks only, leaves the banner out.
        env.setdefault("OMP_NUM_THREADS", "1")
    os.execve(command[0], command, env)
