"""The engine interface every training run talks to, and what the several-rank engines share.

:class:`Engine` is one process on one device; :class:`TorchEngine` several ranks under
torch.distributed, and :class:`ShardedEngine` those whose weights live in shards. DDP and FSDP2
(:mod:`lmforge.train.distributed`) and DeepSpeed (:mod:`lmforge.train.deepspeed`) build on them
here, so neither engine module imports the other; :func:`lmforge.train.distributed.engine_for`
picks one. How the ranks split the data, the step and the checkpoints is told in
:mod:`lmforge.train.distributed`'s docstring.
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
from lmforge.errors import LmforgeError

DEFAULT_TIMEOUT_S = 1800


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process as one of several ranks."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


class RootModule(torch.nn.Module):
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


def call_root(root: torch.nn.Module, loss_fn: Callable) -> Callable:
    """The step loss for a model wrapped in a :class:`RootModule`: `loss_fn` run inside the root's forward."""

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

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sums over ranks on the host (the objective's logged metrics: each rank's sums and counts)."""
        return self.engine.host_sum(values)

    def accumulating(self, model: Any, more_to_come: bool) -> contextlib.AbstractContextManager:
        """DDP: no gradient all-reduce for micro-batches before the step's last."""
        if more_to_come and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """The gradient norm over all ranks, clipped to max_norm when set."""
        from lmforge.train.loop import clip_gradients

        return clip_gradients(params, max_norm)

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


class ShardedEngine(TorchEngine):
    """An engine whose weights live in shards (FSDP2, DeepSpeed ZeRO): saving gathers them on rank 0 first.

    A checkpoint keeps the shards in a folder of their own (`state_folder`), each rank writing its part;
    the subclass says how to write and read that folder (`save_state`, `load_state`).
    """

    state_folder: str  # inside a checkpoint: the folder of every rank's shards
    state_kind: str  # what the resume error says is missing ("DeepSpeed state")
    state_writer: str  # the kind of run that writes it ("a deepspeed run")
    state_key: str  # the config key to drop to resume a checkpoint without it ("deepspeed")

    def full_state(self, model: Any) -> dict[str, torch.Tensor]:
        """The consolidated weights (trainable only for an adapter) on rank 0's CPU; every rank must call."""
        raise NotImplementedError

    def save_state(self, model: Any, optimizer: Any, folder: Path) -> None:
        """Every rank writes its shards of the weights and optimizer state into `folder`."""
        raise NotImplementedError

    def load_state(self, model: Any, optimizer: Any, folder: Path) -> None:
        """Every rank reads its shards back from what `save_state` wrote."""
        raise NotImplementedError

    @property
    def checkpoint_has_full_weights(self) -> bool:
        """Whether a checkpoint also holds the consolidated weights (loadable without this engine)."""
        return True

    def checkpoint_weights(self, model: Any, optimizer: Any) -> Callable[[Path | None], None]:
        def write(tmp: Path | None) -> None:
            folder = Path(self.broadcast(str(tmp) if tmp is not None else None))  # rank 0's temporary folder
            self.save_state(model, optimizer, folder / self.state_folder)
            if self.checkpoint_has_full_weights:
                self.save_model_files(model, None, None, folder, with_tokenizer=False)

        return write

    def load_weights(self, model: Any, optimizer: Any) -> Callable[[Path], None]:
        def read(folder: Path) -> None:
            if not (folder / self.state_folder).is_dir():
                raise LmforgeError(f"{folder.name} holds no {self.state_kind}: it was not saved by {self.state_writer}",
                                   where=str(folder),
                                   fix=f"resume it without {self.state_key}, or start a new run in a new output_dir")
            self.load_state(model, optimizer, folder / self.state_folder)

        return read

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
