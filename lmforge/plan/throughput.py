"""Time and cost: FLOPs per token, tokens/s from a device's peak at an MFU, the run's wall time and rental cost.

FLOPs per token count what lmforge computes: every matmul weight costs 2 FLOPs forward; backward
costs 2 more for the input gradient and, where the weight trains, 2 for its gradient (so 6·N for
full fine-tuning, 4·N_base + 6·N_lora under LoRA); the output head runs on labelled positions
only; attention adds 12·L·H·Q·S (scores and weighted sum, forward and backward, full S x S as
is the convention); gradient checkpointing repeats the forward (2·N + 4·L·H·Q·S more).

MFU here is model FLOPs over computed (padded) tokens divided by the device's dense peak.
`--measure` calibrates it on the machine at hand by running a few real training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError
from lmforge.plan.arch import ModelShape
from lmforge.plan.hardware import GPUS, Device, find_gpu
from lmforge.plan.inputs import PlanInputs
from lmforge.plan.memory import lora_target_names

DEFAULT_GPU_MFU = 0.35  # typical of bf16 training with SDPA on one data-center GPU; --measure or --mfu replace it
DEFAULT_CPU_MFU = 0.25
SCALING_EFFICIENCY = 0.9  # share of linear speed-up kept per extra data-parallel device (communication)
EXAMPLE_PRICES = Path(__file__).with_name("prices.example.yml")


def flops_per_token(inputs: PlanInputs, shape: ModelShape, width: float, labelled_share: float) -> float:
    """Model FLOPs per computed token (forward + backward, + recompute under gradient checkpointing).

    `width`: mean row length the attention sees; `labelled_share`: labelled positions per token.
    """
    params = shape.params()
    layer_matmul = sum(p.numel for p in params if p.kind == "linear")
    head = shape.vocab_size * shape.hidden_size
    attn = 12 * shape.num_layers * shape.q_dim * width
    if inputs.method == "full":
        flops = 6 * layer_matmul + 6 * head * labelled_share + attn
    else:
        targets = lora_target_names(inputs, shape)
        lora = sum(inputs.lora_r * (p.shape[0] + p.shape[1]) for p in params if p.kind == "linear" and p.module in targets)
        flops = 4 * layer_matmul + 6 * lora + 4 * head * labelled_share + attn
    if inputs.gradient_checkpointing:
        flops += 2 * layer_matmul + attn / 3
    return flops


@dataclass
class RunLength:
    """How much the run computes: tokens (real and padded) and steps."""

    steps: int
    micro_batches: int
    real_tokens: int
    computed_tokens: int  # padding included: what the device multiplies
    epochs: float
    source: str

    @property
    def padding_share(self) -> float:
        return 1 - self.real_tokens / max(self.computed_tokens, 1)


def run_length(inputs: PlanInputs, stats: Any | None) -> RunLength | None:
    """Steps and tokens from the data statistics, num_epochs and max_steps; None without data when unbounded."""
    accum = inputs.gradient_accumulation_steps
    if stats is None:
        if not inputs.max_steps:
            return None
        micro = inputs.max_steps * accum
        tokens = micro * inputs.micro_batch_size * inputs.sequence_len
        return RunLength(inputs.max_steps, micro, tokens, tokens, 0.0, "max_steps x full rows (no data read)")
    per_epoch_steps = max(1, math.ceil(stats.micro_batches_per_epoch / accum))
    steps = inputs.max_steps or max(1, math.ceil(per_epoch_steps * inputs.num_epochs))
    micro = steps * accum
    epochs = micro / max(stats.micro_batches_per_epoch, 1)
    return RunLength(steps, micro, int(stats.tokens * epochs), int(stats.padded_tokens_per_epoch * epochs), epochs,
                     f"{stats.examples:,} examples, {stats.tokens:,} tokens per epoch")


def hours(flops_total: float, device: Device, bf16: bool, mfu: float, count: int = 1) -> float:
    """Wall hours of `flops_total` on `count` devices at `mfu` of the device's dense peak."""
    peak = device.peak_flops(bf16)
    if peak <= 0 or mfu <= 0:
        return math.nan
    speedup = 1 if count <= 1 else count * SCALING_EFFICIENCY
    return flops_total / (peak * mfu * speedup) / 3600


@dataclass
class Prices:
    per_hour: dict[str, float]
    currency: str
    as_of: str
    source: str
    example: bool

    def for_gpu(self, device: Device) -> float | None:
        for name, price in self.per_hour.items():
            try:
                if find_gpu(name).name == device.name:
                    return price
            except LmforgeError:
                continue
        return None


def load_prices(path: str | None) -> Prices:
    """The price file: --prices FILE, else ~/.config/lmforge/prices.yml, else the shipped example."""
    candidates = [Path(path)] if path else [Path.home() / ".config" / "lmforge" / "prices.yml", EXAMPLE_PRICES]
    for candidate in candidates:
        if candidate.is_file():
            break
    else:
        raise LmforgeError("price file does not exist", where=f"--prices {path}", fix="see the README's price file format")
    try:
        data = yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LmforgeError(f"invalid YAML: {exc}", where=str(candidate)) from exc
    gpus = data.get("gpus")
    if not isinstance(gpus, dict) or not all(isinstance(v, int | float) and v >= 0 for v in gpus.values()):
        raise LmforgeError("'gpus' must map GPU names to prices per GPU-hour", where=str(candidate),
                           fix="gpus: {A100 80GB: 1.60, H100: 2.50, ...}")
    unknown = []
    for name in gpus:
        try:
            find_gpu(str(name))
        except LmforgeError:
            unknown.append(str(name))
    if unknown:
        raise LmforgeError(f"unknown GPU name(s) in the price file: {', '.join(unknown)}", where=str(candidate),
                           fix="use names from: " + ", ".join(g.name for g in GPUS))
    return Prices({str(k): float(v) for k, v in gpus.items()}, str(data.get("currency", "USD")), str(data.get("as_of", "?")),
                  str(candidate), candidate.resolve() == EXAMPLE_PRICES.resolve() or bool(data.get("example", False)))
