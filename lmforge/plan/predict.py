"""Config → model shape, settings and data → memory on a device. What `lmforge plan` and `lmforge train` share."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import LmforgeConfig
from lmforge.plan.arch import ModelShape, read_shape, shape_from_config
from lmforge.plan.data import DataStats, data_stats, tokenizer_without_weights
from lmforge.plan.hardware import Device, cpu_device
from lmforge.plan.inputs import PlanInputs
from lmforge.plan.memory import Batch, MemoryEstimate, estimate


@dataclass
class RunPlan:
    inputs: PlanInputs
    shape: ModelShape
    data: DataStats | None
    candidates: list[Batch]
    memory: MemoryEstimate
    notes: list[str] = field(default_factory=list)

    def on(self, device: Device, inputs: PlanInputs | None = None) -> MemoryEstimate:
        """The same run on another device (or with changed settings)."""
        return peak_over_batches(inputs or self.inputs, self.shape, device, self.candidates_for(inputs))

    def candidates_for(self, inputs: PlanInputs | None) -> list[Batch]:
        """The batches to evaluate: the run's, re-walked from the same examples when a change alters the geometry."""
        if inputs is None or _same_geometry(inputs, self.inputs):
            return self.candidates
        if not self.data:
            return [Batch.assumed(inputs)]
        # the same tokens in the new micro-batches (smaller micro-batches with more accumulation: more of them)
        micro = max(1, self.data.micro_batches * self.inputs.micro_batch_size // inputs.micro_batch_size)
        return self.data.candidates_for(inputs.micro_batch_size, inputs.sequence_len, inputs.sample_packing, inputs.seed,
                                        inputs.group_by_length, micro)


def _same_geometry(a: PlanInputs, b: PlanInputs) -> bool:
    keys = ("sequence_len", "micro_batch_size", "sample_packing", "train_on_inputs", "group_by_length", "seed")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def peak_over_batches(inputs: PlanInputs, shape: ModelShape, device: Device, candidates: list[Batch]) -> MemoryEstimate:
    """The estimate for the batch of the run that needs the most memory."""
    estimates = [estimate(inputs, shape, device, batch) for batch in candidates or [Batch.assumed(inputs)]]
    return max(estimates, key=lambda e: e.peak_bytes)


def model_shape(cfg: LmforgeConfig) -> ModelShape:
    """The model's shape from base_model (or base_model_config), or from model_config when pretraining from scratch."""
    spec = cfg.pretrain.model_config_
    if cfg.model.base_model is None and spec is not None:
        from lmforge.models.build import build_config

        # The vocabulary is the tokenizer's: the one tokenizer_train will make, else the configured tokenizer's.
        train = cfg.pretrain.tokenizer_train
        vocab = train.vocab_size if train else len(tokenizer_without_weights(cfg))
        config = build_config(spec.architecture, vocab, spec.preset, spec.overrides(), cfg.pretrain.objective)
        return shape_from_config(config.to_dict(), "model_config")
    # base_model_config: where the model config is read from instead of base_model (as models.load.load_model reads it)
    return read_shape(cfg.model.base_model or "", cfg.model.base_model_config)


def current_device(device_type: str) -> Device:
    if device_type == "cuda":
        import torch

        from lmforge.device import cuda_supports_bf16

        props = torch.cuda.get_device_properties(0)
        return Device(props.name, props.total_memory / 2**30, cuda_supports_bf16(0), 0.0, 0.0, kind="cuda")
    return cpu_device()


def predict_run(cfg: LmforgeConfig, device_type: str = "cpu", device: Device | None = None, *, prepared: Any = None,
                use_data: bool = True, inputs: PlanInputs | None = None, micro_batches: int | None = None) -> RunPlan:
    """Plan `cfg` on `device` (default: this machine's CPU or GPU)."""
    inputs = inputs or PlanInputs.from_config(cfg)
    shape = model_shape(cfg)
    notes: list[str] = []
    stats: DataStats | None = None
    if use_data and (prepared is not None or cfg.data.datasets):
        try:
            stats = data_stats(cfg, micro_batches=micro_batches, prepared=prepared)
        except Exception as exc:  # noqa: BLE001 (no tokenizer offline, unreadable data: plan without it)
            # shortened at a word boundary: a note cut mid-word ("to l)") reads as a bug
            reason = textwrap.shorten(str(exc), 160, placeholder=" ...")
            notes.append(f"data not read ({type(exc).__name__}: {reason}); batches assumed full")
    candidates = stats.candidates if stats else [Batch.assumed(inputs)]
    target = device or current_device(device_type)
    memory = peak_over_batches(inputs, shape, target, candidates)
    return RunPlan(inputs, shape, stats, candidates, memory, notes)
