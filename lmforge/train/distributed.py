"""Training on several devices or machines: one process per device (a rank) under torchrun, with
torch's DDP or FSDP2 (``fully_shard``), or DeepSpeed's ZeRO engine on GPUs.

The shared training setup (:mod:`lmforge.recipes.training`) asks an :class:`Engine` for everything
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
  the root) over the ranks. Both see a small :class:`_Forward` root module whose forward runs any
  function on the model (the loss, an evaluation, generate), so lmforge's loss can run the model's
  backbone and head itself and every use of a sharded model goes through its root's hooks.
- **checkpoints**: DDP ranks hold the same weights, so rank 0 writes the usual checkpoint; FSDP
  writes the weights and optimizer state with torch.distributed.checkpoint (DCP: each rank its
  shards, readable by any number of ranks), and the final output is consolidated into plain
  safetensors (or a PEFT adapter) on rank 0. RNG states are saved per rank.
- **output**: only rank 0 prints, logs and writes (lmforge.recipes.console checks RANK too).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.config.sections import FsdpSettings, resolve_fsdp
from lmforge.errors import LmforgeError

DEFAULT_TIMEOUT_S = 1800
DCP_FOLDER = "dcp"  # inside a checkpoint: the sharded weights and optimizer state (FSDP)
RNG_RANKS = "rng_ranks.pt"  # inside a checkpoint: every rank's RNG states (several ranks)


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process as one of several ranks."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes."""
    return env_rank() == 0


class _Forward(torch.nn.Module):
    """The root module DDP and FSDP wrap: `root(fn, *args)` runs ``fn(model, *args)`` inside the root's forward.

    DDP syncs gradients and FSDP gathers the root's parameters only around a forward of the module
    they wrap; lmforge's loss calls the backbone and the output head itself, and evaluation and
    generation call other methods. Running them all as this module's forward keeps every call inside
    the hooks. The model is registered as ``model``, so state dicts of the inner model keep their names.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def _call_root(root: torch.nn.Module, loss_fn: Callable) -> Callable:
    def step_loss(module: Any, batch: Any) -> Any:
        return module(loss_fn, batch)

    return step_loss


# ----------------------------------------------------------------------------------------------- engines


class Engine:
    """One process on one device, the default: each method is what training does without scale-out."""

    name = "single process"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world_size, self.local_rank = 0, 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"{self.name}, device {self.device}"

    # -- coordination (no-ops in one process)
    def barrier(self) -> None:
        pass

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (preparing data, writing caches); the others run it after, reading them."""
        yield

    def close(self) -> None:
        pass

    # -- model
    owns_loss_scaling = False  # DeepSpeed: fp16 loss scaling is its engine's (its fp16 config section), not a GradScaler

    @property
    def load_device(self) -> torch.device:
        """Where the model is built before `prepare` places it."""
        return self.device

    def prepare(self, model: Any, cfg: LmforgeConfig, bf16: bool, say: Callable[[str], None]) -> Any:
        """The model ready to train here (sharded under FSDP); the recipe keeps using the returned object."""
        return model

    def for_training(self, model: Any, loss_fn: Callable, optimizer: Any) -> tuple[Any, Callable, Any]:
        """The module, loss function and optimizer the loop calls (DDP wraps the model here, DeepSpeed all three)."""
        return model, loss_fn, optimizer

    def call(self, model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args)`` where the model can run it (every rank calls, in the same order)."""
        return fn(model, *args, **kwargs)

    @property
    def sync(self) -> "StepSync | None":
        """What the loop sums over ranks; None in one process."""
        return None

    # -- evaluation
    def evaluate(self, model: Any, batches: Sequence[Any], settings: Any, loss_fn: Callable) -> float:
        from lmforge.train.loop import evaluate_sums

        total, count = evaluate_sums(model, iter(batches), settings, loss_fn)
        return total / max(count, 1)

    # -- state
    def assert_finite(self, model: Any, step: int) -> None:
        from lmforge.train.checkpoint import assert_finite

        assert_finite(model, step)

    def trainable_state(self, model: Any) -> dict[str, torch.Tensor]:
        from lmforge.train.checkpoint import trainable_state

        return trainable_state(model)

    def checkpoint_weights(self, model: Any, optimizer: Any) -> Callable[[Path], None] | None:
        """Writes weights and optimizer state into a checkpoint folder; None: checkpoint.py's own (full) files."""
        return None

    def load_weights(self, model: Any, optimizer: Any) -> Callable[[Path], None] | None:
        """Reads what `checkpoint_weights` wrote; None: checkpoint.py's own loader."""
        return None

    def rng_states(self) -> list[Any] | None:
        """Every rank's RNG states, on rank 0 (None in one process: rng.pt holds this one's)."""
        return None

    def save_model_files(self, model: Any, tokenizer: Any, config: dict[str, Any], folder: Path) -> None:
        """The trained weights (or adapter), tokenizer and config, consolidated, into `folder` (rank 0 writes;
        the others pass None and only take part in gathering the weights where they are sharded)."""
        from lmforge.train.checkpoint import save_model_files

        if folder is not None:
            save_model_files(model, tokenizer, config, folder)


