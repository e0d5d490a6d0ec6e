"""What to change when the run does not fit: each change re-estimated, ranked by the memory it saves.

Nothing here is canned: every suggestion is the same estimate with one setting changed, on the
device the user asked about. A greedy chain then stacks the best changes until the run fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lmforge.plan.hardware import Device
from lmforge.plan.inputs import PlanInputs
from lmforge.plan.memory import MemoryEstimate

MAX_DEVICES = 64

Estimator = Callable[[PlanInputs, Device], MemoryEstimate]


@dataclass
class Change:
    what: str  # what to write in the config, e.g. "gradient_checkpointing: true"
    why: str
    inputs: PlanInputs
    estimate: MemoryEstimate
    saved_bytes: int
    fits: bool
    devices: int = 1

    def as_dict(self) -> dict:
        return {"change": self.what, "why": self.why, "peak_gb": round(self.estimate.peak_gib, 2),
                "saves_gb": round(self.saved_bytes / 2**30, 2), "fits": self.fits, "devices": self.devices}


def candidate_changes(inputs: PlanInputs) -> list[tuple[str, str, PlanInputs]]:
    """Single-setting changes that lower memory, each with the config lines to write."""
    out: list[tuple[str, str, PlanInputs]] = []
    if inputs.method != "qlora":
        r = inputs.lora_r if inputs.method == "lora" else 16
        targets = "" if inputs.method == "lora" else ", lora_target_linear: true"
        out.append((f"adapter: qlora, load_in_4bit: true{', lora_r: 16' if inputs.method == 'full' else ''}{targets}",
                    "hold the frozen base in 4-bit NF4 and train a LoRA adapter",
                    inputs.with_(method="qlora", load_in_4bit=True, load_in_8bit=False, lora_r=r,
                                 lora_target_linear=inputs.lora_target_linear or inputs.method == "full")))
    if inputs.method == "full":
        out.append(("adapter: lora, lora_r: 16, lora_target_linear: true", "freeze the base, train a LoRA adapter",
                    inputs.with_(method="lora", lora_r=16, lora_target_linear=True)))
    if not inputs.gradient_checkpointing:
        out.append(("gradient_checkpointing: true", "keep only each layer's input, recompute the rest in backward (~30% slower)",
                    inputs.with_(gradient_checkpointing=True)))
    if inputs.micro_batch_size > 1:
        mb = max(1, inputs.micro_batch_size // 2)
        accum = inputs.gradient_accumulation_steps * inputs.micro_batch_size // mb
        out.append((f"micro_batch_size: {mb}, gradient_accumulation_steps: {accum}",
                    "same batch per optimizer step in smaller pieces", inputs.with_(micro_batch_size=mb, gradient_accumulation_steps=accum)))
    if inputs.optimizer in ("adamw_torch", "adamw", "adamw_hf", "adamw_torch_fused"):
        out.append(("optimizer: adamw_bnb_8bit", "8-bit AdamW states (bitsandbytes)", inputs.with_(optimizer="adamw_bnb_8bit")))
    if inputs.offload == "none":
        out.append(("offload the optimizer to CPU (deepspeed: ZeRO with offload_optimizer: {device: cpu})",
                    "optimizer states (and fp32 master weights) in host RAM; DeepSpeed's engine, on CUDA GPUs",
                    inputs.with_(offload="optimizer")))
    if inputs.sequence_len > 256:
        seq = inputs.sequence_len // 2
        out.append((f"sequence_len: {seq}", "shorter rows (longer examples get truncated: check `lmforge data report`)",
                    inputs.with_(sequence_len=seq)))
    return out


def _min_devices(inputs: PlanInputs, device: Device, estimator: Estimator, strategy: str) -> tuple[int, MemoryEstimate] | None:
    """The fewest devices (2..MAX_DEVICES) the run fits on under `strategy`: doubling, then bisecting the last gap
    (per-device memory only falls as devices are added)."""

    def on(n: int) -> MemoryEstimate:
        return estimator(inputs.with_(sharding=strategy, num_devices=n), device)

    low, high = 1, 2
    while high <= MAX_DEVICES and on(high).peak_bytes > device.memory_bytes:
        low, high = high, high * 2
    if high > MAX_DEVICES:
        return None
    while high - low > 1:  # `low` does not fit, `high` does
        mid = (low + high) // 2
        low, high = (low, mid) if on(mid).peak_bytes <= device.memory_bytes else (mid, high)
    return high, on(high)


def devices_needed(inputs: PlanInputs, device: Device, estimator: Estimator) -> tuple[int, str, MemoryEstimate] | None:
    """How many of `device` the run needs: 1 as configured, else the fewest under FSDP/ZeRO-3 sharding."""
    est = estimator(inputs, device)
    if est.peak_bytes <= device.memory_bytes:
        return max(1, inputs.num_devices), inputs.sharding, est
    found = _min_devices(inputs, device, estimator, "fsdp")
    return (found[0], "fsdp", found[1]) if found else None


def rank_changes(inputs: PlanInputs, device: Device, estimator: Estimator) -> list[Change]:
    """Every single change, re-estimated on `device`, biggest saving first (sharding last: it needs more devices)."""
    base = estimator(inputs, device).peak_bytes
    changes = []
    for what, why, changed in candidate_changes(inputs):
        est = estimator(changed, device)
        changes.append(Change(what, why, changed, est, base - est.peak_bytes, est.peak_bytes <= device.memory_bytes))
    changes = [c for c in changes if c.saved_bytes > 0]
    changes.sort(key=lambda c: -c.saved_bytes)
    if inputs.sharding not in ("zero3", "fsdp"):
        found = _min_devices(inputs, device, estimator, "fsdp")
        if found:
            n, est = found
            changes.append(Change(f"FSDP2 / ZeRO-3 over {n} x {device.name} (fsdp_config or deepspeed zero3, torchrun)",
                                  "shard weights, gradients and optimizer states; run with `lmforge train CONFIG --nproc N` or torchrun",
                                  inputs.with_(sharding="fsdp", num_devices=n), est, base - est.peak_bytes, True, n))
    return changes


def path_to_fit(inputs: PlanInputs, device: Device, estimator: Estimator, max_changes: int = 4) -> list[Change]:
    """Stack the single-device changes that save the most until the run fits on one `device` (empty if it cannot)."""
    steps: list[Change] = []
    current = inputs
    for _ in range(max_changes):
        if estimator(current, device).peak_bytes <= device.memory_bytes:
            return steps
        options = [c for c in rank_changes(current, device, estimator) if c.devices == 1 and "offload" not in c.what]
        if not options:
            return []
        best = next((c for c in options if c.fits), options[0])
        steps.append(best)
        current = best.inputs
    return steps if estimator(current, device).peak_bytes <= device.memory_bytes else []
