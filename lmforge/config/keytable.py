"""Every axolotl config key, and what lmforge does with it: the one table.

Users bring axolotl configs unchanged, so no key axolotl defines is "unknown" here. Each key
(top-level, or inside a ``datasets:`` / ``pretraining_dataset:`` entry, or a plugin named in
``plugins:``) has one row, in one of four classes:

- implemented: a field of lmforge's schema (``sections.py``), read by the modules the row names
  (``tests/test_keytable.py`` checks that they do);
- notice: accepted, and ``lmforge validate`` says in one line why it changes nothing here;
- not supported yet: refused by name, naming the nearest supported key; ``issue`` says which open
  issue brings it (such rows are the plan: that issue flips the class and wires the behaviour);
- out of scope: refused by name, with the reason.

A row is one call of ``done`` / ``note`` / ``later`` / ``out`` (or ``alias``); keys whose rows would differ only in
the name share one ``*each(done, ("lora_r", "lora_alpha"), ADAPTERS)`` call: a new key read by the same module, or
refused for the same reason, is one more name in that list; a key with anything of its own is its own row.

A key set to its "off" value (false, null, 0, empty) asks for nothing and is accepted quietly,
unless the row says otherwise (``quiet``). Some rows accept a value now because on this machine
it changes nothing (``cpu``: a GPU-only kernel on a machine without a GPU) or because it asks for
exactly what lmforge does anyway (``same``); the rest of that row's values are refused.

The table was drawn up from axolotl's schema (``src/axolotl/utils/schemas/*.py`` and
``src/axolotl/integrations/*/args.py``) and its ``examples/`` folder; ``tests/data/axolotl_keys.txt``
lists the keys of the axolotl commit it was checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Kind(str, Enum):
    IMPLEMENTED = "implemented"
    NOTICE = "notice"
    NOT_YET = "not supported yet"
    OUT_OF_SCOPE = "out of scope"


# Where a key is written.
TOP = "top"
DATASET = "datasets[]"  # an entry of datasets: or test_datasets:
DATASET_TYPE = "datasets[].type"  # keys of a user-defined `type:` mapping
PRETRAINING = "pretraining_dataset[]"
SPECIAL_TOKENS = "special_tokens"
PLUGIN = "plugins[]"  # a plugin named in plugins:, by its module (axolotl.integrations.<name>.<Class>)
TOKENIZER_TRAIN = "tokenizer_train"  # lmforge's own block (no axolotl keys)
MODEL_CONFIG = "model_config"  # lmforge's own block for a model built from scratch
QAT = "qat"  # keys of qat: (quantization-aware training)
TRL = "trl"  # axolotl's trl: block (GRPO's settings)
SCOPES = (TOP, DATASET, DATASET_TYPE, PRETRAINING, SPECIAL_TOKENS, PLUGIN, TOKENIZER_TRAIN, MODEL_CONFIG, QAT, TRL)


@dataclass(frozen=True)
class Verdict:
    """What a rule decided for one value: accept quietly, with a notice, or refuse."""

    kind: Kind | None  # None: accepted quietly (the value asks for nothing)
    text: str = ""
    nearest: str | None = None
    issue: int | None = None
    value: Any = None  # with `replaces`: the value lmforge uses instead (axolotl's name for the same thing)
    replaces: bool = False
    rename: str | None = None  # the lmforge key the value goes to instead (one spelling, two meanings: model_config)


QUIET = Verdict(None)


@dataclass(frozen=True)
class Facts:
    """What a value rule may look at besides the value: the mapping it sits in, the whole config, the machine."""

    here: Mapping[str, Any]
    config: Mapping[str, Any]
    gpu: bool


Rule = Callable[[Any, Facts], Verdict | None]


@dataclass(frozen=True)
class Key:
    name: str  # the key as written; a trailing * matches a family (swanlab_*)
    kind: Kind
    text: str = ""  # notice: the notice; refusals: why; implemented: empty (the field's description says it)
    scope: str = TOP
    readers: tuple[str, ...] = ()  # implemented: modules (lmforge/...) that read the field
    nearest: str | None = None  # not supported yet: the nearest supported key or command
    issue: int | None = None  # not supported yet: the open issue that brings it
    quiet: tuple[Any, ...] | None = None  # values that ask for nothing (default: false, null, 0, empty)
    same: Mapping[Any, str] = field(default_factory=dict)  # value → notice: values that ask for what lmforge does
    cpu: str | None = None  # notice used on a machine without a GPU (GPU-only kernels and modes)
    only_with: str | None = None  # a key this one only modifies: while that one is off, this one changes nothing
    rename: str | None = None  # implemented by writing the value to this lmforge key (SPREAD: its entries are keys)
    convert: Callable[[Any, Facts], Any] | None = None  # the value to write under `rename`
    rule: Rule | None = None  # value-dependent decisions the fields above cannot express

    @property
    def planned(self) -> bool:
        return self.kind is Kind.NOT_YET and self.issue is not None


def done(name: str, *readers: str, scope: str = TOP, rule: Rule | None = None) -> Key:
    """A key lmforge implements: a schema field read by `readers`."""
    return Key(name, Kind.IMPLEMENTED, scope=scope, readers=readers, rule=rule)


SPREAD = "*"


def alias(name: str, target: str, text: str, scope: str = TOP, rule: Rule | None = None,
          convert: Callable[[Any, Facts], Any] | None = None) -> Key:
    """Another spelling of implemented keys (axolotl's older or remapped name): its value moves to `target`."""
    return Key(name, Kind.IMPLEMENTED, text, scope=scope, rename=target, rule=rule, convert=convert)


def note(name: str, text: str, scope: str = TOP, quiet: tuple[Any, ...] | None = None, only_with: str | None = None,
         rule: Rule | None = None) -> Key:
    """Accepted with a notice: it changes nothing in what lmforge produces."""
    return Key(name, Kind.NOTICE, text, scope=scope, quiet=quiet, only_with=only_with, rule=rule)


def later(name: str, text: str, nearest: str | None = None, issue: int | None = None, *, scope: str = TOP,
          quiet: tuple[Any, ...] | None = None, same: Mapping[Any, str] | None = None, cpu: str | None = None,
          only_with: str | None = None, rule: Rule | None = None) -> Key:
    """Not supported yet: refused by name, naming the nearest supported key (and the issue that brings it)."""
    return Key(name, Kind.NOT_YET, text, scope=scope, nearest=nearest, issue=issue, quiet=quiet, same=same or {},
               cpu=cpu, only_with=only_with, rule=rule)


def out(name: str, text: str, scope: str = TOP, quiet: tuple[Any, ...] | None = None, nearest: str | None = None,
        only_with: str | None = None, same: Mapping[Any, str] | None = None, rule: Rule | None = None) -> Key:
    """Out of scope: refused by name with the reason."""
    return Key(name, Kind.OUT_OF_SCOPE, text, scope=scope, quiet=quiet, nearest=nearest, only_with=only_with, same=same or {},
               rule=rule)


def each(row: Callable[..., Key], names: Iterable[str], *args: Any, **kwargs: Any) -> tuple[Key, ...]:
    """The same row for several keys: ``*each(done, ("lora_r", "lora_alpha"), ADAPTERS)`` is
    ``done("lora_r", ADAPTERS), done("lora_alpha", ADAPTERS)`` (one reader, one reason, one list to extend)."""
    return tuple(row(name, *args, **kwargs) for name in names)


def unoffered_optimizer(optimizer: str, *names: str) -> tuple[Key, ...]:
    """Keys only `optimizer` reads: lmforge does not offer it, so they change nothing (a notice)."""
    return each(note, names, f"only used by optimizer {optimizer}, which lmforge does not offer (the optimizer key refuses it)")


# --- value rules ------------------------------------------------------------------------------------------------

NO_GPU = "this machine has no GPU"
SDPA = "attention runs as torch sdpa (the same math; packed rows stay apart through a block-diagonal mask)"
# Backends that compute exact attention, only faster: on a machine without a GPU none of them can run.
EXACT_GPU_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", "xformers")
LEGACY_ATTENTION_SWITCHES = {
    "flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "xformers_attention": "xformers",
    "flex_attention": "flex_attention", "sage_attention": "sage", "eager_attention": "eager",
}


def attention(value: Any, facts: Facts) -> Verdict | None:
    """flash_attention_2/3, flex_attention, xformers (exact attention, GPU only) run as sdpa, with a notice, on a
    machine without a GPU; on a GPU flash_attention_3, xformers and Hub kernels are refused (nearest
    flash_attention_2); sage and fp8 refused (they change the result)"""
    exact_gpu = value in EXACT_GPU_ATTENTION or (isinstance(value, str) and value.startswith("kernels-community/")
                                                  and ("flash" in value or "flex" in value))
    if exact_gpu and not facts.gpu:
        return Verdict(Kind.NOTICE, f"{value} needs a CUDA GPU and {NO_GPU}: {SDPA}", value="sdpa", replaces=True)
    if value in ("sage", "fp8"):
        return Verdict(Kind.NOT_YET, f"{value} attention quantizes queries and keys, which changes the result",
                       nearest="attn_implementation: sdpa")
    if exact_gpu and value not in ("flash_attention_2", "flex_attention"):
        return Verdict(Kind.NOT_YET, f"attn_implementation: {value}", nearest="attn_implementation: flash_attention_2")
    return None


def legacy_attention(switch: str) -> Rule:
    """axolotl's older boolean switches (flash_attention: true, ...) mean attn_implementation: <backend>."""
    backend = LEGACY_ATTENTION_SWITCHES[switch]

    def rule(value: Any, facts: Facts) -> Verdict | None:
        """true means attn_implementation: %s (decided as that is)"""
        if value in (None, False):
            return QUIET
        chosen = facts.config.get("attn_implementation")
        if chosen not in (None, backend):
            return Verdict(Kind.NOT_YET, f"{switch}: true asks for {backend}, but attn_implementation is {chosen}",
                           nearest="attn_implementation alone")
        return attention(backend, facts)

    rule.__doc__ = rule.__doc__ % backend  # type: ignore[operator]
    return rule


def flex_compile(value: Any, facts: Facts) -> Verdict | None:
    """a notice while flex attention is not chosen, or on a machine without a GPU (it runs as sdpa there)"""
    chosen = facts.config.get("attn_implementation") == "flex_attention" or facts.config.get("flex_attention") is True
    if not chosen:
        return Verdict(Kind.NOTICE, "only used with attn_implementation: flex_attention, which is not chosen: nothing changes")
    if not facts.gpu:
        return Verdict(Kind.NOTICE, f"flex attention needs a GPU and {NO_GPU}: {SDPA}, so nothing is compiled")
    return None


FLOAT16_AS_FP16 = ("float16: true (axolotl: float16 weights trained without mixed precision) trains as fp16: true does: "
                   "float16 compute under autocast with fp32 master weights and a loss scaler, so updates smaller than "
                   "a float16 weight's rounding step are kept rather than lost")


def float16_weights(value: Any, facts: Facts) -> Verdict | None:
    """true: trained as fp16: true (float16 autocast, fp32 master weights, loss scaling), with a notice"""
    if value is True:
        return Verdict(Kind.NOTICE, FLOAT16_AS_FP16, rename="fp16", value=True, replaces=True)
    return None


def fp16(value: Any, facts: Facts) -> Verdict | None:
    """true on a machine without a GPU: float16 CPU autocast with torch's CPU GradScaler, with a notice;
    false or empty beside float16: true is turned on by it (axolotl writes both, fp16: false beside float16: true)"""
    if value is not True and facts.config.get("float16") is True:
        return Verdict(Kind.NOTICE, "fp16 is turned on by float16: true (see its notice)", value=True, replaces=True)
    if value is True and not facts.gpu:
        return Verdict(Kind.NOTICE, f"{NO_GPU}: fp16 runs as float16 CPU autocast with torch's CPU GradScaler (fp32 "
                       "master weights); CPUs without AVX512-FP16 or AMX-FP16 compute it slower than fp32")
    return None


def tf32(value: Any, facts: Facts) -> Verdict | None:
    """notice for true on a machine without a GPU (TF32 is a CUDA matmul mode)"""
    if value is True and not facts.gpu:
        return Verdict(Kind.NOTICE, f"TF32 is a mode of CUDA matmuls and {NO_GPU}: nothing changes")
    return None


def bfloat16(value: Any, facts: Facts) -> Verdict | None:
    """notice for true beside bf16: true and an adapter (the frozen base weights load in bf16 there already)"""
    if value is True and facts.config.get("bf16") is True and facts.config.get("adapter"):
        return Verdict(Kind.NOTICE, "with bf16: true and an adapter lmforge already loads the frozen base weights in bf16 "
                       "(the adapter's own weights stay fp32 master weights): nothing changes")
    return None


def shard_size(value: Any, facts: Facts) -> Verdict | None:
    """refused above 1 without fsdp / fsdp_config (it sizes FSDP's shards); 1 or null ask for nothing"""
    if isinstance(value, int) and value > 1 and not (facts.config.get("fsdp") or facts.config.get("fsdp_config")):
        return Verdict(Kind.NOT_YET, "dp_shard_size sizes FSDP's shards and neither fsdp nor fsdp_config is set",
                       nearest="fsdp_config (lmforge's FSDP2 shards over every rank)")
    return None


def replicate_size(value: Any, facts: Facts) -> Verdict | None:
    """refused above 1 without fsdp / fsdp_config (it replicates FSDP's sharded groups: HSDP); 1 or null ask for nothing"""
    if isinstance(value, int) and value > 1 and not (facts.config.get("fsdp") or facts.config.get("fsdp_config")):
        return Verdict(Kind.NOT_YET, "dp_replicate_size replicates FSDP's sharded groups (HSDP) and neither fsdp nor "
                       "fsdp_config is set", nearest="fsdp_config with dp_replicate_size (or DDP: no fsdp, every rank a copy)")
    return None


def multipack_attn(value: Any, facts: Facts) -> Verdict | None:
    """true refused with objective: mlm (an encoder's windows are not split into documents here)"""
    if value is True and facts.config.get("objective") == "mlm":
        return Verdict(Kind.NOT_YET, "keeping packed documents apart in masked-LM windows", nearest="objective: clm")
    return None


def eval_table(value: Any, facts: Facts) -> Verdict | None:
    """notice while no W&B or MLflow tracker is set (axolotl logs the table only to those)"""
    trackers = ("wandb_project", "use_wandb", "mlflow_tracking_uri", "use_mlflow")
    if not any(facts.config.get(key) for key in trackers):
        return Verdict(Kind.NOTICE, "axolotl logs this table of eval predictions only to W&B or MLflow, and neither "
                       "wandb_project nor mlflow_tracking_uri is set: nothing changes")
    return None


def full_finetune(value: Any, facts: Facts) -> Verdict | None:
    """notice for true without an adapter (a full fine-tune is what runs then)"""
    if value is True and not facts.config.get("adapter"):
        return Verdict(Kind.NOTICE, "no adapter is set, so lmforge fine-tunes every weight, as full_finetune: true asks "
                       "(axolotl's schema dropped the key): nothing changes")
    return None


def cpu_kernel(what: str) -> Rule:
    """A GPU kernel lmforge applies on CUDA; on a machine without a GPU a notice says what runs instead."""

    def rule(value: Any, facts: Facts) -> Verdict | None:
        """notice for true on a machine without a GPU (the plain PyTorch op runs instead)"""
        if value is True and not facts.gpu:
            return Verdict(Kind.NOTICE, f"{what} is a Triton/CUDA kernel and {NO_GPU}: the plain PyTorch op runs instead "
                           "(the same result)")
        return None

    return rule


def on_gpu_only(text: str) -> Rule:
    """A plugin whose keys do the work: quiet on a GPU, a notice without one."""

    def rule(value: Any, facts: Facts) -> Verdict | None:
        """quiet on a GPU (its keys decide); a notice without one"""
        return QUIET if facts.gpu else Verdict(Kind.NOTICE, f"{text}; {NO_GPU}: the plain PyTorch ops run instead (the same result)")

    return rule


def experts_kernel(value: Any, facts: Facts) -> Verdict | None:
    """eager, grouped_mm and batched_mm are transformers' own; a kernel lmforge does not ship (scattermoe, sonicmoe,
    deepgemm...) runs as transformers' default, with a notice"""
    if value in (None, "eager", "grouped_mm", "batched_mm"):
        return None
    return Verdict(Kind.NOTICE, f"experts_implementation: {value} is {MOE_KERNEL_NOT_SHIPPED}", value=None, replaces=True)


def offloading(value: Any, facts: Facts) -> Verdict | None:
    """legacy means true; disk refused; a notice for true on a machine without a GPU"""
    if value == "disk":
        return Verdict(Kind.NOT_YET, "activation_offloading: disk", nearest="activation_offloading: true")
    if value in (True, "legacy") and not facts.gpu:
        return Verdict(Kind.NOTICE, f"activations are offloaded from GPU to CPU memory and {NO_GPU}: they are in CPU memory "
                       "already, nothing moves", value=True, replaces=True)
    if value == "legacy":
        return Verdict(Kind.NOTICE, "legacy offloading (torch's save_on_cpu) is what activation_offloading: true runs, with the weights left in place",
                       value=True, replaces=True)
    return None


def compile_switch(value: Any, facts: Facts) -> Verdict | None:
    """auto compiles on CUDA only (a notice without a GPU)"""
    if value == "auto" and not facts.gpu:
        return Verdict(Kind.NOTICE, f"torch_compile: auto compiles on CUDA and {NO_GPU}: the model runs uncompiled")
    return None


def save_strategies(value: Any, facts: Facts) -> Verdict | None:
    """best refused (nearest load_best_model_at_end)"""
    if value == "best":
        return Verdict(Kind.NOT_YET, "save_strategy: best (a checkpoint only when the eval loss improves)",
                       nearest="load_best_model_at_end: true with save_steps")
    return None


def unknown_entry(value: Any, key: str, allowed: tuple[str, ...], why: str = "") -> Verdict | None:
    """For a mapping of arguments (`key`: {...}): the refusal of its first entry outside `allowed`, naming them."""
    unknown = [k for k in value if k not in allowed] if isinstance(value, Mapping) else []
    return Verdict(Kind.NOT_YET, f"{key}.{unknown[0]}{why}", nearest=", ".join(allowed)) if unknown else None


CHECKPOINT_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")


def checkpointing_kwargs(value: Any, facts: Facts) -> Verdict | None:
    """entries other than torch.utils.checkpoint's own arguments refused"""
    return unknown_entry(value, "gradient_checkpointing_kwargs", CHECKPOINT_KWARGS, " (not an argument of torch.utils.checkpoint)")


def wandb_off(value: Any, facts: Facts) -> Verdict | None:
    """the string 'false' is off too"""
    return QUIET if str(value).lower() in ("false", "none", "") else None


def tracker_switch(project_key: str) -> Rule:
    """use_wandb / use_mlflow: lmforge logs to a tracker when its project (tracking URI) key is set."""

    def rule(value: Any, facts: Facts) -> Verdict | None:
        """notice for true while the project key is set; refused without it"""
        has_project = bool(facts.config.get(project_key))
        if value is True and has_project:
            return Verdict(Kind.NOTICE, f"logging there is on because {project_key} is set")
        return Verdict(Kind.NOT_YET, f"logging there needs {project_key}", nearest=project_key)

    return rule


def gradient_checkpointing_modes(value: Any, facts: Facts) -> Verdict | None:
    """offload: a notice on a machine without a GPU (the activations are in CPU memory already); offload_disk refused"""
    if value == "offload" and not facts.gpu:
        return Verdict(Kind.NOTICE, f"offload keeps the checkpointed activations in CPU memory and {NO_GPU}: they are "
                       "there already; gradient checkpointing runs")
    if value == "offload_disk":
        return Verdict(Kind.NOT_YET, f"gradient_checkpointing: {value} offloads activations to disk",
                       nearest="gradient_checkpointing: offload")
    return None


def whole_steps(name: str, per_epoch: str) -> Rule:
    """eval_steps / save_steps as a fraction of all steps (axolotl's float form)."""

    def rule(value: Any, facts: Facts) -> Verdict | None:
        """a fraction of all steps (a float below 1) refused"""
        if isinstance(value, float) and not value.is_integer() and 0 < value < 1:
            return Verdict(Kind.NOT_YET, f"{name} as a fraction of all steps", nearest=per_epoch)
        return None

    return rule


# axolotl optimizer names for optimizers lmforge has under another name, or that compute the same on this machine.
SAME_OPTIMIZER = {"adamw_8bit": "adamw_bnb_8bit"}  # transformers' two names for bitsandbytes' 8-bit AdamW
PAGED_OPTIMIZER = ("paged_adamw_8bit", "paged_adamw_32bit")


def optimizer_names(value: Any, facts: Facts) -> Verdict | None:
    """also adamw_8bit (= adamw_bnb_8bit), and a notice for paged_adamw_8bit / paged_adamw_32bit on a machine without a GPU (bitsandbytes runs them unpaged)"""
    if value in SAME_OPTIMIZER:
        ours = SAME_OPTIMIZER[value]
        return Verdict(Kind.NOTICE, f"{value} is {ours}, the same bitsandbytes optimizer", value=ours, replaces=True)
    if value in PAGED_OPTIMIZER and not facts.gpu:
        return Verdict(Kind.NOTICE, f"paging optimizer state is a CUDA memory feature and {NO_GPU}: bitsandbytes keeps "
                       "the states unpaged, the same update")
    return None


def scheduler_names(value: Any, facts: Facts) -> Verdict | None:
    """also constant_with_warmup (= constant, which warms up first), with a notice"""
    if value == "constant_with_warmup":
        return Verdict(Kind.NOTICE, "lmforge's constant schedule warms up over warmup_steps / warmup_ratio first",
                       value="constant", replaces=True)
    return None


def overrides_with_base_model(value: Any, facts: Facts) -> Verdict | None:
    """with base_model and no architecture: axolotl's overrides of the base model's config (overrides_of_model_config)"""
    if facts.config.get("base_model") is not None and isinstance(value, Mapping) and "architecture" not in value:
        return Verdict(None, rename="overrides_of_model_config")
    return None


def qat_formats(value: Any, facts: Facts) -> Verdict | None:
    """nvfp4 without a GPU: torchao's rounding with a plain matmul, with a notice"""
    if isinstance(value, Mapping) and "nvfp4" in (value.get("weight_dtype"), value.get("activation_dtype")) and not facts.gpu:
        return Verdict(Kind.NOTICE, "qat with nvfp4 on this device: the values are rounded to NVFP4 by torchao's "
                       "NVFP4Tensor and multiplied in high precision (torchao's own NVFP4 layer multiplies with "
                       "torch._scaled_mm on Blackwell GPUs)")
    return None


def checkpoint_quantization(value: Any, facts: Facts) -> Verdict | None:
    """Mxfp4Config needs model_quantization_config_kwargs: {dequantize: true}; FineGrainedFP8Config refused"""
    if value == "FineGrainedFP8Config":
        return Verdict(Kind.NOT_YET, "loading FP8 checkpoints (FineGrainedFP8Config)", nearest="base_model (a bf16 checkpoint)")
    kwargs = facts.config.get("model_quantization_config_kwargs")
    if value == "Mxfp4Config" and not (isinstance(kwargs, Mapping) and kwargs.get("dequantize") is True):
        return Verdict(Kind.NOT_YET, "training an MXFP4 checkpoint without dequantizing it (its packed 4-bit experts cannot "
                       "take updates)", nearest="model_quantization_config_kwargs: {dequantize: true}")
    return None


MXFP4_KWARGS = ("dequantize", "modules_to_not_convert")


def checkpoint_quantization_kwargs(value: Any, facts: Facts) -> Verdict | None:
    """entries other than transformers' Mxfp4Config arguments (dequantize, modules_to_not_convert) refused"""
    if not isinstance(value, Mapping):
        return None
    if refused := unknown_entry(value, "model_quantization_config_kwargs", MXFP4_KWARGS):
        return refused
    if not facts.config.get("model_quantization_config"):
        return Verdict(Kind.NOTICE, "only used with model_quantization_config, which is not set: nothing changes")
    return None


def revision_of_local_model(value: Any, facts: Facts) -> Verdict | None:
    """a notice when base_model is a local folder or file (only Hub repositories have revisions)"""
    import os

    base = facts.config.get("base_model")
    if isinstance(base, str) and (os.path.exists(os.path.expanduser(base)) or base.startswith(("/", ".", "~", "pkg://"))):
        return Verdict(Kind.NOTICE, "base_model is a local path, which has no revisions: the files there are read")
    return None


def gemma4_hybrid_attention(value: Any, facts: Facts) -> Verdict | None:
    """a notice: every layer runs the chosen exact backend (the same math); refused with flash_attention_2 on a GPU,
    which cannot run Gemma 4's 512-wide global heads"""
    chosen = facts.config.get("attn_implementation")
    if facts.gpu and chosen == "flash_attention_2":
        return Verdict(Kind.NOT_YET, "gemma4_hybrid_attn_impl with attn_implementation: flash_attention_2 (per-layer "
                       "backends; flash attention cannot run Gemma 4's 512-wide global heads)", nearest="attn_implementation: sdpa")
    where = "without a GPU every layer runs sdpa" if not facts.gpu else f"every layer runs {chosen or 'sdpa'}"
    return Verdict(Kind.NOTICE, f"it only picks faster kernels per layer, and {where}: exact attention, the same math")


def zero_is_off(value: Any, facts: Facts) -> Verdict | None:
    """0 means off, as in axolotl"""
    return QUIET if value == 0 else None


def batch_size(value: Any, facts: Facts) -> Verdict | None:
    """must be a multiple of micro_batch_size and agree with gradient_accumulation_steps"""
    micro = facts.config.get("micro_batch_size") or 1
    accum = facts.config.get("gradient_accumulation_steps")
    if not isinstance(value, int) or isinstance(value, bool) or not isinstance(micro, int) or value % micro:
        return Verdict(Kind.NOT_YET, f"batch_size {value!r} is not a multiple of micro_batch_size {micro!r}",
                       nearest="gradient_accumulation_steps")
    if accum not in (None, value // micro):
        return Verdict(Kind.NOT_YET, f"batch_size {value} contradicts micro_batch_size {micro} × gradient_accumulation_steps {accum}",
                       nearest="gradient_accumulation_steps alone")
    return None


BNB_KWARGS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


def bnb_kwargs(value: Any, facts: Facts) -> Verdict | None:
    """other entries refused"""
    if not isinstance(value, Mapping):
        return None
    if refused := unknown_entry(value, "bnb_config_kwargs", BNB_KWARGS):
        return refused
    clash = [k for k in value if k in facts.config and facts.config[k] != value[k]]
    if clash:
        return Verdict(Kind.NOT_YET, f"bnb_config_kwargs.{clash[0]} contradicts {clash[0]}", nearest=clash[0])
    return None


def best_metric(value: Any, facts: Facts) -> Verdict | None:
    """notice for eval_loss / loss"""
    if value in ("eval_loss", "loss"):
        return Verdict(Kind.NOTICE, "lmforge picks the best checkpoint by eval loss")
    return None


def lower_is_better(value: Any, facts: Facts) -> Verdict | None:
    """notice for false with the eval loss"""
    if value is False and facts.config.get("metric_for_best_model") in (None, "eval_loss", "loss"):
        return Verdict(Kind.NOTICE, "a lower eval loss is better, as lmforge ranks it")
    return None


def streaming(value: Any, facts: Facts) -> Verdict | None:
    """notice with pretraining_dataset (streamed anyway) and with datasets (read once, row by row, into the prepared
    cache: the same rows train)"""
    if facts.config.get("pretraining_dataset") and not facts.config.get("datasets"):
        return Verdict(Kind.NOTICE, "lmforge streams Hub pretraining_dataset sources anyway")
    if value is True and facts.config.get("datasets"):
        return Verdict(Kind.NOTICE, "lmforge reads fine-tuning datasets row by row and tokenizes them once into its "
                       "prepared-data cache (dataset_prepared_path) before the first step, then trains from that: the same "
                       "rows train, in the seed's shuffled order (a Hub dataset is downloaded whole first; to train on a "
                       "corpus too large for that, use pretraining_dataset, which lmforge streams into token shards)")
    return None


def fsdp1_switches(value: Any, facts: Facts) -> Verdict | None:
    """notices for FSDP1-only entries (sync_module_states, use_orig_params, limit_all_gathers, *_prefetch),
    cpu_ram_efficient_loading (every rank reads the weights once) and a SHARDED_STATE_DICT final_state_dict_type"""
    if not isinstance(value, Mapping):
        return None
    given = {str(k).removeprefix("fsdp_"): v for k, v in value.items()}
    fsdp1 = ("sync_module_states", "use_orig_params", "limit_all_gathers", "backward_prefetch", "forward_prefetch")
    lines = []
    named = sorted(set(given) & set(fsdp1))
    if named:
        lines.append(f"{', '.join(named)} {'is an FSDP1 switch' if len(named) == 1 else 'are FSDP1 switches'}; lmforge "
                     "shards with FSDP2 (fully_shard), which prefetches and keeps parameters its own way: the training is the same")
    if given.get("cpu_ram_efficient_loading") in (True, "true"):
        lines.append("cpu_ram_efficient_loading: every rank reads the weights once into CPU memory and keeps only its "
                     "shards after sharding (loading on rank 0 alone is not implemented yet)")
    if str(given.get("final_state_dict_type", "")).upper() == "SHARDED_STATE_DICT":
        lines.append("final_state_dict_type SHARDED_STATE_DICT: the final shards are in the run's last checkpoint (dcp/), "
                     "and output_dir also gets the consolidated safetensors")
    return Verdict(Kind.NOTICE, "; ".join(lines)) if lines else None


def fsdp_version(value: Any, facts: Facts) -> Verdict | None:
    """notice for 1: lmforge shards with FSDP2"""
    if value in (1, "1"):
        return Verdict(Kind.NOTICE, "lmforge shards with FSDP2 (torch's fully_shard) whatever the version; the training is the "
                       "same, and FSDP1's flat parameters are not used")
    return None


def hub_strategies(value: Any, facts: Facts) -> Verdict | None:
    """end is what runs; every_save, checkpoint and all_checkpoints refused (lmforge pushes once, at the end)"""
    if value in ("every_save", "checkpoint", "all_checkpoints"):
        return Verdict(Kind.NOT_YET, f"hub_strategy: {value} (pushing during the run)", nearest="hub_strategy: end")
    return None


def tiled_mlp_alone(value: Any, facts: Facts) -> Verdict | None:
    """true refused with deepspeed (ZeRO's parameter hooks would fire once per slice)"""
    if value is True and facts.config.get("deepspeed"):
        return Verdict(Kind.NOT_YET, "tiled_mlp with deepspeed: ZeRO gathers and releases parameters in its own hooks, "
                       "around which lmforge has not run the slices' recomputation", nearest="gradient_checkpointing: true "
                       "with deepspeed, or tiled_mlp with fsdp_config (FSDP2)")
    return None


def loftq_with_adapter(value: Any, facts: Facts) -> Verdict | None:
    """loftq_config refused without adapter: lora, or with a 4/8-bit base (LoftQ quantizes the full-precision weights
    itself); other entries refused by name"""
    if not isinstance(value, Mapping):
        return None
    if (unknown := unknown_entry(value, "peft", ("loftq_config",))) is not None:
        return unknown
    if value.get("loftq_config") is None:
        return QUIET
    if facts.config.get("adapter") != "lora":
        return Verdict(Kind.NOT_YET, "peft.loftq_config initialises a LoRA adapter from the full-precision weights and "
                       f"adapter is {facts.config.get('adapter')}", nearest="adapter: lora (with load_in_4bit: false)")
    if facts.config.get("load_in_4bit") or facts.config.get("load_in_8bit"):
        return Verdict(Kind.NOT_YET, "peft.loftq_config quantizes the full-precision base weights itself, and the base "
                       "loads already quantized", nearest="load_in_4bit: false with peft.loftq_config")
    return None


def deepspeed_on_gpus(value: Any, facts: Facts) -> Verdict | None:
    """refused on a machine without a GPU unless deepspeed is installed (its CPU accelerator runs with gloo)"""
    import importlib.util

    if not facts.gpu and importlib.util.find_spec("deepspeed") is None:
        return Verdict(Kind.NOT_YET, f"DeepSpeed ZeRO runs on CUDA GPUs and {NO_GPU} (with `pip install deepspeed` "
                       "its CPU accelerator runs here too)",
                       nearest="fsdp_config: {reshard_after_forward: true} (FSDP2, the same sharding as ZeRO-3, runs on CPUs too)")
    return None


def use_vllm(value: Any, facts: Facts) -> Verdict | None:
    """true refused: vLLM needs CUDA and the vllm package; lmforge generates with the model's generate and a KV cache"""
    if value is not True:
        return QUIET
    import importlib.util

    reason = NO_GPU if not facts.gpu else ("vllm is not installed" if importlib.util.find_spec("vllm") is None
                                          else "lmforge does not drive vLLM")
    return Verdict(Kind.NOT_YET, f"generation through vLLM ({reason})",
                   nearest="use_vllm: false (lmforge generates in-process with transformers' generate and a KV cache)")


def vllm_block(value: Any, facts: Facts) -> Verdict | None:
    """a notice while trl.use_vllm is off (nothing reads it); with it on, trl.use_vllm is what gets refused"""
    trl = facts.config.get("trl")
    if not (isinstance(trl, dict) and trl.get("use_vllm") is True):
        return Verdict(Kind.NOTICE, "only used with trl.use_vllm, which is off: lmforge generates in-process")
    return use_vllm(True, facts)


# --- the table ---------------------------------------------------------------------------------------------------

PREFERENCE_OBJECTIVES = "lmforge/train/preference.py"
PREFERENCE_DATA = "lmforge/data/formats/preference.py"
# axolotl's rl: values lmforge does not train, and the nearest method that works.
RL_REFUSED = {
    "ebft": ("energy-based fine-tuning", "rl: dpo (preference pairs) or rl: grpo (verifiable rewards)"),
    "gdpo": ("GDPO, per-reward normalised GRPO", "rl: grpo with trl.multi_objective_aggregation: normalize_then_sum (or rl: dpo)"),
    "ppo": ("PPO with a learned value model", "rl: dpo (or rl: grpo for rewards from functions)"),
}


def rl_method(value: Any, facts: Facts) -> Verdict | None:
    """ebft, gdpo and ppo refused, naming the nearest method that works"""
    if isinstance(value, str) and value in RL_REFUSED:
        what, nearest = RL_REFUSED[value]
        return Verdict(Kind.NOT_YET, f"rl: {value} ({what})", nearest=nearest)
    return None


RL = "preference and RL training (DPO, KTO, ORPO, GRPO, EBFT, reward models) is out of lmforge's scope; TRL does it"
MULTIMODAL = "multimodal models (images, audio) are out of lmforge's scope: it trains text models"
DIFFUSION = "diffusion language-model training is out of lmforge's scope (a denoising objective, not next-token); axolotl's diffusion plugin does it"
EBFT = ("EBFT (energy-based fine-tuning: REINFORCE on rollouts against a frozen feature network's feature-matching "
        "loss, Jelassi et al. 2026) is out of lmforge's scope; axolotl does it")
IMAGES = "lmforge/data/images.py"  # image-text rows: images read, resized, processed with the tokens
MOE_KERNELS = "MoE expert kernels and expert quantization are out of lmforge's scope"
MOE_KERNEL_NOT_SHIPPED = ("a CUDA MoE kernel lmforge does not ship: transformers' own experts code runs instead "
                          "(grouped_mm where it can, the same result)")
PARALLEL = ("tensor, context, sequence and expert parallelism are out of lmforge's scope (lmforge scales out with DDP, "
            "FSDP2 and DeepSpeed ZeRO); axolotl, torchtitan or Megatron-LM do them")
INTERNAL = "axolotl fills this in at run time; it is not a setting"
REMOVED = "axolotl removed this key (its current schema ignores or refuses it)"
# Keys no part of axolotl reads: its schema drops unknown keys (pydantic's extra="ignore"), so a config carrying one
# runs there as if it were absent, and here too.
IGNORED_BY_AXOLOTL = "axolotl's schema has no such key and drops it, so it changes nothing there or here"
GPU_KERNEL = "a Triton/CUDA kernel"
CPU_KERNEL = f"{GPU_KERNEL}; {NO_GPU}, and the plain PyTorch ops lmforge runs compute the same"
MODEL = "lmforge/models/setup.py"
TRAIN = "lmforge/recipes/finetune.py"
TRAINING = "lmforge/recipes/run.py"  # the setup train and pretrain share
GRPO_RECIPE = "lmforge/recipes/grpo.py"
GRPO = "lmforge/train/grpo.py"
ROLLOUTS = "lmforge/train/rollouts.py"
LOAD = "lmforge/models/load.py"
PRETRAIN = "lmforge/recipes/pretrain.py"
TOKENIZER = "lmforge/recipes/tokenizer.py"  # tokenizer_train: `lmforge tokenizer train` and pretraining
SOURCES = "lmforge/data/sources.py"
OBJECTIVES = "lmforge/train/objectives.py"  # objective_from_config: the loss every training recipe trains
PREPARE = "lmforge/data/prepare.py"
LOGGERS = "lmforge/train/loggers.py"
ADAPTERS = "lmforge/models/adapters.py"
FORMATS = "lmforge/data/formats/__init__.py"
CHAT = "lmforge/data/formats/chat.py"
USER_DEFINED = "lmforge/data/formats/user_defined.py"
INFERENCE = "lmforge/recipes/inference.py"
EVAL_RECIPE = "lmforge/recipes/evaluation.py"
KERNELS = "lmforge/models/kernels.py"  # attention backend, compile, fused-kernel plugins
DIST = "lmforge/train/distributed.py"

KEYS: tuple[Key, ...] = (
    # --- model and tokenizer -----------------------------------------------------------------------------------
    done("base_model", MODEL, TRAINING),
    done("base_model_config", MODEL),
    done("cls_model_config", MODEL),
    done("tokenizer_config", LOAD),
    later("tokenizer_use_fast", "the slow (Python) tokenizer", nearest="tokenizer_config", quiet=(None,),
          same={True: "lmforge loads the fast tokenizer (AutoTokenizer's default)"}),
    done("tokenizer_legacy", LOAD),
    done("tokenizer_use_mistral_common", LOAD, "lmforge/config/checks.py", INFERENCE),
    done("tokenizer_type", LOAD),
    done("processor_type", LOAD, MODEL),
    done("processor_kwargs", LOAD),
    done("freeze_mm_modules", MODEL),
    later("tokenizer_save_jinja_files", "saving the chat template inside tokenizer_config.json", quiet=(None,),
          same={True: "the tokenizer is saved with transformers' defaults (chat template in its own .jinja file)"}),
    done("trust_remote_code", MODEL),
    note("experimental_skip_move_to_device", "an axolotl loading-order detail for sharded training; the result is the same",
         quiet=(None,)),
    note("use_kernels", "transformers' Hub kernels (MegaBlocks and others, downloaded from the Hub by the kernels "
         "package) are not used: the model's own PyTorch layers run (the same result)"),
    done("model_quantization_config", MODEL, rule=checkpoint_quantization),
    done("model_quantization_config_kwargs", MODEL, rule=checkpoint_quantization_kwargs),
    out("use_onebitllms", "1.58-bit (BitNet) training is out of lmforge's scope"),
    done("model_type", MODEL),
    alias("type_of_model", "model_type", "axolotl's other name for model_type"),
    later("model_kwargs", "extra from_pretrained arguments", nearest="base_model"),
    later("overrides_of_model_kwargs", "extra from_pretrained arguments", nearest="base_model"),
    done("overrides_of_model_config", MODEL),
    later("model_revision", "a Hub revision of the model", nearest="base_model (a local folder)"),
    done("revision_of_model", MODEL, LOAD, rule=revision_of_local_model),
    done("reinit_weights", MODEL),
    done("resize_token_embeddings_to_32x", MODEL),
    later("mean_resizing_embeddings", "random rows for added tokens", quiet=(None,),
          same={True: "new embedding rows start at the mean of the others, as lmforge grows them"}),
    later("shrink_embeddings", "shrinking the embeddings to the tokenizer"),
    later("embeddings_skip_upcast", "keeping embeddings out of fp32 under PEFT", nearest="bf16"),
    done("special_tokens", LOAD),
    later("additional_special_tokens", "adding extra special tokens", nearest="special_tokens: {bos_token, eos_token, pad_token, unk_token}",
          scope=SPECIAL_TOKENS),
    done("tokens", LOAD),
    later("added_tokens_overrides", "renaming reserved tokens", nearest="special_tokens"),
    later("fix_untrained_tokens", "re-initialising untrained token rows"),
    note("hf_use_auth_token", "lmforge reads the Hub token from the environment (HF_TOKEN)"),
    *each(note, ("is_llama_derived_model", "is_mistral_derived_model", "is_falcon_derived_model",
                 "is_qwen_derived_model"), "lmforge reads the architecture from the model config"),
    later("device_map", "placing the model across devices", nearest="fsdp"),
    note("low_cpu_mem_usage", "memory use while loading only; transformers loads lean by default"),
    *each(later, ("max_memory", "gpu_memory_limit"), "per-device memory caps for placing the model", nearest="fsdp"),

    # --- output and Hub ----------------------------------------------------------------------------------------
    done("output_dir", TRAIN, PRETRAIN),
    done("hub_model_id", TRAINING),
    done("hub_revision", TRAINING),
    note("hub_strategy", "lmforge pushes once, at the end of the run (hub_strategy: end)", only_with="hub_model_id",
         rule=hub_strategies),
    out("save_safetensors", "lmforge saves safetensors only (no pickle)", quiet=(None,),
        same={True: "lmforge always saves safetensors"}),
    later("push_dataset_to_hub", "pushing the prepared dataset to the Hub", nearest="dataset_prepared_path"),

    # --- adapters ------------------------------------------------------------------------------------------------
    *each(done, ("adapter", "load_in_8bit", "load_in_4bit"), MODEL),
    *each(done, ("lora_model_dir", "lora_r", "lora_alpha", "lora_dropout", "lora_fan_in_fan_out", "lora_target_modules",
                 "lora_target_linear", "lora_modules_to_save", "peft_use_dora", "peft_use_rslora",
                 "lora_target_parameters"), ADAPTERS),
    later("lora_rank_pattern", "per-module LoRA ranks", nearest="lora_r"),
    later("lora_alpha_pattern", "per-module LoRA alphas", nearest="lora_alpha"),
    *each(later, ("peft_layers_to_transform", "peft_layers_pattern"),
          "LoRA on chosen layer indices", nearest="lora_target_modules (a regex)"),
    done("peft", ADAPTERS, rule=loftq_with_adapter),
    later("peft_layer_replication", "replicating layers under LoRA"),
    later("peft_init_lora_weights", "other LoRA initialisations", nearest="adapter: lora", quiet=(None,),
          same={True: "PEFT's default LoRA initialisation is what lmforge uses"}),
    later("peft_trainable_token_indices", "training chosen embedding rows", nearest="lora_modules_to_save: [embed_tokens]"),
    later("peft_ensure_weight_tying", "tying adapter weights of tied embeddings", nearest="lora_modules_to_save"),
    later("peft_autocast_adapter_dtype", "adapter weights in the compute dtype", quiet=(None,),
          same={True: "lmforge keeps adapter weights in fp32, as PEFT does by default"}),
    later("qlora_sharded_model_loading", "FSDP-QLoRA sharded loading", nearest="fsdp"),
    later("lora_on_cpu", "loading LoRA on the CPU first", cpu=f"{NO_GPU}: LoRA is loaded on the CPU anyway"),
    later("gptq", "training GPTQ-quantized models (their matmul kernels, exllama and Marlin through gptqmodel, run on "
          "CUDA GPUs only)", nearest="load_in_4bit"),
    alias("bnb_config_kwargs", SPREAD, "its bnb_4bit_* entries are the flat bnb_4bit_* keys", rule=bnb_kwargs),
    *each(done, ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"), MODEL),
    later("loraplus_lr_ratio", "LoRA+ learning rates", nearest="learning_rate"),
    later("loraplus_lr_embedding", "LoRA+ learning rates", nearest="learning_rate", only_with="loraplus_lr_ratio"),
    later("merge_lora", "merging as part of a run", nearest="`lmforge merge-lora CONFIG`"),
    note("merge_method", "how axolotl's merge saves memory; `lmforge merge-lora` gives the same merged weights"),
    later("relora", "ReLoRA: merging the adapter into the base and restarting it every jagged_restart_steps (with a 4-bit "
          "base, dequantized, merged and requantized each time), with the optimizer state pruned", nearest="adapter: lora "
          "(or train, `lmforge merge`, and train a new adapter on the merged model)"),
    *each(later, ("relora_prune_ratio", "relora_prune_method", "relora_cpu_offload"),
          "ReLoRA restarts", only_with="relora"),
    later("jagged_restart_steps", "jagged learning-rate restarts (axolotl uses them with relora)", nearest="lr_scheduler"),
    *each(later, ("jagged_restart_warmup_steps", "jagged_restart_anneal_steps"),
          "jagged learning-rate restarts", only_with="jagged_restart_steps"),
    later("mora", "MoRA adapters", nearest="adapter: lora"),

    # --- batch, optimizer, schedule -----------------------------------------------------------------------------
    done("micro_batch_size", TRAIN, PRETRAIN),
    done("gradient_accumulation_steps", TRAINING, PRETRAIN),
    alias("batch_size", "gradient_accumulation_steps", "sets gradient_accumulation_steps = batch_size / micro_batch_size",
          rule=batch_size, convert=lambda value, facts: value // (facts.config.get("micro_batch_size") or 1)),
    done("eval_batch_size", TRAIN, PRETRAIN),
    later("auto_find_batch_size", "searching for the largest batch that fits", nearest="micro_batch_size (`lmforge plan` sizes it)"),
    *each(done, ("num_epochs", "max_steps", "learning_rate"), TRAINING),
    *each(later, ("embedding_lr", "embedding_lr_scale"), "a separate embedding learning rate", nearest="learning_rate"),
    later("lr_groups", "per-module learning rates", nearest="learning_rate"),
    done("optimizer", TRAINING, rule=optimizer_names),
    later("optim_args", "extra optimizer arguments", nearest="adam_beta1, adam_beta2, adam_epsilon, weight_decay"),
    later("optim_target_modules", "GaLore target modules", nearest="optimizer"),
    *unoffered_optimizer("adamw_anyprecision", "torchdistx_path"),
    *each(done, ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon"), TRAINING),
    *unoffered_optimizer("came_pytorch", "adam_epsilon2", "adam_beta3"),
    *unoffered_optimizer("dion", "dion_*"),
    *unoffered_optimizer("q_galore_adamw8bit", "qgalore_*"),
    later("grokfast_*", "the Grokfast gradient filter", nearest="optimizer"),
    *each(done, ("sgd_momentum", "sgd_nesterov", "max_grad_norm"), TRAINING),
    done("lr_scheduler", TRAINING, rule=scheduler_names),
    later("lr_scheduler_kwargs", "extra schedule arguments", nearest="cosine_min_lr_ratio, warmup_steps"),
    done("lr_quadratic_warmup", TRAINING),
    done("cosine_min_lr_ratio", TRAINING),
    later("cosine_constant_lr_ratio", "holding the rate constant late in a cosine schedule", nearest="cosine_min_lr_ratio"),
    later("lr_div_factor", "one-cycle schedules", nearest="lr_scheduler"),
    *each(done, ("warmup_steps", "warmup_ratio"), TRAINING),
    done("label_smoothing_factor", OBJECTIVES),
    *each(done, ("dropout", "unfrozen_parameters"), MODEL),
    later("spectrum_*", "Spectrum layer selection", nearest="unfrozen_parameters"),
    *each(done, ("lisa_n_layers", "lisa_step_interval", "lisa_layers_attribute"), TRAINING),
    later("neftune_noise_alpha", "NEFTune embedding noise"),
    later("noisy_embedding_alpha", "NEFTune embedding noise (axolotl's older name)"),
    *each(done, ("use_eaft", "eaft_alpha", "eaft_k"), OBJECTIVES),
    done("seed", TRAIN, PRETRAIN),
    done("nan_policy", TRAINING),
    done("fast_dropout", MODEL),
    done("torch_threads", "lmforge/cli.py"),  # lmforge's own: decided before torch loads (lmforge/train/threads.py)
    done("group_by_length", TRAIN),
    done("train_on_inputs", PREPARE),

    # --- precision and memory -------------------------------------------------------------------------------------
    done("bf16", TRAIN, PRETRAIN),
    done("fp16", TRAINING, rule=fp16),
    done("tf32", TRAINING, rule=tf32),
    later("bfloat16", "pure bf16 weights without mixed precision", nearest="bf16: true", rule=bfloat16),
    alias("float16", "fp16", "float16 weights without mixed precision; trained as fp16: true (float16 autocast, fp32 "
          "master weights, loss scaling)", rule=float16_weights),
    later("float32", "fp32 training", nearest="bf16: false"),
    later("fp8", "FP8 training (torchao's float8 linears multiply with torch._scaled_mm, which needs a CUDA GPU of compute "
          "capability 8.9 or newer)", nearest="bf16"),
    later("fp8_enable_fsdp_float8_all_gather", "FP8 training under FSDP", nearest="fsdp", only_with="fp8"),
    done("gradient_checkpointing", MODEL, rule=gradient_checkpointing_modes),
    done("gradient_checkpointing_kwargs", MODEL, rule=checkpointing_kwargs),
    later("selective_checkpointing", "saving chosen ops under checkpointing", nearest="gradient_checkpointing"),
    done("activation_offloading", TRAINING, rule=offloading),
    later("layer_offloading", "offloading layer weights to CPU memory", nearest="fsdp"),
    *each(note, ("gc_steps", "gc_collect_steps"), "memory housekeeping (garbage collection); the result is the same"),
    note("torch_empty_cache_steps", "memory housekeeping (CUDA cache); the result is the same"),
    done("tiled_mlp", MODEL, rule=tiled_mlp_alone),
    done("tiled_mlp_num_shards", MODEL),
    note("tiled_mlp_use_original_mlp", "lmforge always tiles the model's own MLP module (false swaps in axolotl's "
         "Llama-style MLP, the same math for the models it applies to)", quiet=(None, True), only_with="tiled_mlp"),
    *each(done, ("chunked_cross_entropy", "chunked_cross_entropy_num_chunks"), OBJECTIVES),

    # --- attention and kernels -------------------------------------------------------------------------------------
    done("attn_implementation", MODEL, rule=attention),
    *(alias(switch, "attn_implementation", f"axolotl's older switch for attn_implementation: {backend}",
            rule=legacy_attention(switch), convert=lambda value, facts, backend=backend: backend)
      for switch, backend in LEGACY_ATTENTION_SWITCHES.items()),
    later("flex_attn_compile_kwargs", "compiling flex attention with other options", nearest="torch_compile", rule=flex_compile),
    out("s2_attention", f"shifted-sparse attention: {REMOVED}"),
    later("flash_attn_rms_norm", "flash-attn's fused RMSNorm", nearest="plugins: [liger] with liger_rms_norm", cpu=CPU_KERNEL),
    later("flash_attn_cross_entropy", "flash-attn's cross-entropy kernel", nearest="cut_cross_entropy", cpu=CPU_KERNEL),
    later("flash_attn_fuse_mlp", "flash-attn's fused MLP", cpu=CPU_KERNEL),
    out("flash_optimum", "BetterTransformer was removed from transformers"),
    note("gemma4_hybrid_attn_impl", "Gemma 4's hybrid attention (flash attention on sliding-window layers, sdpa on the "
         "global ones)", rule=gemma4_hybrid_attention),
    later("large_head_attention", "attention kernels for head_dim > 256", nearest="attn_implementation"),
    later("flash_attn_d512", "attention kernels for head_dim > 256 (older name)", nearest="attn_implementation"),
    note("sdpa_varlen", f"a speed-up of packed sdpa; {SDPA}"),
    later("fused_attn_kernel", "a fused RMSNorm+RoPE Triton kernel", cpu=CPU_KERNEL),
    later("scaling_softmax", "scaled-softmax attention (changes the model)"),
    *each(later, ("scaling_softmax_factor", "scaling_softmax_bias"),
          "scaled-softmax attention", only_with="scaling_softmax"),
    later("lora_mlp_kernel", "axolotl's LoRA MLP kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    later("lora_qkv_kernel", "axolotl's LoRA QKV kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    later("lora_o_kernel", "axolotl's LoRA output-projection kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    later("lora_embedding_kernel", "axolotl's LoRA embedding kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    note("plugins", "each plugin named is decided by its own row (plugins[])"),  # never decided itself
    note("liger", "the Liger kernels plugin (liger-kernel): its liger_* keys choose the kernels", scope=PLUGIN,
         rule=on_gpu_only("the Liger kernels plugin (liger-kernel)")),
    note("cut_cross_entropy", "the Cut Cross-Entropy plugin: cut_cross_entropy: true turns it on", scope=PLUGIN,
         rule=on_gpu_only("the Cut Cross-Entropy plugin")),
    note("kernels", "axolotl's MoE kernels plugin: its keys (use_scattermoe, use_sonicmoe) each say what they change",
         scope=PLUGIN),
    out("expert_parallel", PARALLEL, scope=PLUGIN),
    out("densemixer", MOE_KERNELS, scope=PLUGIN),
    out("diffusion", DIFFUSION, scope=PLUGIN),
    out("kd", "knowledge distillation from teacher logits is out of lmforge's scope", scope=PLUGIN),
    out("nemo_gym", RL, scope=PLUGIN),
    out("hatchery", "training on a remote service is out of lmforge's scope", scope=PLUGIN),
    out("llm_compressor", "sparsity and compression recipes are out of lmforge's scope", scope=PLUGIN),
    note("swanlab", "SwanLab logging is built in: swanlab_project turns it on", scope=PLUGIN),
    later("spectrum", "Spectrum layer selection", nearest="unfrozen_parameters", scope=PLUGIN),
    later("grokfast", "the Grokfast gradient filter", nearest="optimizer", scope=PLUGIN),
    note("lm_eval", "lmforge runs lm_eval_tasks itself (at the end of `train`, and `lmforge eval`)", scope=PLUGIN),
    later("mora", "MoRA adapters", nearest="adapter: lora", scope=PLUGIN),
    done("liger_rope", KERNELS, rule=cpu_kernel("Liger's fused RoPE")),
    done("liger_rms_norm", KERNELS, rule=cpu_kernel("Liger's fused RMSNorm")),
    later("liger_rms_norm_gated", "Liger's fused gated RMSNorm", cpu=CPU_KERNEL),
    done("liger_layer_norm", KERNELS, rule=cpu_kernel("Liger's fused LayerNorm")),
    alias("liger_swiglu", "liger_glu_activation", "Liger's older name for liger_glu_activation"),
    done("liger_glu_activation", KERNELS, rule=cpu_kernel("Liger's fused GLU activation")),
    later("liger_cross_entropy", "Liger's cross-entropy kernel on full logits (lmforge computes the head only where "
          "labels are)", nearest="liger_fused_linear_cross_entropy", cpu=CPU_KERNEL),
    done("liger_fused_linear_cross_entropy", KERNELS,
         rule=cpu_kernel("Liger's fused output head and loss")),
    later("liger_use_token_scaling", "scaling each token's loss by its probability (changes the loss)",
          only_with="liger_fused_linear_cross_entropy"),
    done("cut_cross_entropy", KERNELS, rule=cpu_kernel("Cut Cross-Entropy (fused output head and loss)")),
    done("torch_compile", KERNELS, rule=compile_switch),
    *each(done, ("torch_compile_backend", "torch_compile_mode"), KERNELS),
    later("torch_compile_options", "inductor options for torch.compile", nearest="torch_compile_mode", only_with="torch_compile"),
    done("experts_implementation", MODEL, rule=experts_kernel),
    done("quantize_moe_experts", MODEL),
    note("llama4_linearized_experts", "axolotl's Llama 4 variant with one nn.Linear per expert (for its kernels and "
         "expert quantization); lmforge loads transformers' Llama 4, whose fused experts compute the same"),
    *each(note, ("use_scattermoe", "use_sonicmoe"), f"this MoE kernel is {MOE_KERNEL_NOT_SHIPPED}"),
    *each(out, ("dense_mixer", "expert_backend", "nonexpert_quantization", "moe_*", "use_dsv4_kernels",
                "use_glm_dsa_kernels", "dsv4_*", "gemma4_fp8_nonexpert", "gemma4_nf4_nonexpert", "nvfp4_merge_aware"),
          MOE_KERNELS),
    out("nvfp4_merge_aware_start_step", MOE_KERNELS, only_with="nvfp4_merge_aware"),

    # --- scale-out ------------------------------------------------------------------------------------------------
    done("fsdp", DIST),
    done("fsdp_config", DIST, rule=fsdp1_switches),
    done("fsdp_version", DIST, rule=fsdp_version),
    done("fsdp_final_state_dict_type", DIST),
    later("fp32_norms", "FSDP2 fp32 norms", nearest="bf16: false"),
    later("fp32_norm_classes", "FSDP2 fp32 norms", only_with="fp32_norms"),
    done("deepspeed", DIST, rule=deepspeed_on_gpus),
    later("deepcompile", "DeepSpeed compile", nearest="deepspeed", only_with="deepspeed"),
    note("ddp", "lmforge trains with DDP whenever torchrun starts several ranks and neither fsdp nor deepspeed is set"),
    done("ddp_timeout", "lmforge/train/engine.py"),
    done("ddp_bucket_cap_mb", DIST),
    done("ddp_broadcast_buffers", DIST),
    done("ddp_find_unused_parameters", DIST),
    done("dp_shard_size", DIST, rule=shard_size),
    done("dp_replicate_size", DIST, rule=replicate_size),
    later("accelerator_config", "accelerate's settings", nearest="gradient_accumulation_steps"),
    *each(out, ("tensor_parallel_size", "context_parallel_size", "sequence_parallel_degree"),
          PARALLEL, quiet=(None, 0, 1)),
    *each(out, ("heads_k_stride", "ring_attn_func"), PARALLEL),
    out("expert_parallel_size", PARALLEL, quiet=(None, 0, 1)),
    out("expert_parallel_*", PARALLEL),
    out("use_ray", "launching through Ray is out of lmforge's scope; it scales out with torchrun"),
    *each(out, ("ray_run_name", "ray_num_workers", "resources_per_worker"),
          "launching through Ray is out of lmforge's scope", only_with="use_ray"),
    *each(out, ("world_size", "local_rank"), "set by the launcher (torchrun) at run time, not in a config"),
    out("device", INTERNAL),

    # --- sequence length and packing --------------------------------------------------------------------------------
    done("sequence_len", PREPARE, TRAIN),
    later("excess_length_strategy", "dropping or refusing over-long rows", nearest="sequence_len (rows are truncated and counted)",
          same={"truncate": "lmforge truncates over-long rows to sequence_len and counts them"}),
    later("eval_sequence_len", "a separate eval length", nearest="sequence_len"),
    done("min_sample_len", PREPARE),
    done("sample_packing", TRAIN),
    done("eval_sample_packing", TRAIN),
    note("sample_packing_eff_est", "lmforge measures packing efficiency itself"),
    *each(later, ("sample_packing_group_size", "sample_packing_bin_size"),
          "tuning axolotl's packing search", nearest="sample_packing"),
    later("sample_packing_sequentially", "packing in dataset order", nearest="sample_packing"),
    note("sample_packing_mp_start_method", "how axolotl starts packing processes; the packing is the same"),
    done("pad_to_sequence_len", TRAIN),
    later("pad_to_multiple_of", "padding batches to a multiple", nearest="pad_to_sequence_len"),
    later("curriculum_sampling", "sequential sampling", nearest="shuffle_merged_datasets"),
    later("multipack_real_batches", "axolotl's multipack batching", nearest="sample_packing"),
    later("batch_flattening", "flattened batches without packing", nearest="sample_packing"),
    later("use_pose", "PoSE position skipping"),
    *each(later, ("pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks"),
          "PoSE position skipping", only_with="use_pose"),
    later("pretrain_multipack_buffer_size", "packing streamed pretraining data", nearest="pretraining_dataset"),
    done("pretrain_multipack_attn", PRETRAIN, rule=multipack_attn),
    later("pretraining_sample_concatenation", "concatenating pretraining samples", nearest="pretraining_dataset"),
    later("streaming", "streaming fine-tuning datasets", nearest="pretraining_dataset (streamed)", rule=streaming),
    note("streaming_multipack_buffer_size", "a buffer size of axolotl's streaming packer", only_with="streaming"),
    *each(out, ("max_packed_sequence_len", "sample_packing_seq_len_multiplier"), REMOVED, nearest="sample_packing"),

    # --- data ----------------------------------------------------------------------------------------------------------
    *each(done, ("datasets", "test_datasets", "val_set_size", "dataset_prepared_path", "dataset_processes"), PREPARE),
    alias("dataset_num_proc", "dataset_processes", "axolotl's other name for dataset_processes"),
    done("shuffle_merged_datasets", PREPARE),
    later("shuffle_before_merging_datasets", "shuffling each dataset before merging", nearest="shuffle_merged_datasets"),
    *each(done, ("skip_bad_rows", "skip_prepare_dataset"), PREPARE),
    note("num_dataset_shards_to_save", "how axolotl stores its prepared dataset; lmforge's cache is its own"),
    later("dataset_shard_num", "training on one shard of the data"),
    later("dataset_shard_idx", "training on one shard of the data", only_with="dataset_shard_num"),
    done("dataset_exact_deduplication", PREPARE),
    note("dataset_keep_in_memory", "memory use while preparing; the prepared data is the same"),
    *each(note, ("dataloader_pin_memory", "dataloader_num_workers", "dataloader_prefetch_factor"),
          "a data-loader speed setting; lmforge's loop batches in process and the batches are the same"),
    later("dataloader_drop_last", "dropping the last partial batch"),
    note("remove_unused_columns", "lmforge keeps the columns a row needs (with processor_type: its images, what "
         "remove_unused_columns: false asks axolotl for) and drops the rest after tokenizing anyway"),
    later("preprocess_iterable", "preparing datasets as iterables", nearest="dataset_prepared_path"),
    *each(out, ("is_preprocess", "total_num_tokens", "total_supervised_tokens"), INTERNAL),
    *each(done, ("chat_template", "chat_template_jinja"), FORMATS, "lmforge/data/formats/templates.py"),
    *each(done, ("chat_template_kwargs", "eot_tokens"), FORMATS),
    later("default_system_message", "a default system message", nearest="system_prompt (alpaca_w_system)"),
    done("pretraining_dataset", PRETRAIN),
    done("model_config", PRETRAIN, rule=overrides_with_base_model),
    *each(done, ("objective", "mlm_probability"), PRETRAIN),
    done("tokenizer_train", TOKENIZER),
    *each(done, ("shards_dir", "shard_doc_per", "sample_prompt"), PRETRAIN),

    # --- a datasets: entry ----------------------------------------------------------------------------------------------
    done("path", "lmforge/data/sources.py", scope=DATASET),
    *each(done, ("type", "ds_type", "data_files", "split", "name"), PREPARE, scope=DATASET),
    *each(done, ("field", "system_prompt", "field_messages", "message_property_mappings", "roles", "roles_to_train",
                 "train_on_eos"), FORMATS, scope=DATASET),
    later("input_transform", "transforming rows before the format", nearest="type: my_module.my_function", scope=DATASET),
    later("shards", "reading one shard of a dataset", nearest="split (e.g. train[:10%])", scope=DATASET),
    later("shards_idx", "reading one shard of a dataset", scope=DATASET, only_with="shards"),
    later("preprocess_shards", "preparing a dataset in chunks", scope=DATASET),
    out("conversation", "FastChat conversation templates (axolotl's older sharegpt)", nearest="chat_template", scope=DATASET),
    *each(done, ("chat_template", "chat_template_jinja"), FORMATS, "lmforge/data/formats/templates.py", scope=DATASET),
    later("input_format", "axolotl's input_format", scope=DATASET),
    *each(later, ("field_human", "field_model"),
          "axolotl's older sharegpt field names", nearest="message_property_mappings, roles", scope=DATASET),
    later("field_tools", "tool definitions in chat rows", scope=DATASET),
    *each(done, ("field_thinking", "template_thinking_key", "split_thinking", "train_on_thinking"),
          FORMATS, scope=DATASET),
    # folded into message_property_mappings while the config is validated
    *each(done, ("message_field_role", "message_field_content"), "lmforge/config/sections.py", scope=DATASET),
    later("message_field_training", "training chosen turns by a per-turn flag", nearest="roles_to_train", scope=DATASET),
    later("message_field_training_detail", "training chosen spans of a turn", nearest="roles_to_train", scope=DATASET),
    *each(done, ("train_on_eot", "drop_system_message"), FORMATS, scope=DATASET),
    out("trust_remote_code", "lmforge never runs a dataset's loading script", scope=DATASET),
    later("revision", "a Hub revision of a dataset", nearest="path (a local copy)", scope=DATASET),
    *each(out, ("logprobs_field", "temperature"),
          "distillation from teacher log-probabilities is out of lmforge's scope", scope=DATASET),
    *each(done, ("field_chosen", "field_rejected"), PREFERENCE_DATA, scope=DATASET),
    *each(out, ("step_separator", "max_completion_length", "train_on_last_step_only"), RL, scope=DATASET),
    *each(later, ("length", "sequence_length", "min_input_id", "max_input_id"), "synthetic datasets", scope=DATASET),
    later("seed", "synthetic datasets", nearest="the top-level seed", scope=DATASET),

    # --- a user-defined `type:` mapping ----------------------------------------------------------------------------------
    *each(done, ("system_prompt", "field_system", "field_instruction", "field_input", "field_output", "format",
                 "no_input_format"), USER_DEFINED, scope=DATASET_TYPE),
    later("system_format", "a separate system template", nearest="format (with {system})", scope=DATASET_TYPE),
    *each(done, ("field_prompt", "field_chosen", "field_rejected", "prompt_format", "chosen_format", "rejected_format"),
          PREFERENCE_DATA, scope=DATASET_TYPE),
    *each(out, ("field_label", "field_completion", "completion_format"), RL, scope=DATASET_TYPE),

    # --- a pretraining_dataset: entry ------------------------------------------------------------------------------------
    done("path", PRETRAIN, scope=PRETRAINING),
    *each(done, ("name", "split"), "lmforge/data/shards.py", scope=PRETRAINING),
    done("text_column", SOURCES, scope=PRETRAINING),
    alias("field", "text_column", "the column with the text, as in a completion dataset", scope=PRETRAINING),
    done("data_files", PRETRAIN, scope=PRETRAINING),
    note("type", "pretraining text is read as is (pretrain and completion mean the same here)", scope=PRETRAINING),
    done("max_documents", SOURCES, scope=PRETRAINING),
    later("skip", "skipping the first rows of a stream", nearest="max_documents", scope=PRETRAINING),
    out("trust_remote_code", "lmforge never runs a dataset's loading script", scope=PRETRAINING),

    # --- lmforge's own blocks: a tokenizer to train, a model to build -----------------------------------------------
    *(done(name, TOKENIZER, scope=TOKENIZER_TRAIN)
      for name in ("files", "vocab_size", "model_type", "backend", "output_dir", "held_out_fraction")),
    *each(done, ("architecture", "preset"), PRETRAIN, scope=MODEL_CONFIG),
    *(done(name, "lmforge/models/build.py", scope=MODEL_CONFIG)
      for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings",
                   "head_dim")),
    *(done(name, "lmforge/models/qat.py", scope=QAT)
      for name in ("weight_dtype", "activation_dtype", "group_size", "quantize_embedding")),
    done("fake_quant_after_n_steps", TRAINING, scope=QAT),

    # --- evaluation, checkpoints, steps ----------------------------------------------------------------------------------
    done("eval_steps", TRAINING, rule=whole_steps("eval_steps", "evals_per_epoch")),
    done("evals_per_epoch", TRAINING, rule=zero_is_off),
    done("eval_strategy", TRAINING),
    alias("evaluation_strategy", "eval_strategy", "axolotl's older name for eval_strategy"),
    done("save_steps", TRAINING, rule=whole_steps("save_steps", "saves_per_epoch")),
    done("saves_per_epoch", TRAINING, rule=zero_is_off),
    done("save_strategy", TRAINING, rule=save_strategies),
    done("save_total_limit", TRAINING),
    later("save_first_step", "a checkpoint after the first step", nearest="save_steps"),
    done("save_only_model", TRAINING),
    later("dynamic_checkpoint", "checkpoints on a trigger file", nearest="save_steps (and SIGTERM saves one)"),
    *each(done, ("resume_from_checkpoint", "auto_resume_from_checkpoints", "logging_steps", "early_stopping_patience",
                 "load_best_model_at_end"), TRAINING),
    later("metric_for_best_model", "other metrics for the best checkpoint", nearest="load_best_model_at_end", rule=best_metric),
    later("greater_is_better", "higher-is-better metrics", nearest="load_best_model_at_end", rule=lower_is_better),
    *each(done, ("loss_watchdog_threshold", "loss_watchdog_patience"), TRAINING),
    *each(done, ("do_causal_lm_eval", "eval_causal_lm_metrics", "eval_causal_lm_examples", "eval_max_new_tokens"), TRAIN),
    later("do_bench_eval", "benchmark evals during training"),
    *each(later, ("bench_dataset", "bench_split"), "benchmark evals during training", only_with="do_bench_eval"),
    later("eval_table_size", "tables of eval predictions in W&B or MLflow", nearest="`lmforge inference`", rule=eval_table),
    later("generate_samples", "sample generations during training", nearest="sample_prompt (pretraining), `lmforge inference`"),
    *each(note, ("num_generation_samples", "generation_max_new_tokens", "generation_temperature", "generation_top_p",
                 "generation_top_k", "generation_prompt_ratio", "generation_do_sample"),
          "sample generation settings", only_with="generate_samples"),
    later("profiler_steps", "the PyTorch profiler"),
    later("profiler_steps_start", "the PyTorch profiler", only_with="profiler_steps"),
    note("include_tokens_per_second", "lmforge always reports tokens/s (summary.json and the logs)"),
    note("include_tkps", "lmforge always reports tokens/s (summary.json and the logs)", quiet=(None,)),
    # lm-eval (axolotl's lm_eval plugin keys) and lmforge's own `lmforge eval` keys
    done("lm_eval_tasks", TRAIN, EVAL_RECIPE), done("lm_eval_batch_size", TRAIN, EVAL_RECIPE),
    done("lm_eval_limit", TRAIN, EVAL_RECIPE),
    later("lm_eval_*", "other lm-eval plugin settings", nearest="lm_eval_tasks, lm_eval_batch_size, lm_eval_limit, `lmforge eval`"),
    done("eval_answer_extractor", EVAL_RECIPE), done("eval_answer_regex", EVAL_RECIPE), done("eval_metrics", EVAL_RECIPE),
    done("eval_general_text", EVAL_RECIPE), done("eval_general_tokens", EVAL_RECIPE), done("eval_general_tasks", EVAL_RECIPE),

    # --- logging --------------------------------------------------------------------------------------------------------
    note("use_wandb", "W&B logging is on when wandb_project is set", rule=tracker_switch("wandb_project")),
    *each(done, ("wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_mode"), LOGGERS),
    done("wandb_watch", LOGGERS, rule=wandb_off),
    done("wandb_log_model", TRAINING, rule=wandb_off),
    note("use_mlflow", "MLflow logging is on when mlflow_tracking_uri is set", rule=tracker_switch("mlflow_tracking_uri")),
    *each(done, ("mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name"), LOGGERS),
    later("hf_mlflow_log_artifacts", "MLflow checkpoint artifacts", nearest="mlflow_tracking_uri"),
    done("use_tensorboard", LOGGERS),
    later("use_comet", "Comet logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("comet_*", "Comet logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("use_trackio", "Trackio logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("trackio_*", "Trackio logging", nearest="wandb_project, mlflow_tracking_uri"),
    note("use_swanlab", "SwanLab logging is on when swanlab_project is set", rule=tracker_switch("swanlab_project")),
    *(done(name, LOGGERS) for name in ("swanlab_project", "swanlab_experiment_name", "swanlab_description", "swanlab_mode",
                                       "swanlab_workspace")),
    *each(note, ("swanlab_log_completions", "swanlab_completion_log_interval", "swanlab_completion_max_buffer"),
          "SwanLab completion tables: axolotl's callback (a placeholder, its docstring says) reads dpo/prompt-style log "
          "entries TRL's trainers never write, so it logs no table; lmforge logs none either: nothing changes"),
    later("swanlab_*", "SwanLab's cloud settings, alerts and completion tables",
          nearest="swanlab_project, swanlab_experiment_name, swanlab_description, swanlab_mode, swanlab_workspace"),
    done("use_otel_metrics", LOGGERS),
    done("otel_metrics_host", LOGGERS),
    done("otel_metrics_port", LOGGERS),
    note("logging_dir", "logs go to output_dir"),
    note("debug", "use --debug on the command line for tracebacks"),
    note("strict", "lmforge always validates strictly"),
    *each(out, ("axolotl_config_path", "capabilities", "env_capabilities"), INTERNAL),
    out("trainer_cls", "lmforge runs its own loop, not an HF Trainer class"),
    done("gradio_title", INFERENCE), done("gradio_share", INFERENCE), done("gradio_server_name", INFERENCE),
    done("gradio_server_port", INFERENCE), done("gradio_max_new_tokens", INFERENCE), done("gradio_temperature", INFERENCE),
    later("gradio_*", "web chat settings", nearest="`lmforge inference --gradio`"),
    # lmforge's own generation defaults (`lmforge inference`, --chat, --gradio, serve); flags override them
    done("max_new_tokens", INFERENCE), done("temperature", INFERENCE), done("top_p", INFERENCE), done("top_k", INFERENCE),
    done("repetition_penalty", INFERENCE), done("truncate_prompt", INFERENCE),

    # --- trl: (GRPO) ------------------------------------------------------------------------------------------------
    done("beta", GRPO, ROLLOUTS, scope=TRL), done("num_generations", ROLLOUTS, scope=TRL),
    done("max_completion_length", GRPO, ROLLOUTS, scope=TRL), done("temperature", GRPO, ROLLOUTS, scope=TRL),
    done("top_p", ROLLOUTS, scope=TRL), done("top_k", ROLLOUTS, scope=TRL), done("repetition_penalty", ROLLOUTS, scope=TRL),
    done("reward_funcs", GRPO_RECIPE, scope=TRL), done("reward_weights", ROLLOUTS, scope=TRL),
    done("epsilon", GRPO, scope=TRL), done("epsilon_high", GRPO, scope=TRL), done("num_iterations", ROLLOUTS, GRPO_RECIPE, scope=TRL),
    done("scale_rewards", ROLLOUTS, scope=TRL), done("loss_type", GRPO, scope=TRL),
    done("importance_sampling_level", GRPO, scope=TRL), done("mask_truncated_completions", ROLLOUTS, scope=TRL),
    done("multi_objective_aggregation", ROLLOUTS, scope=TRL), done("use_bias_correction_kl", GRPO, scope=TRL),
    done("skip_zero_advantage_batches", GRPO_RECIPE, scope=TRL), done("log_completions", ROLLOUTS, scope=TRL),
    done("num_completions_to_print", ROLLOUTS, scope=TRL), done("chat_template_kwargs", GRPO_RECIPE, scope=TRL),
    later("use_vllm", "generation through vLLM", scope=TRL, rule=use_vllm),
    note("vllm_mode", "only used with use_vllm", scope=TRL), note("vllm_server_host", "only used with use_vllm", scope=TRL),
    note("vllm_server_port", "only used with use_vllm", scope=TRL), note("vllm_server_timeout", "only used with use_vllm", scope=TRL),
    note("vllm_guided_decoding_regex", "only used with use_vllm", scope=TRL),
    note("vllm_enable_sleep_mode", "only used with use_vllm", scope=TRL),
    note("vllm_sync_interval", "only used with use_vllm", scope=TRL), note("vllm_lora_sync", "only used with use_vllm", scope=TRL),
    note("vllm_importance_sampling_correction", "only used with use_vllm", scope=TRL),
    note("vllm_importance_sampling_mode", "only used with use_vllm", scope=TRL),
    note("vllm_importance_sampling_cap", "only used with use_vllm", scope=TRL),
    note("use_data_producer", "lmforge generates each step's completions in the training process, in order, as the data "
         "producer does without async_prefetch: nothing changes", scope=TRL),
    later("async_prefetch", "generating the next batch in the background with the previous step's weights",
          nearest="async_prefetch: false (generation and training take turns)", scope=TRL),
    note("prefetch_depth", "only used with async_prefetch", scope=TRL, only_with="async_prefetch"),
    later("generation_batch_size", "a generation batch other than one optimizer step's completions",
          nearest="micro_batch_size x gradient_accumulation_steps (the completions of one step)", scope=TRL),
    later("sync_ref_model", "updating the reference model during training", nearest="beta (a fixed reference)", scope=TRL),
    note("ref_model_mixup_alpha", "only used with sync_ref_model", scope=TRL, only_with="sync_ref_model"),
    note("ref_model_sync_steps", "only used with sync_ref_model", scope=TRL, only_with="sync_ref_model"),
    later("min_p", "min-p sampling", nearest="top_p or top_k", scope=TRL),
    later("generation_kwargs", "extra sampling parameters", nearest="temperature, top_p, top_k, repetition_penalty", scope=TRL),
    later("use_liger_loss", "Liger's fused GRPO loss", nearest="use_liger_loss: false", scope=TRL),
    later("rollout_func", "custom multi-turn rollouts", nearest="reward_funcs (single-turn completions)", scope=TRL),
    later("streaming_partial_batch", "scoring prompt groups incrementally", nearest="streaming_partial_batch: false", scope=TRL),
    note("streaming_min_groups", "only used with streaming_partial_batch", scope=TRL, only_with="streaming_partial_batch"),
    later("off_policy_mask_threshold", "off-policy sequence masking", nearest="epsilon (the clipped ratio)", scope=TRL),
    later("reward_num_workers", "reward functions in worker processes", nearest="reward_num_workers: 1", scope=TRL,
          quiet=(None, 0, 1)),
    later("replay_buffer_size", "a replay buffer of rollout groups", nearest="replay_buffer_size: 0", scope=TRL),
    note("replay_recompute_logps", "only used with replay_buffer_size", scope=TRL, only_with="replay_buffer_size"),
    later("reroll_start_fraction", "deferred re-rolling of failed prompts", nearest="reroll_start_fraction: 1.0", scope=TRL,
          quiet=(None, 1, 1.0)),
    note("reroll_max_groups", "only used with reroll_start_fraction below 1", scope=TRL),

    # --- preference, RL, reward models, QAT ------------------------------------------------------------------------
    # rl: dpo | ipo | orpo | simpo | kto (lmforge/train/preference.py), rl: grpo (lmforge/recipes/grpo.py, its trl: section)
    done("rl", PREFERENCE_OBJECTIVES, TRAIN, GRPO_RECIPE, rule=rl_method), done("trl", GRPO_RECIPE),
    later("vllm", "a vLLM server or colocated vLLM engine for generation", nearest="trl.use_vllm: false (in-process generation)",
          rule=vllm_block), out("ebft", EBFT, nearest="rl: dpo or rl: grpo"),
    done("rl_beta", PREFERENCE_OBJECTIVES), done("dpo_loss_type", PREFERENCE_OBJECTIVES),
    done("dpo_loss_weights", PREFERENCE_OBJECTIVES), done("dpo_label_smoothing", PREFERENCE_OBJECTIVES),
    done("dpo_use_weighting", PREFERENCE_OBJECTIVES), done("dpo_norm_loss", PREFERENCE_OBJECTIVES),
    later("dpo_*", "this DPO option", nearest="dpo_loss_type, dpo_label_smoothing, dpo_use_weighting"),
    done("orpo_alpha", PREFERENCE_OBJECTIVES), done("simpo_gamma", PREFERENCE_OBJECTIVES), done("cpo_alpha", PREFERENCE_OBJECTIVES),
    done("kto_desirable_weight", PREFERENCE_OBJECTIVES), done("kto_undesirable_weight", PREFERENCE_OBJECTIVES),
    done("rpo_alpha", PREFERENCE_OBJECTIVES), done("max_prompt_len", "lmforge/recipes/finetune.py"),
    done("precompute_ref_log_probs", "lmforge/recipes/finetune.py", "lmforge/recipes/run.py"),
    done("reward_model", PREFERENCE_OBJECTIVES, "lmforge/models/setup.py", "lmforge/recipes/finetune.py"),
    out("process_reward_model", "process reward models (a score per reasoning step) are out of lmforge's scope",
        nearest="rl: dpo on step-level preference pairs"),
    done("center_rewards_coefficient", PREFERENCE_OBJECTIVES), done("num_labels", "lmforge/models/setup.py"),
    out("nemo_gym_*", RL), out("hatchery", "training on a remote service is out of lmforge's scope"),
    out("kd_*", "knowledge distillation from teacher logits is out of lmforge's scope"),
    out("diffusion", DIFFUSION),
    out("llmcompressor", "sparsity and compression recipes are out of lmforge's scope"),
    done("qat", MODEL, TRAINING, rule=qat_formats),
    out("quantization", "post-training quantization (torchao) is out of lmforge's scope; `lmforge export --quant` writes GGUF"),
    done("image_size", IMAGES), done("image_resize_algorithm", IMAGES),
    note("role_boundaries", "lmforge finds the assistant turns of image chats by rendering the chat template (its "
         "{% generation %} blocks, else each turn's prefix), not by scanning tokens for role markers"),

    # --- keys axolotl's examples still carry but its schema dropped ----------------------------------------------------
    out("rope_scaling", REMOVED, nearest="model_config overrides (not supported yet)"),
    out("gptq_groupsize", REMOVED), out("gptq_model_v1", REMOVED), out("gptq_disable_exllama", REMOVED),
    note("eta_min", f"{IGNORED_BY_AXOLOTL}; cosine_min_lr_ratio sets the cosine schedule's floor"),
    note("adam_eps", f"{IGNORED_BY_AXOLOTL}; adam_epsilon sets AdamW's epsilon"),
    out("torch_dtype", REMOVED, nearest="bf16"),
    out("full_finetune", REMOVED, nearest="leave adapter empty for a full fine-tune", rule=full_finetune),
    out("base_model_ignore_patterns", REMOVED, nearest="base_model (a local folder)"),
)


def table() -> dict[tuple[str, str], Key]:
    """(scope, name) → row; a row may appear once."""
    rows: dict[tuple[str, str], Key] = {}
    for row in KEYS:
        if (row.scope, row.name) in rows:
            raise ValueError(f"{row.scope}:{row.name} has two rows")
        rows[row.scope, row.name] = row
    return rows


def find(scope: str, name: str) -> Key | None:
    """The row for a key written at `scope`; families (`swanlab_*`) match by prefix, the longest first."""
    rows = _ROWS
    if (scope, name) in rows:
        return rows[scope, name]
    families = [r for (s, n), r in rows.items() if s == scope and n.endswith("*") and name.startswith(n[:-1])]
    return max(families, key=lambda r: len(r.name)) if families else None


_ROWS = table()
