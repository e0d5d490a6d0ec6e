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

A key set to its "off" value (false, null, 0, empty) asks for nothing and is accepted quietly,
unless the row says otherwise (``quiet``). Some rows accept a value now because on this machine
it changes nothing (``cpu``: a GPU-only kernel on a machine without a GPU) or because it asks for
exactly what lmforge does anyway (``same``); the rest of that row's values are refused.

The table was drawn up from axolotl's schema (``src/axolotl/utils/schemas/*.py`` and
``src/axolotl/integrations/*/args.py``) and its ``examples/`` folder; ``tests/data/axolotl_keys.txt``
lists the keys of the axolotl commit it was checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
SCOPES = (TOP, DATASET, DATASET_TYPE, PRETRAINING, SPECIAL_TOKENS, PLUGIN, TOKENIZER_TRAIN, MODEL_CONFIG)


@dataclass(frozen=True)
class Verdict:
    """What a rule decided for one value: accept quietly, with a notice, or refuse."""

    kind: Kind | None  # None: accepted quietly (the value asks for nothing)
    text: str = ""
    nearest: str | None = None
    issue: int | None = None
    value: Any = None  # with `replaces`: the value lmforge uses instead (axolotl's name for the same thing)
    replaces: bool = False


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
        only_with: str | None = None, same: Mapping[Any, str] | None = None) -> Key:
    """Out of scope: refused by name with the reason."""
    return Key(name, Kind.OUT_OF_SCOPE, text, scope=scope, quiet=quiet, nearest=nearest, only_with=only_with, same=same or {})


# --- value rules ------------------------------------------------------------------------------------------------

NO_GPU = "this machine has no GPU"
LM_EVAL = "lm-eval-harness benchmarks after training: the `lmforge eval` command brings them"
LM_EVAL_NEAREST = "val_set_size or test_datasets (eval loss and perplexity while training)"
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


def fp16(value: Any, facts: Facts) -> Verdict | None:
    """true refused on a machine without a GPU, pointing at bf16"""
    if value is True and not facts.gpu:
        return Verdict(Kind.NOT_YET, f"fp16 training needs a CUDA GPU (it runs with a gradient scaler there) and {NO_GPU}",
                       nearest="bf16: true (or bf16: false for fp32)")
    return None


def tf32(value: Any, facts: Facts) -> Verdict | None:
    """notice for true on a machine without a GPU (TF32 is a CUDA matmul mode)"""
    if value is True and not facts.gpu:
        return Verdict(Kind.NOTICE, f"TF32 is a mode of CUDA matmuls and {NO_GPU}: nothing changes")
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


CHECKPOINT_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")


def checkpointing_kwargs(value: Any, facts: Facts) -> Verdict | None:
    """entries other than torch.utils.checkpoint's own arguments refused"""
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in CHECKPOINT_KWARGS]
        if unknown:
            return Verdict(Kind.NOT_YET, f"gradient_checkpointing_kwargs.{unknown[0]} (not an argument of torch.utils.checkpoint)",
                           nearest=", ".join(CHECKPOINT_KWARGS))
    return None


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
    """offload / offload_disk refused"""
    if value in ("offload", "offload_disk"):
        return Verdict(Kind.NOT_YET, f"gradient_checkpointing: {value} offloads activations",
                       nearest="gradient_checkpointing: true with activation_offloading: true")
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
PAGED_OPTIMIZER = {"paged_adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "adamw_torch"}


def optimizer_names(value: Any, facts: Facts) -> Verdict | None:
    """also adamw_8bit (= adamw_bnb_8bit), adamw_torch_8bit (torchao's; runs as adamw_bnb_8bit, with a notice),
    and paged_adamw_8bit / paged_adamw_32bit on a machine without a GPU (run unpaged, with a notice);
    adamw_torch_4bit refused"""
    if value in SAME_OPTIMIZER:
        ours = SAME_OPTIMIZER[value]
        return Verdict(Kind.NOTICE, f"{value} is {ours}, the same bitsandbytes optimizer", value=ours, replaces=True)
    if value in PAGED_OPTIMIZER and not facts.gpu:
        ours = PAGED_OPTIMIZER[value]
        return Verdict(Kind.NOTICE, f"paging optimizer state is a CUDA memory feature and {NO_GPU}: runs as {ours}, "
                       "the same update", value=ours, replaces=True)
    if value in PAGED_OPTIMIZER:
        return Verdict(Kind.NOT_YET, f"optimizer: {value} (paged optimizer state)", nearest=f"optimizer: {PAGED_OPTIMIZER[value]}")
    if value == "adamw_torch_8bit":
        return Verdict(Kind.NOTICE, "torchao's 8-bit AdamW runs as adamw_bnb_8bit, bitsandbytes' 8-bit AdamW: the same "
                       "update with block-wise 8-bit states (the two round the states slightly differently)",
                       value="adamw_bnb_8bit", replaces=True)
    if value == "adamw_torch_4bit":
        return Verdict(Kind.NOT_YET, f"optimizer: {value} (torchao's 4-bit AdamW states)",
                       nearest="optimizer: adamw_bnb_8bit (8-bit states)")
    return None


def scheduler_names(value: Any, facts: Facts) -> Verdict | None:
    """also constant_with_warmup (= constant, which warms up first), with a notice"""
    if value == "constant_with_warmup":
        return Verdict(Kind.NOTICE, "lmforge's constant schedule warms up over warmup_steps / warmup_ratio first",
                       value="constant", replaces=True)
    return None


def overrides_with_base_model(value: Any, facts: Facts) -> Verdict | None:
    """refused with base_model and no architecture: that is axolotl's override of the base model's config"""
    if facts.config.get("base_model") is not None and isinstance(value, Mapping) and "architecture" not in value:
        return Verdict(Kind.NOT_YET, "model_config with base_model: overriding fields of the base model's config, "
                       "as axolotl reads it (lmforge's model_config builds a new model)", nearest="base_model")
    return None


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
    unknown = [k for k in value if k not in BNB_KWARGS]
    if unknown:
        return Verdict(Kind.NOT_YET, f"bnb_config_kwargs.{unknown[0]}", nearest=", ".join(BNB_KWARGS))
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
    """notice with pretraining_dataset (streamed anyway)"""
    if facts.config.get("pretraining_dataset") and not facts.config.get("datasets"):
        return Verdict(Kind.NOTICE, "lmforge streams Hub pretraining_dataset sources anyway")
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


def deepspeed_on_gpus(value: Any, facts: Facts) -> Verdict | None:
    """refused on a machine without a GPU unless deepspeed is installed (its CPU accelerator runs with gloo)"""
    import importlib.util

    if not facts.gpu and importlib.util.find_spec("deepspeed") is None:
        return Verdict(Kind.NOT_YET, f"DeepSpeed ZeRO runs on CUDA GPUs and {NO_GPU} (with `pip install deepspeed` "
                       "its CPU accelerator runs here too)",
                       nearest="fsdp_config: {reshard_after_forward: true} (FSDP2, the same sharding as ZeRO-3, runs on CPUs too)")
    return None


# --- the table ---------------------------------------------------------------------------------------------------

RL = "preference and RL training (DPO, KTO, ORPO, GRPO, EBFT, reward models) is out of lmforge's scope; TRL does it"
IMAGES = "lmforge/data/images.py"  # image-text rows: images read, resized, processed with the tokens
MOE_KERNELS = "MoE expert kernels and expert quantization are out of lmforge's scope"
PARALLEL = "tensor, context, sequence and expert parallelism are out of lmforge's scope (lmforge scales out with DDP, FSDP2 and DeepSpeed ZeRO)"
INTERNAL = "axolotl fills this in at run time; it is not a setting"
REMOVED = "axolotl removed this key (its current schema ignores or refuses it)"
GPU_KERNEL = "a Triton/CUDA kernel"
CPU_KERNEL = f"{GPU_KERNEL}; {NO_GPU}, and the plain PyTorch ops lmforge runs compute the same"
MODEL = "lmforge/models/setup.py"
TRAIN = "lmforge/recipes/finetune.py"
TRAINING = "lmforge/recipes/run.py"  # the setup train and pretrain share
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
KERNELS = "lmforge/models/kernels.py"  # attention backend, compile, fused-kernel plugins
DIST = "lmforge/train/distributed.py"

KEYS: tuple[Key, ...] = (
    # --- model and tokenizer -----------------------------------------------------------------------------------
    done("base_model", MODEL, TRAINING),
    done("base_model_config", MODEL),
    later("cls_model_config", "choosing the transformers config class", nearest="base_model (its config.json names the class)"),
    done("tokenizer_config", LOAD),
    later("tokenizer_use_fast", "the slow (Python) tokenizer", nearest="tokenizer_config", quiet=(None,),
          same={True: "lmforge loads the fast tokenizer (AutoTokenizer's default)"}),
    later("tokenizer_legacy", "the tokenizer's legacy flag", nearest="tokenizer_config"),
    later("tokenizer_use_mistral_common", "Mistral's mistral-common tokenizer; lmforge tokenizes with the model's Hugging "
          "Face tokenizer, whose ids and chat template may differ from it", nearest="tokenizer_use_mistral_common: false "
          "(the model's Hugging Face tokenizer)"),
    done("tokenizer_type", LOAD),
    done("processor_type", LOAD, MODEL),
    done("processor_kwargs", LOAD),
    done("freeze_mm_modules", MODEL),
    later("tokenizer_save_jinja_files", "saving the chat template inside tokenizer_config.json", quiet=(None,),
          same={True: "the tokenizer is saved with transformers' defaults (chat template in its own .jinja file)"}),
    done("trust_remote_code", MODEL),
    note("experimental_skip_move_to_device", "an axolotl loading-order detail for sharded training; the result is the same",
         quiet=(None,)),
    out("use_kernels", f"Hub kernels (MegaBlocks): {MOE_KERNELS}"),
    later("model_quantization_config", "loading Mxfp4 / FP8 checkpoints", nearest="load_in_4bit"),
    later("model_quantization_config_kwargs", "loading Mxfp4 / FP8 checkpoints", nearest="load_in_4bit"),
    out("use_onebitllms", "1.58-bit (BitNet) training is out of lmforge's scope"),
    done("model_type", MODEL),
    alias("type_of_model", "model_type", "axolotl's other name for model_type"),
    later("model_kwargs", "extra from_pretrained arguments", nearest="base_model"),
    later("overrides_of_model_kwargs", "extra from_pretrained arguments", nearest="base_model"),
    later("overrides_of_model_config", "overriding fields of the base model's config", nearest="base_model"),
    later("model_revision", "a Hub revision of the model", nearest="base_model (a local folder)"),
    later("revision_of_model", "a Hub revision of the model", nearest="base_model (a local folder)"),
    later("reinit_weights", "re-initialising a pretrained model's weights", nearest="model_config (a new model)"),
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
    note("is_llama_derived_model", "lmforge reads the architecture from the model config"),
    note("is_mistral_derived_model", "lmforge reads the architecture from the model config"),
    note("is_falcon_derived_model", "lmforge reads the architecture from the model config"),
    note("is_qwen_derived_model", "lmforge reads the architecture from the model config"),
    later("device_map", "placing the model across devices", nearest="fsdp"),
    note("low_cpu_mem_usage", "memory use while loading only; transformers loads lean by default"),
    later("max_memory", "per-device memory caps for placing the model", nearest="fsdp"),
    later("gpu_memory_limit", "per-device memory caps for placing the model", nearest="fsdp"),

    # --- output and Hub ----------------------------------------------------------------------------------------
    done("output_dir", TRAIN, PRETRAIN),
    later("hub_model_id", "pushing checkpoints to the Hub", nearest="output_dir (upload it with `hf upload`)"),
    later("hub_strategy", "pushing checkpoints to the Hub", nearest="output_dir", only_with="hub_model_id"),
    later("hub_revision", "pushing checkpoints to the Hub", nearest="output_dir", only_with="hub_model_id"),
    out("save_safetensors", "lmforge saves safetensors only (no pickle)", quiet=(None,),
        same={True: "lmforge always saves safetensors"}),
    later("push_dataset_to_hub", "pushing the prepared dataset to the Hub", nearest="dataset_prepared_path"),

    # --- adapters ------------------------------------------------------------------------------------------------
    done("adapter", MODEL),
    done("load_in_8bit", MODEL),
    done("load_in_4bit", MODEL),
    done("lora_model_dir", ADAPTERS),
    done("lora_r", ADAPTERS),
    done("lora_alpha", ADAPTERS),
    done("lora_dropout", ADAPTERS),
    done("lora_fan_in_fan_out", ADAPTERS),
    done("lora_target_modules", ADAPTERS),
    done("lora_target_linear", ADAPTERS),
    done("lora_modules_to_save", ADAPTERS),
    done("peft_use_dora", ADAPTERS),
    done("peft_use_rslora", ADAPTERS),
    done("lora_target_parameters", ADAPTERS),
    later("lora_rank_pattern", "per-module LoRA ranks", nearest="lora_r"),
    later("lora_alpha_pattern", "per-module LoRA alphas", nearest="lora_alpha"),
    later("peft_layers_to_transform", "LoRA on chosen layer indices", nearest="lora_target_modules (a regex)"),
    later("peft_layers_pattern", "LoRA on chosen layer indices", nearest="lora_target_modules (a regex)"),
    later("peft", "LoftQ initialisation", nearest="adapter: lora"),
    later("peft_layer_replication", "replicating layers under LoRA"),
    later("peft_init_lora_weights", "other LoRA initialisations", nearest="adapter: lora", quiet=(None,),
          same={True: "PEFT's default LoRA initialisation is what lmforge uses"}),
    later("peft_trainable_token_indices", "training chosen embedding rows", nearest="lora_modules_to_save: [embed_tokens]"),
    later("peft_ensure_weight_tying", "tying adapter weights of tied embeddings", nearest="lora_modules_to_save"),
    later("peft_autocast_adapter_dtype", "adapter weights in the compute dtype", quiet=(None,),
          same={True: "lmforge keeps adapter weights in fp32, as PEFT does by default"}),
    later("qlora_sharded_model_loading", "FSDP-QLoRA sharded loading", nearest="fsdp"),
    later("lora_on_cpu", "loading LoRA on the CPU first", cpu=f"{NO_GPU}: LoRA is loaded on the CPU anyway"),
    later("gptq", "training GPTQ-quantized models", nearest="load_in_4bit"),
    alias("bnb_config_kwargs", SPREAD, "its bnb_4bit_* entries are the flat bnb_4bit_* keys", rule=bnb_kwargs),
    done("bnb_4bit_quant_type", MODEL),
    done("bnb_4bit_use_double_quant", MODEL),
    done("bnb_4bit_compute_dtype", MODEL),
    later("loraplus_lr_ratio", "LoRA+ learning rates", nearest="learning_rate"),
    later("loraplus_lr_embedding", "LoRA+ learning rates", nearest="learning_rate", only_with="loraplus_lr_ratio"),
    later("merge_lora", "merging as part of a run", nearest="`lmforge merge-lora CONFIG`"),
    note("merge_method", "how axolotl's merge saves memory; `lmforge merge-lora` gives the same merged weights"),
    later("relora", "ReLoRA restarts", nearest="adapter: lora"),
    later("relora_prune_ratio", "ReLoRA restarts", only_with="relora"),
    later("relora_prune_method", "ReLoRA restarts", only_with="relora"),
    later("relora_cpu_offload", "ReLoRA restarts", only_with="relora"),
    later("jagged_restart_steps", "jagged learning-rate restarts", nearest="lr_scheduler"),
    later("jagged_restart_warmup_steps", "jagged learning-rate restarts", only_with="jagged_restart_steps"),
    later("jagged_restart_anneal_steps", "jagged learning-rate restarts", only_with="jagged_restart_steps"),
    later("mora", "MoRA adapters", nearest="adapter: lora"),

    # --- batch, optimizer, schedule -----------------------------------------------------------------------------
    done("micro_batch_size", TRAIN, PRETRAIN),
    done("gradient_accumulation_steps", TRAINING, PRETRAIN),
    alias("batch_size", "gradient_accumulation_steps", "sets gradient_accumulation_steps = batch_size / micro_batch_size",
          rule=batch_size, convert=lambda value, facts: value // (facts.config.get("micro_batch_size") or 1)),
    done("eval_batch_size", TRAIN, PRETRAIN),
    later("auto_find_batch_size", "searching for the largest batch that fits", nearest="micro_batch_size (`lmforge plan` sizes it)"),
    done("num_epochs", TRAINING),
    done("max_steps", TRAINING),
    done("learning_rate", TRAINING),
    later("embedding_lr", "a separate embedding learning rate", nearest="learning_rate"),
    later("embedding_lr_scale", "a separate embedding learning rate", nearest="learning_rate"),
    later("lr_groups", "per-module learning rates", nearest="learning_rate"),
    done("optimizer", TRAINING, rule=optimizer_names),
    later("optim_args", "extra optimizer arguments", nearest="adam_beta1, adam_beta2, adam_epsilon, weight_decay"),
    later("optim_target_modules", "GaLore target modules", nearest="optimizer"),
    note("torchdistx_path", "only used by optimizer adamw_anyprecision, which lmforge does not offer (the optimizer key refuses it)"),
    done("weight_decay", TRAINING),
    done("adam_beta1", TRAINING),
    done("adam_beta2", TRAINING),
    done("adam_epsilon", TRAINING),
    note("adam_epsilon2", "only used by optimizer came_pytorch, which lmforge does not offer (the optimizer key refuses it)"),
    note("adam_beta3", "only used by optimizer came_pytorch, which lmforge does not offer (the optimizer key refuses it)"),
    note("dion_*", "only used by optimizer dion, which lmforge does not offer (the optimizer key refuses it)"),
    note("qgalore_*", "only used by optimizer q_galore_adamw8bit, which lmforge does not offer (the optimizer key refuses it)"),
    later("grokfast_*", "the Grokfast gradient filter", nearest="optimizer"),
    done("sgd_momentum", TRAINING),
    done("sgd_nesterov", TRAINING),
    done("max_grad_norm", TRAINING),
    done("lr_scheduler", TRAINING, rule=scheduler_names),
    later("lr_scheduler_kwargs", "extra schedule arguments", nearest="cosine_min_lr_ratio, warmup_steps"),
    later("lr_quadratic_warmup", "quadratic warmup", nearest="warmup_steps"),
    done("cosine_min_lr_ratio", TRAINING),
    later("cosine_constant_lr_ratio", "holding the rate constant late in a cosine schedule", nearest="cosine_min_lr_ratio"),
    later("lr_div_factor", "one-cycle schedules", nearest="lr_scheduler"),
    done("warmup_steps", TRAINING),
    done("warmup_ratio", TRAINING),
    done("label_smoothing_factor", OBJECTIVES),
    done("dropout", MODEL),
    done("unfrozen_parameters", MODEL),
    later("spectrum_*", "Spectrum layer selection", nearest="unfrozen_parameters"),
    later("lisa_n_layers", "LISA layer sampling", nearest="unfrozen_parameters"),
    later("lisa_step_interval", "LISA layer sampling", only_with="lisa_n_layers"),
    later("lisa_layers_attribute", "LISA layer sampling", only_with="lisa_n_layers"),
    later("neftune_noise_alpha", "NEFTune embedding noise"),
    later("noisy_embedding_alpha", "NEFTune embedding noise (axolotl's older name)"),
    later("use_eaft", "entropy-aware focal loss", nearest="label_smoothing_factor"),
    later("eaft_alpha", "entropy-aware focal loss", only_with="use_eaft"),
    later("eaft_k", "entropy-aware focal loss", only_with="use_eaft"),
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
    later("bfloat16", "pure bf16 weights without mixed precision", nearest="bf16: true"),
    later("float16", "pure fp16 weights without mixed precision", nearest="bf16"),
    later("float32", "fp32 training", nearest="bf16: false"),
    later("fp8", "FP8 training", nearest="bf16"),
    later("fp8_enable_fsdp_float8_all_gather", "FP8 training under FSDP", nearest="fsdp", only_with="fp8"),
    done("gradient_checkpointing", MODEL, rule=gradient_checkpointing_modes),
    done("gradient_checkpointing_kwargs", MODEL, rule=checkpointing_kwargs),
    later("selective_checkpointing", "saving chosen ops under checkpointing", nearest="gradient_checkpointing"),
    done("activation_offloading", TRAINING, rule=offloading),
    later("layer_offloading", "offloading layer weights to CPU memory", nearest="fsdp"),
    note("gc_steps", "memory housekeeping (garbage collection); the result is the same"),
    note("gc_collect_steps", "memory housekeeping (garbage collection); the result is the same"),
    note("torch_empty_cache_steps", "memory housekeeping (CUDA cache); the result is the same"),
    later("tiled_mlp", "tiled MLPs for long sequences", nearest="gradient_checkpointing"),
    later("tiled_mlp_num_shards", "tiled MLPs for long sequences", only_with="tiled_mlp"),
    later("tiled_mlp_use_original_mlp", "tiled MLPs for long sequences", only_with="tiled_mlp"),
    done("chunked_cross_entropy", OBJECTIVES),
    done("chunked_cross_entropy_num_chunks", OBJECTIVES),

    # --- attention and kernels -------------------------------------------------------------------------------------
    done("attn_implementation", MODEL, rule=attention),
    *(alias(switch, "attn_implementation", f"axolotl's older switch for attn_implementation: {backend}",
            rule=legacy_attention(switch), convert=lambda value, facts, backend=backend: backend)
      for switch, backend in LEGACY_ATTENTION_SWITCHES.items()),
    later("flex_attn_compile_kwargs", "compiling flex attention with other options", nearest="torch_compile", rule=flex_compile),
    out("s2_attention", f"shifted-sparse attention: {REMOVED}"),
    out("flash_attn_rms_norm", f"{REMOVED}", nearest="plugins: [liger] with liger_rms_norm"),
    later("flash_attn_cross_entropy", "flash-attn's cross-entropy kernel", nearest="cut_cross_entropy", cpu=CPU_KERNEL),
    later("flash_attn_fuse_mlp", "flash-attn's fused MLP", cpu=CPU_KERNEL),
    out("flash_optimum", "BetterTransformer was removed from transformers"),
    later("gemma4_hybrid_attn_impl", "hybrid attention backends for Gemma 4", nearest="attn_implementation"),
    later("large_head_attention", "attention kernels for head_dim > 256", nearest="attn_implementation"),
    later("flash_attn_d512", "attention kernels for head_dim > 256 (older name)", nearest="attn_implementation"),
    note("sdpa_varlen", f"a speed-up of packed sdpa; {SDPA}"),
    later("fused_attn_kernel", "a fused RMSNorm+RoPE Triton kernel", cpu=CPU_KERNEL),
    later("scaling_softmax", "scaled-softmax attention (changes the model)"),
    later("scaling_softmax_factor", "scaled-softmax attention", only_with="scaling_softmax"),
    later("scaling_softmax_bias", "scaled-softmax attention", only_with="scaling_softmax"),
    later("lora_mlp_kernel", "axolotl's LoRA MLP kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    later("lora_qkv_kernel", "axolotl's LoRA QKV kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    later("lora_o_kernel", "axolotl's LoRA output-projection kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    later("lora_embedding_kernel", "axolotl's LoRA embedding kernels", nearest="adapter: lora", cpu=CPU_KERNEL),
    note("plugins", "each plugin named is decided by its own row (plugins[])"),  # never decided itself
    note("liger", "the Liger kernels plugin (liger-kernel): its liger_* keys choose the kernels", scope=PLUGIN,
         rule=on_gpu_only("the Liger kernels plugin (liger-kernel)")),
    note("cut_cross_entropy", "the Cut Cross-Entropy plugin: cut_cross_entropy: true turns it on", scope=PLUGIN,
         rule=on_gpu_only("the Cut Cross-Entropy plugin")),
    out("kernels", MOE_KERNELS, scope=PLUGIN),
    out("expert_parallel", PARALLEL, scope=PLUGIN),
    out("densemixer", MOE_KERNELS, scope=PLUGIN),
    out("diffusion", "diffusion language-model training is out of lmforge's scope", scope=PLUGIN),
    out("kd", "knowledge distillation from teacher logits is out of lmforge's scope", scope=PLUGIN),
    out("nemo_gym", RL, scope=PLUGIN),
    out("hatchery", "training on a remote service is out of lmforge's scope", scope=PLUGIN),
    out("llm_compressor", "sparsity and compression recipes are out of lmforge's scope", scope=PLUGIN),
    later("swanlab", "SwanLab logging", nearest="wandb_project, mlflow_tracking_uri", scope=PLUGIN),
    later("spectrum", "Spectrum layer selection", nearest="unfrozen_parameters", scope=PLUGIN),
    later("grokfast", "the Grokfast gradient filter", nearest="optimizer", scope=PLUGIN),
    later("lm_eval", LM_EVAL, nearest=LM_EVAL_NEAREST, issue=24, scope=PLUGIN),
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
    done("torch_compile_backend", KERNELS),
    done("torch_compile_mode", KERNELS),
    later("torch_compile_options", "inductor options for torch.compile", nearest="torch_compile_mode", only_with="torch_compile"),
    out("experts_implementation", MOE_KERNELS),
    out("quantize_moe_experts", MOE_KERNELS),
    out("llama4_linearized_experts", MOE_KERNELS),
    out("dense_mixer", MOE_KERNELS),
    out("expert_backend", MOE_KERNELS),
    out("nonexpert_quantization", MOE_KERNELS),
    out("moe_*", MOE_KERNELS),
    out("use_scattermoe", MOE_KERNELS),
    out("use_sonicmoe", MOE_KERNELS),
    out("use_dsv4_kernels", MOE_KERNELS),
    out("use_glm_dsa_kernels", MOE_KERNELS),
    out("dsv4_*", MOE_KERNELS),
    out("gemma4_fp8_nonexpert", MOE_KERNELS),
    out("gemma4_nf4_nonexpert", MOE_KERNELS),
    out("nvfp4_merge_aware", MOE_KERNELS),
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
    later("dp_shard_size", "FSDP/HSDP mesh sizes", nearest="fsdp_config (shards over every rank)", quiet=(None, 1)),
    later("dp_replicate_size", "FSDP/HSDP mesh sizes", nearest="fsdp_config (shards over every rank)", quiet=(None, 1)),
    later("accelerator_config", "accelerate's settings", nearest="gradient_accumulation_steps"),
    out("tensor_parallel_size", PARALLEL, quiet=(None, 0, 1)),
    out("context_parallel_size", PARALLEL, quiet=(None, 0, 1)),
    out("sequence_parallel_degree", PARALLEL, quiet=(None, 0, 1)),
    out("heads_k_stride", PARALLEL),
    out("ring_attn_func", PARALLEL),
    out("expert_parallel_size", PARALLEL, quiet=(None, 0, 1)),
    out("expert_parallel_*", PARALLEL),
    out("use_ray", "launching through Ray is out of lmforge's scope; it scales out with torchrun"),
    out("ray_run_name", "launching through Ray is out of lmforge's scope", only_with="use_ray"),
    out("ray_num_workers", "launching through Ray is out of lmforge's scope", only_with="use_ray"),
    out("resources_per_worker", "launching through Ray is out of lmforge's scope", only_with="use_ray"),
    out("world_size", "set by the launcher (torchrun) at run time, not in a config"),
    out("local_rank", "set by the launcher (torchrun) at run time, not in a config"),
    out("device", INTERNAL),

    # --- sequence length and packing --------------------------------------------------------------------------------
    done("sequence_len", PREPARE, TRAIN),
    later("excess_length_strategy", "dropping or refusing over-long rows", nearest="sequence_len (rows are truncated and counted)",
          same={"truncate": "lmforge truncates over-long rows to sequence_len and counts them"}),
    later("eval_sequence_len", "a separate eval length", nearest="sequence_len"),
    later("min_sample_len", "dropping short rows"),
    done("sample_packing", TRAIN),
    done("eval_sample_packing", TRAIN),
    note("sample_packing_eff_est", "lmforge measures packing efficiency itself"),
    later("sample_packing_group_size", "tuning axolotl's packing search", nearest="sample_packing"),
    later("sample_packing_bin_size", "tuning axolotl's packing search", nearest="sample_packing"),
    later("sample_packing_sequentially", "packing in dataset order", nearest="sample_packing"),
    note("sample_packing_mp_start_method", "how axolotl starts packing processes; the packing is the same"),
    done("pad_to_sequence_len", TRAIN),
    later("pad_to_multiple_of", "padding batches to a multiple", nearest="pad_to_sequence_len"),
    later("curriculum_sampling", "sequential sampling", nearest="shuffle_merged_datasets"),
    later("multipack_real_batches", "axolotl's multipack batching", nearest="sample_packing"),
    later("batch_flattening", "flattened batches without packing", nearest="sample_packing"),
    later("use_pose", "PoSE position skipping"),
    later("pose_split_on_token_ids", "PoSE position skipping", only_with="use_pose"),
    later("pose_max_context_len", "PoSE position skipping", only_with="use_pose"),
    later("pose_num_chunks", "PoSE position skipping", only_with="use_pose"),
    later("pretrain_multipack_buffer_size", "packing streamed pretraining data", nearest="pretraining_dataset"),
    later("pretrain_multipack_attn", "keeping packed pretraining documents apart", quiet=(None,),
          same={False: "lmforge's pretraining windows attend across document boundaries, as false asks"}),
    later("pretraining_sample_concatenation", "concatenating pretraining samples", nearest="pretraining_dataset"),
    later("streaming", "streaming fine-tuning datasets", nearest="pretraining_dataset (streamed)", rule=streaming),
    note("streaming_multipack_buffer_size", "a buffer size of axolotl's streaming packer", only_with="streaming"),
    out("max_packed_sequence_len", REMOVED, nearest="sample_packing"),
    out("sample_packing_seq_len_multiplier", REMOVED, nearest="sample_packing"),

    # --- data ----------------------------------------------------------------------------------------------------------
    done("datasets", PREPARE),
    done("test_datasets", PREPARE),
    done("val_set_size", PREPARE),
    done("dataset_prepared_path", PREPARE),
    done("dataset_processes", PREPARE),
    alias("dataset_num_proc", "dataset_processes", "axolotl's other name for dataset_processes"),
    done("shuffle_merged_datasets", PREPARE),
    later("shuffle_before_merging_datasets", "shuffling each dataset before merging", nearest="shuffle_merged_datasets"),
    done("skip_bad_rows", PREPARE),
    done("skip_prepare_dataset", PREPARE),
    note("num_dataset_shards_to_save", "how axolotl stores its prepared dataset; lmforge's cache is its own"),
    later("dataset_shard_num", "training on one shard of the data"),
    later("dataset_shard_idx", "training on one shard of the data", only_with="dataset_shard_num"),
    later("dataset_exact_deduplication", "removing duplicate rows", nearest="`lmforge data report` (counts duplicates)"),
    note("dataset_keep_in_memory", "memory use while preparing; the prepared data is the same"),
    note("dataloader_pin_memory", "a data-loader speed setting; lmforge's loop batches in process and the batches are the same"),
    note("dataloader_num_workers", "a data-loader speed setting; lmforge's loop batches in process and the batches are the same"),
    note("dataloader_prefetch_factor", "a data-loader speed setting; lmforge's loop batches in process and the batches are the same"),
    later("dataloader_drop_last", "dropping the last partial batch"),
    note("remove_unused_columns", "lmforge keeps the columns a row needs (with processor_type: its images, what "
         "remove_unused_columns: false asks axolotl for) and drops the rest after tokenizing anyway"),
    later("preprocess_iterable", "preparing datasets as iterables", nearest="dataset_prepared_path"),
    out("is_preprocess", INTERNAL),
    out("total_num_tokens", INTERNAL),
    out("total_supervised_tokens", INTERNAL),
    done("chat_template", FORMATS, "lmforge/data/formats/templates.py"),
    done("chat_template_jinja", FORMATS, "lmforge/data/formats/templates.py"),
    done("chat_template_kwargs", FORMATS),
    done("eot_tokens", FORMATS),
    later("default_system_message", "a default system message", nearest="system_prompt (alpaca_w_system)"),
    done("pretraining_dataset", PRETRAIN),
    done("model_config", PRETRAIN, rule=overrides_with_base_model),
    done("objective", PRETRAIN),
    done("mlm_probability", PRETRAIN),
    done("tokenizer_train", TOKENIZER),
    done("shards_dir", PRETRAIN),
    done("shard_doc_per", PRETRAIN),
    done("sample_prompt", PRETRAIN),

    # --- a datasets: entry ----------------------------------------------------------------------------------------------
    done("path", "lmforge/data/sources.py", scope=DATASET),
    done("type", PREPARE, scope=DATASET),
    done("ds_type", PREPARE, scope=DATASET),
    done("data_files", PREPARE, scope=DATASET),
    done("split", PREPARE, scope=DATASET),
    done("name", PREPARE, scope=DATASET),
    done("field", FORMATS, scope=DATASET),
    done("system_prompt", FORMATS, scope=DATASET),
    done("field_messages", FORMATS, scope=DATASET),
    done("message_property_mappings", FORMATS, scope=DATASET),
    done("roles", FORMATS, scope=DATASET),
    done("roles_to_train", FORMATS, scope=DATASET),
    done("train_on_eos", FORMATS, scope=DATASET),
    later("input_transform", "transforming rows before the format", nearest="type: my_module.my_function", scope=DATASET),
    later("shards", "reading one shard of a dataset", nearest="split (e.g. train[:10%])", scope=DATASET),
    later("shards_idx", "reading one shard of a dataset", scope=DATASET, only_with="shards"),
    later("preprocess_shards", "preparing a dataset in chunks", scope=DATASET),
    out("conversation", "FastChat conversation templates (axolotl's older sharegpt)", nearest="chat_template", scope=DATASET),
    done("chat_template", FORMATS, "lmforge/data/formats/templates.py", scope=DATASET),
    done("chat_template_jinja", FORMATS, "lmforge/data/formats/templates.py", scope=DATASET),
    later("input_format", "axolotl's input_format", scope=DATASET),
    later("field_human", "axolotl's older sharegpt field names", nearest="message_property_mappings, roles", scope=DATASET),
    later("field_model", "axolotl's older sharegpt field names", nearest="message_property_mappings, roles", scope=DATASET),
    later("field_tools", "tool definitions in chat rows", scope=DATASET),
    done("field_thinking", FORMATS, scope=DATASET),
    done("template_thinking_key", FORMATS, scope=DATASET),
    done("split_thinking", FORMATS, scope=DATASET),
    done("train_on_thinking", FORMATS, scope=DATASET),
    # folded into message_property_mappings while the config is validated
    done("message_field_role", "lmforge/config/sections.py", scope=DATASET),
    done("message_field_content", "lmforge/config/sections.py", scope=DATASET),
    later("message_field_training", "training chosen turns by a per-turn flag", nearest="roles_to_train", scope=DATASET),
    later("message_field_training_detail", "training chosen spans of a turn", nearest="roles_to_train", scope=DATASET),
    done("train_on_eot", FORMATS, scope=DATASET),
    done("drop_system_message", FORMATS, scope=DATASET),
    out("trust_remote_code", "lmforge never runs a dataset's loading script", scope=DATASET),
    later("revision", "a Hub revision of a dataset", nearest="path (a local copy)", scope=DATASET),
    out("logprobs_field", "distillation from teacher log-probabilities is out of lmforge's scope", scope=DATASET),
    out("temperature", "distillation from teacher log-probabilities is out of lmforge's scope", scope=DATASET),
    out("field_chosen", RL, scope=DATASET),
    out("field_rejected", RL, scope=DATASET),
    out("step_separator", RL, scope=DATASET),
    out("max_completion_length", RL, scope=DATASET),
    out("train_on_last_step_only", RL, scope=DATASET),
    later("length", "synthetic datasets", scope=DATASET),
    later("sequence_length", "synthetic datasets", scope=DATASET),
    later("min_input_id", "synthetic datasets", scope=DATASET),
    later("max_input_id", "synthetic datasets", scope=DATASET),
    later("seed", "synthetic datasets", nearest="the top-level seed", scope=DATASET),

    # --- a user-defined `type:` mapping ----------------------------------------------------------------------------------
    done("system_prompt", USER_DEFINED, scope=DATASET_TYPE),
    done("field_system", USER_DEFINED, scope=DATASET_TYPE),
    done("field_instruction", USER_DEFINED, scope=DATASET_TYPE),
    done("field_input", USER_DEFINED, scope=DATASET_TYPE),
    done("field_output", USER_DEFINED, scope=DATASET_TYPE),
    done("format", USER_DEFINED, scope=DATASET_TYPE),
    done("no_input_format", USER_DEFINED, scope=DATASET_TYPE),
    later("system_format", "a separate system template", nearest="format (with {system})", scope=DATASET_TYPE),
    out("field_prompt", RL, scope=DATASET_TYPE),
    out("field_chosen", RL, scope=DATASET_TYPE),
    out("field_rejected", RL, scope=DATASET_TYPE),
    out("prompt_format", RL, scope=DATASET_TYPE),
    out("chosen_format", RL, scope=DATASET_TYPE),
    out("rejected_format", RL, scope=DATASET_TYPE),
    out("field_label", RL, scope=DATASET_TYPE),
    out("field_completion", RL, scope=DATASET_TYPE),
    out("completion_format", RL, scope=DATASET_TYPE),

    # --- a pretraining_dataset: entry ------------------------------------------------------------------------------------
    done("path", PRETRAIN, scope=PRETRAINING),
    done("name", "lmforge/data/shards.py", scope=PRETRAINING),
    done("split", "lmforge/data/shards.py", scope=PRETRAINING),
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
    done("architecture", PRETRAIN, scope=MODEL_CONFIG),
    done("preset", PRETRAIN, scope=MODEL_CONFIG),
    *(done(name, "lmforge/models/build.py", scope=MODEL_CONFIG)
      for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings",
                   "head_dim")),

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
    done("resume_from_checkpoint", TRAINING),
    done("auto_resume_from_checkpoints", TRAINING),
    done("logging_steps", TRAINING),
    done("early_stopping_patience", TRAINING),
    done("load_best_model_at_end", TRAINING),
    later("metric_for_best_model", "other metrics for the best checkpoint", nearest="load_best_model_at_end", rule=best_metric),
    later("greater_is_better", "higher-is-better metrics", nearest="load_best_model_at_end", rule=lower_is_better),
    done("loss_watchdog_threshold", TRAINING),
    done("loss_watchdog_patience", TRAINING),
    later("do_causal_lm_eval", "generation metrics during eval", nearest="eval_steps (eval loss and perplexity)"),
    later("eval_causal_lm_metrics", "generation metrics during eval", only_with="do_causal_lm_eval"),
    later("do_bench_eval", "benchmark evals during training"),
    later("bench_dataset", "benchmark evals during training", only_with="do_bench_eval"),
    later("bench_split", "benchmark evals during training", only_with="do_bench_eval"),
    later("eval_table_size", "sample generations during eval", nearest="`lmforge inference`"),
    later("eval_max_new_tokens", "sample generations during eval", nearest="`lmforge inference`"),
    later("generate_samples", "sample generations during training", nearest="sample_prompt (pretraining), `lmforge inference`"),
    note("num_generation_samples", "sample generation settings", only_with="generate_samples"),
    note("generation_max_new_tokens", "sample generation settings", only_with="generate_samples"),
    note("generation_temperature", "sample generation settings", only_with="generate_samples"),
    note("generation_top_p", "sample generation settings", only_with="generate_samples"),
    note("generation_top_k", "sample generation settings", only_with="generate_samples"),
    note("generation_prompt_ratio", "sample generation settings", only_with="generate_samples"),
    note("generation_do_sample", "sample generation settings", only_with="generate_samples"),
    later("profiler_steps", "the PyTorch profiler"),
    later("profiler_steps_start", "the PyTorch profiler", only_with="profiler_steps"),
    note("include_tokens_per_second", "lmforge always reports tokens/s (summary.json and the logs)"),
    note("include_tkps", "lmforge always reports tokens/s (summary.json and the logs)", quiet=(None,)),
    later("lm_eval_*", LM_EVAL, nearest=LM_EVAL_NEAREST, issue=24),

    # --- logging --------------------------------------------------------------------------------------------------------
    note("use_wandb", "W&B logging is on when wandb_project is set", rule=tracker_switch("wandb_project")),
    done("wandb_project", LOGGERS),
    done("wandb_entity", LOGGERS),
    done("wandb_name", LOGGERS),
    done("wandb_run_id", LOGGERS),
    done("wandb_mode", LOGGERS),
    done("wandb_watch", LOGGERS, rule=wandb_off),
    done("wandb_log_model", TRAINING, rule=wandb_off),
    note("use_mlflow", "MLflow logging is on when mlflow_tracking_uri is set", rule=tracker_switch("mlflow_tracking_uri")),
    done("mlflow_tracking_uri", LOGGERS),
    done("mlflow_experiment_name", LOGGERS),
    done("mlflow_run_name", LOGGERS),
    later("hf_mlflow_log_artifacts", "MLflow checkpoint artifacts", nearest="mlflow_tracking_uri"),
    done("use_tensorboard", LOGGERS),
    later("use_comet", "Comet logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("comet_*", "Comet logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("use_trackio", "Trackio logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("trackio_*", "Trackio logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("use_swanlab", "SwanLab logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("swanlab_*", "SwanLab logging", nearest="wandb_project, mlflow_tracking_uri"),
    later("use_otel_metrics", "OpenTelemetry metrics", nearest="wandb_project, mlflow_tracking_uri"),
    later("otel_metrics_host", "OpenTelemetry metrics", only_with="use_otel_metrics"),
    later("otel_metrics_port", "OpenTelemetry metrics", only_with="use_otel_metrics"),
    note("logging_dir", "logs go to output_dir"),
    note("debug", "use --debug on the command line for tracebacks"),
    note("strict", "lmforge always validates strictly"),
    out("axolotl_config_path", INTERNAL),
    out("capabilities", INTERNAL),
    out("env_capabilities", INTERNAL),
    out("trainer_cls", "lmforge runs its own loop, not an HF Trainer class"),
    done("gradio_title", INFERENCE), done("gradio_share", INFERENCE), done("gradio_server_name", INFERENCE),
    done("gradio_server_port", INFERENCE), done("gradio_max_new_tokens", INFERENCE), done("gradio_temperature", INFERENCE),
    later("gradio_*", "web chat settings", nearest="`lmforge inference --gradio`"),
    # lmforge's own generation defaults (`lmforge inference`, --chat, --gradio, serve); flags override them
    done("max_new_tokens", INFERENCE), done("temperature", INFERENCE), done("top_p", INFERENCE), done("top_k", INFERENCE),
    done("repetition_penalty", INFERENCE), done("truncate_prompt", INFERENCE),

    # --- preference, RL, reward models, QAT ------------------------------------------------------------------------
    out("rl", RL), out("trl", RL), out("vllm", RL), out("ebft", RL), out("rl_beta", RL), out("dpo_*", RL),
    out("orpo_alpha", RL), out("simpo_gamma", RL), out("cpo_alpha", RL), out("kto_desirable_weight", RL),
    out("kto_undesirable_weight", RL), out("rpo_alpha", RL), out("max_prompt_len", RL), out("precompute_ref_log_probs", RL),
    out("reward_model", RL), out("process_reward_model", RL), out("center_rewards_coefficient", RL), out("num_labels", RL),
    out("nemo_gym_*", RL), out("hatchery", "training on a remote service is out of lmforge's scope"),
    out("kd_*", "knowledge distillation from teacher logits is out of lmforge's scope"),
    out("diffusion", "diffusion language-model training is out of lmforge's scope"),
    out("llmcompressor", "sparsity and compression recipes are out of lmforge's scope"),
    out("qat", "quantization-aware training is out of lmforge's scope"),
    out("quantization", "post-training quantization (torchao) is out of lmforge's scope; `lmforge export --quant` writes GGUF"),
    done("image_size", IMAGES), done("image_resize_algorithm", IMAGES),
    note("role_boundaries", "lmforge finds the assistant turns of image chats by rendering the chat template (its "
         "{% generation %} blocks, else each turn's prefix), not by scanning tokens for role markers"),

    # --- keys axolotl's examples still carry but its schema dropped ----------------------------------------------------
    out("rope_scaling", REMOVED, nearest="model_config overrides (not supported yet)"),
    out("gptq_groupsize", REMOVED), out("gptq_model_v1", REMOVED), out("gptq_disable_exllama", REMOVED),
    out("eta_min", REMOVED, nearest="cosine_min_lr_ratio"),
    out("adam_eps", REMOVED, nearest="adam_epsilon"),
    out("torch_dtype", REMOVED, nearest="bf16"),
    out("full_finetune", REMOVED, nearest="leave adapter empty for a full fine-tune"),
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
