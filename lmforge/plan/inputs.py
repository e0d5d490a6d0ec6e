"""What the planner needs from a config: one small typed object.

Read from the validated config (lmforge.config), never from raw YAML, so a key another part of
lmforge adds later plugs in here in one place: add a field and read it in :meth:`PlanInputs.from_config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lmforge.config import LmforgeConfig

Method = Literal["full", "lora", "qlora"]
Sharding = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp"]
Offload = Literal["none", "optimizer", "params"]
SHARDINGS: tuple[str, ...] = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp")
OFFLOADS: tuple[str, ...] = ("none", "optimizer", "params")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class PlanInputs:
    """The settings that decide memory and time. Every field has the default a config gets."""

    method: Method = "lora"
    # Base weights: 4/8-bit through bitsandbytes (QLoRA), else the dtype lmforge picks (see memory.py).
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    double_quant: bool = True
    # Adapter
    lora_r: int = 8
    lora_targets: tuple[str, ...] | None = None  # module names; None: peft's default for the model type
    lora_target_linear: bool = False
    lora_dropout: float = 0.0
    dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    unfrozen_parameters: tuple[str, ...] = ()  # full fine-tuning of a subset (regexes from the name's start)
    # Optimizer and step
    optimizer: str = "adamw_torch"
    sgd_momentum: float = 0.0
    max_grad_norm: float | None = 1.0
    # Batch geometry
    sequence_len: int = 2048
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    sample_packing: bool = False
    train_on_inputs: bool = False
    gradient_checkpointing: bool = False
    bf16: bool | str = "auto"
    attn_implementation: str = "sdpa"
    # Scale-out (per-device memory): DDP, ZeRO-1/2/3 or FSDP2 over num_devices; CPU offload.
    sharding: Sharding = "none"
    num_devices: int = 1
    offload: Offload = "none"
    # Run length (time and cost)
    num_epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 42
    group_by_length: bool = True
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.sequence_len

    def with_(self, **changes: Any) -> "PlanInputs":
        """A copy with some settings changed (what-if questions)."""
        return replace(self, **changes)

    @classmethod
    def from_config(cls, cfg: LmforgeConfig, **overrides: Any) -> "PlanInputs":
        """Read the settings from a validated config; `overrides` (CLI flags) win."""
        a, t, d, q = cfg.adapter, cfg.training, cfg.data, cfg.quantization
        method: Method = "full" if not a.adapter else ("qlora" if (a.adapter == "qlora" or q.load_in_4bit or q.load_in_8bit) else "lora")
        targets = a.lora_target_modules
        if isinstance(targets, str):
            targets = [targets]
        values: dict[str, Any] = dict(
            method=method,
            load_in_4bit=q.load_in_4bit or (a.adapter == "qlora" and not q.load_in_8bit),
            load_in_8bit=q.load_in_8bit,
            double_quant=q.bnb_4bit_use_double_quant,
            lora_r=a.lora_r,
            lora_targets=tuple(targets) if targets else None,
            lora_target_linear=a.lora_target_linear,
            lora_dropout=a.lora_dropout,
            dora=a.peft_use_dora,
            modules_to_save=tuple(a.lora_modules_to_save or ()),
            unfrozen_parameters=tuple(t.unfrozen_parameters or ()),
            optimizer=t.optimizer,
            sgd_momentum=t.sgd_momentum,
            max_grad_norm=t.max_grad_norm,
            sequence_len=d.sequence_len,
            micro_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            sample_packing=d.sample_packing,
            train_on_inputs=d.train_on_inputs,
            gradient_checkpointing=t.gradient_checkpointing,
            bf16=t.bf16,
            num_epochs=t.num_epochs,
            max_steps=t.max_steps,
            seed=t.seed,
            group_by_length=t.group_by_length,
        )
        # Keys other parts of lmforge are adding; read when present, defaults otherwise.
        flat = cfg.flat()  # section-agnostic: whichever section a later key lands in
        attn = flat.get("attn_implementation")
        if attn:
            values["attn_implementation"] = str(attn)
        from_keys, notes = scale_out_from_keys(flat)
        values.update(from_keys)
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        if values.get("num_devices", 1) > 1 and values.get("sharding", "none") == "none":
            values["sharding"] = "ddp"
        if values.get("sharding", "none") != "none" or values.get("offload", "none") != "none":
            source = "the config's " + "/".join(sorted(from_keys)) if from_keys and not {"sharding", "offload"} & set(given) \
                else "plan's --strategy/--num-gpus/--offload"
            notes.append(f"scale-out modelled from {source}: DDP keeps a full replica per device plus gradient buckets; "
                         "ZeRO-1/2/3 shard optimizer states / + gradients / + weights; FSDP2 (fully_shard) as ZeRO-3 "
                         "with one layer gathered and the next prefetched; lmforge runs them under torchrun "
                         "(`lmforge train CONFIG --nproc N`)")
        return cls(**values, notes=tuple(notes))


def _deepspeed_json(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        import json
        from pathlib import Path

        try:
            return json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return None


def scale_out_from_keys(flat: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Sharding and offload from axolotl's scale-out keys, when the config carries them (`deepspeed`: a ZeRO
    JSON file or mapping; `fsdp` / `fsdp_config`). The device count is torchrun's, so it comes from --num-gpus."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    ds = flat.get("deepspeed")
    if ds:
        conf = _deepspeed_json(ds)
        if conf is None:
            notes.append(f"deepspeed: could not read {ds!r}; planned without ZeRO")
        else:
            zero = conf.get("zero_optimization") or {}
            stage = int(zero.get("stage", 0) or 0)
            out["sharding"] = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}.get(stage, "zero3")
            device_of = lambda key: str((zero.get(key) or {}).get("device", "none")).lower()  # noqa: E731
            if device_of("offload_param") in ("cpu", "nvme"):
                out["offload"] = "params"
            elif device_of("offload_optimizer") in ("cpu", "nvme"):
                out["offload"] = "optimizer"
    elif flat.get("fsdp") or flat.get("fsdp_config"):
        options = flat.get("fsdp") or []
        options = options.split() if isinstance(options, str) else list(options)
        conf = {str(k).removeprefix("fsdp_"): v for k, v in (flat.get("fsdp_config") or {}).items()}
        strategy = str(conf.get("sharding_strategy", "")).upper()
        keeps_gathered = "shard_grad_op" in options or strategy in ("SHARD_GRAD_OP", "3") \
            or str(conf.get("reshard_after_forward", "true")).lower() == "false"
        out["sharding"] = "zero2" if keeps_gathered else "fsdp"  # no reshard after forward: whole weights until backward
        if "offload" in options or str(conf.get("offload_params", "false")).lower() == "true":
            out["offload"] = "params"
    return out, notes


def matches_unfrozen(name: str, patterns: tuple[str, ...]) -> bool:
    """The rule lmforge.models.params.freeze_except applies: a regex matched from the name's start."""
    return any(re.match(p, name) for p in patterns)
