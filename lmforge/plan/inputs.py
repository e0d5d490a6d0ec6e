"""What the planner needs from a config: one small typed object.

Read from the validated config (lmforge.config), never from raw YAML, so a key another part of
lmforge adds later plugs in here in one place: add a field and read it in :meth:`PlanInputs.from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lmforge.config import LmforgeConfig
from lmforge.config.checks import deepspeed_json, zero_settings
from lmforge.config.sections import DistributedSection, resolve_fsdp
from lmforge.errors import LmforgeError

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
    # Preference tuning (rl:): a frozen reference copy of the weights, held beside the policy (full fine-tuning of
    # dpo/ipo/kto without precompute_ref_log_probs; LoRA's reference is the base with the adapter off: no copy).
    reference_copy: bool = False
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
        if cfg.model.attn_implementation:
            values["attn_implementation"] = cfg.model.attn_implementation
        rl = cfg.rl
        if rl.rl in ("dpo", "ipo", "orpo", "simpo"):  # a pair is two rows (chosen, rejected) in one forward
            values["micro_batch_size"] = 2 * t.micro_batch_size
        # The frozen copy a full fine-tuning run holds: the DPO family's and KTO's reference (none with precomputed
        # log-probabilities), and GRPO's KL reference (beta != 0). With an adapter, the base is the reference.
        values["reference_copy"] = method == "full" and (
            (rl.rl in ("dpo", "ipo", "kto") and not rl.precompute_ref_log_probs) or (rl.rl == "grpo" and rl.trl.beta != 0))
        from_keys, notes = scale_out(cfg.distributed)
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


def scale_out(d: DistributedSection) -> tuple[dict[str, Any], list[str]]:
    """Sharding and offload as a run would do them: the DeepSpeed config's ZeRO settings (read as the checks and
    the engine read them), or the FSDP settings the engine resolves. The device count is torchrun's, so it
    comes from --num-gpus."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    if d.deepspeed:
        try:
            zero = zero_settings(deepspeed_json(d.deepspeed))
        except LmforgeError as exc:  # validate names the key; the estimate goes on without ZeRO
            notes.append(f"deepspeed: {exc.message}; planned without ZeRO")
            return out, notes
        out["sharding"] = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}.get(zero.stage, "zero3")
        if zero.offload_params:
            out["offload"] = "params"
        elif zero.offload_optimizer:
            out["offload"] = "optimizer"
        return out, notes
    fsdp = resolve_fsdp(d.fsdp, d.fsdp_config, d.fsdp_version, d.fsdp_final_state_dict_type)
    if fsdp is not None:
        out["sharding"] = "fsdp" if fsdp.reshard_after_forward else "zero2"  # no reshard: whole weights until backward
        if fsdp.offload_params:
            out["offload"] = "params"
    return out, notes