@dataclass
class StepSync:
    """The loop's view of several ranks: sums on the host (gloo), and gradient-sync control."""

    engine: "TorchEngine"
    world_size: int

    def sum_counts(self, *values: int) -> list[int]:
        totals = self.engine.host_sum([float(v) for v in values])
        return [int(round(v)) for v in totals]

    def sum_loss(self, loss: float, stop: bool) -> tuple[float, bool]:
        """The step's summed loss over ranks, and whether any rank was asked to stop (decided alike everywhere)."""
        total, stops = self.engine.host_sum([loss, float(stop)])
        return total, stops > 0

    def accumulating(self, model: Any, more_to_come: bool) -> contextlib.AbstractContextManager:
        """DDP: no gradient all-reduce for micro-batches before the step's last."""
        if more_to_come and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """The gradient norm over all ranks, clipped to max_norm when set."""
        from lmforge.train.loop import _clip

        return _clip(params, max_norm)

    def loss_scaler_skipped(self) -> bool:
        """Whether the engine's own fp16 loss scaler skipped this step's update on an overflow (DeepSpeed)."""
        return False


class TorchEngine(Engine):
    """Several ranks under torch.distributed (the base of DDP and FSDP)."""

    def __init__(self, cfg: LmforgeConfig) -> None:
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        super().__init__(device)
        if cuda:
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=cfg.distributed.ddp_timeout or DEFAULT_TIMEOUT_S)
        self.created_group = not dist.is_initialized()
        if self.created_group:
            backend = "nccl" if cuda else "gloo"
            if launched():
                dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
            else:  # FSDP asked for in one process: a group of one
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Host-side sums (token counts, the loss, stop requests) go through gloo: no device sync for them.
        self.host_group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
        self._sync = StepSync(self, self.world_size)

    def describe(self) -> str:
        import torch.distributed as dist

        return f"{self.name} on {self.world_size} rank(s) ({dist.get_backend()}), device {self.device}"

    @property
    def sync(self) -> StepSync | None:
        return self._sync if self.world_size > 1 else None

    def host_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.host_group)
        return tensor.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.host_group)

    def broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=self.host_group)
        return holder[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()

    def evaluate(self, model: Any, batches: Sequence[Any], settings: Any, loss_fn: Callable) -> float:
        """Each rank evaluates every world_size-th batch; the sums over ranks give the same mean as one process."""
        from lmforge.train.loop import evaluate_sums

        batches = list(batches)
        mine = batches[self.rank::self.world_size]
        total, count = evaluate_sums(model, iter(mine), settings, loss_fn, call=self._eval_call)
        # FSDP gathers weights in every forward, so every rank runs as many as the busiest (results unused).
        spare = math.ceil(len(batches) / self.world_size) - len(mine)
        if spare and self.needs_lockstep and batches:
            evaluate_sums(model, iter(batches[:spare]), settings, loss_fn, call=self._eval_call)
        total, count = self.host_sum([total, float(count)])
        return total / max(count, 1)

    needs_lockstep = False  # FSDP: every forward is a collective

    def _eval_call(self, model: Any, fn: Callable, batch: Any) -> Any:
        return self.call(model, fn, batch)

    def assert_finite(self, model: Any, step: int) -> None:
        bad = ""
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if param.requires_grad and not bool(torch.isfinite(local).all()):
                bad = name
                break
        flags = self.host_sum([1.0 if bad else 0.0])
        if flags[0]:
            raise LmforgeError(f"weight {bad or '(on another rank)'} is not finite at step {step}; not saving it", where="training",
                               fix="lower learning_rate or set max_grad_norm; resume from the last checkpoint")

    def rng_states(self) -> list[Any] | None:
        import torch.distributed as dist

        from lmforge.train.checkpoint import rng_state

        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(rng_state(), gathered, dst=0, group=self.host_group)
        return gathered


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
        wrapped = DistributedDataParallel(_Forward(model), device_ids=ids, **self.ddp_options)
        return wrapped, _call_root(wrapped, loss_fn), optimizer


class ShardedEngine(TorchEngine):
    """An engine whose weights live in shards (FSDP2, DeepSpeed ZeRO): saving gathers them on rank 0 first."""

    def full_state(self, model: Any) -> dict[str, torch.Tensor]:
        """The consolidated weights (trainable only for an adapter) on rank 0's CPU; every rank must call."""
        raise NotImplementedError

    def save_model_files(self, model: Any, tokenizer: Any, config: dict[str, Any] | None, folder: Path | None,
                         with_tokenizer: bool = True) -> None:
        import yaml

        from lmforge.atomic import write_text

        weights = self.full_state(model)
        if not self.is_main or folder is None:
            return
        from lmforge.models.adapters import save_weights

        save_weights(model, folder, state_dict=weights)
        if with_tokenizer and tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if config is not None:
            write_text(folder / "config.yml", yaml.safe_dump(config, sort_keys=False))


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

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        options = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
        groups = _shard_groups(model, s)
        for module in groups:
            fully_shard(module, reshard_after_forward=s.reshard_after_forward, **options)
        self.root = _Forward(model)
        fully_shard(self.root, reshard_after_forward=s.reshard_after_forward, **options)
        say(f"fsdp: {len(groups)} {'+'.join(sorted({type(m).__name__ for m in groups})) or 'no'} group(s) and the root sharded "
            f"over {self.world_size} rank(s), {precision} weights in compute")
        return model

    def for_training(self, model: Any, loss_fn: Callable, optimizer: Any) -> tuple[Any, Callable, Any]:
        return self.root, _call_root(self.root, loss_fn), optimizer

    def call(self, model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.root(fn, *args, **kwargs)

    # -- checkpoints: DCP shards
    def _state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Frozen weights (a LoRA base) never change: the adapter's checkpoint skips them.
        options = StateDictOptions(ignore_frozen_params=self.peft)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state}

    def checkpoint_weights(self, model: Any, optimizer: Any) -> Callable[[Path], None]:
        import torch.distributed.checkpoint as dcp

        def write(tmp: Path | None) -> None:
            folder = Path(self.broadcast(str(tmp) if tmp is not None else None))
            dcp.save(self._state(model, optimizer), checkpoint_id=str(folder / DCP_FOLDER))
            if self.settings.state_dict_type == "FULL_STATE_DICT":
                self.save_model_files(model, None, None, folder, with_tokenizer=False)

        return write

    def load_weights(self, model: Any, optimizer: Any) -> Callable[[Path], None]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        def read(folder: Path) -> None:
            if not (folder / DCP_FOLDER).is_dir():
                raise LmforgeError(f"{folder.name} holds no sharded (DCP) weights: it was not saved by an FSDP run",
                                   where=str(folder), fix="resume it without fsdp, or start a new run in a new output_dir")
            state = self._state(model, optimizer)
            dcp.load(state, checkpoint_id=str(folder / DCP_FOLDER))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(ignore_frozen_params=self.peft, strict=not self.peft))

        return read

    def trainable_state(self, model: Any) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def full_state(self, model: Any) -> dict[str, torch.Tensor]:
        """The consolidated weights (trainable only for an adapter) on rank 0's CPU; every rank must call."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.peft)
        return get_model_state_dict(model, options=options)


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


def engine_for(cfg: LmforgeConfig, device: torch.device) -> Engine:
    """The engine a config and its launch ask for: FSDP2 or DeepSpeed when configured, DDP under several ranks."""
    d = cfg.distributed
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
