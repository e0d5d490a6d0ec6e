"""Cross-key checks: keys that are each valid alone but contradict each other, caught before any model loads.

Every config goes through here once (``build_config``), so `validate`, `train`, `pretrain` and
the other commands refuse the same mistakes with the same line, naming the key's ``file:line``.
A contradiction that would fail (or silently do nothing) minutes into a run is an error; a
setting that runs but most likely not as meant is a warning (``LmforgeConfig.warnings``), which
`validate` and the training recipes print.

Imports no torch: validating a config stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config.loader import RawConfig
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.config.sections import TrainingSection
    from lmforge.config.schema import LmforgeConfig

ADAPTER_ONLY_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "lora_fan_in_fan_out",
                     "lora_modules_to_save", "lora_model_dir", "peft_use_dora", "peft_use_rslora")
FOUR_BIT_KEYS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


def warmup_warning(t: "TrainingSection", warmup: int, total: int) -> str | None:
    """The warning for a warm-up that lasts the whole run (the learning rate never reaches its peak)."""
    if not warmup or warmup < total:
        return None
    key = "warmup_steps" if t.warmup_steps is not None else "warmup_ratio"
    value = t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio
    return (f"warm-up ({key}: {value}) lasts {warmup} steps, the whole run of {total}, so the learning rate never "
            f"reaches learning_rate ({t.learning_rate}); lower {key} below {total}, or raise max_steps")


class _Checker:
    def __init__(self, cfg: "LmforgeConfig", raw: RawConfig) -> None:
        self.cfg, self.raw = cfg, raw
        self.warnings: list[str] = []

    def where(self, *path: str | int) -> str:
        return self.raw.where(tuple(path))

    def error(self, key: str | tuple, message: str, fix: str) -> LmforgeError:
        path = key if isinstance(key, tuple) else (key,)
        return LmforgeError(message, where=self.where(*path), fix=fix)

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{self.where(key)}: {message}")

    def given(self, key: str) -> bool:
        """Whether the user wrote `key` (in the file or on the command line), whatever its value."""
        return key in self.raw.values


def check_cross_keys(cfg: "LmforgeConfig", raw: RawConfig) -> list[str]:
    """Raise an LmforgeError for the first contradiction; return the warnings (each 'file:line: what')."""
    c = _Checker(cfg, raw)
    _model_and_adapter(c)
    _evaluation(c)
    _schedule(c)
    _pretraining(c)
    _speed(c)
    _distributed(c)
    _remote_code(c)
    _preference(c)
    _images(c)
    _mistral_common(c)
    _eaft(c)
    return c.warnings


def _eaft(c: _Checker) -> None:
    """use_eaft re-weights the causal-LM loss of instruction tuning and pretraining; what it cannot reach is refused."""
    cfg = c.cfg
    t = cfg.training
    if not t.use_eaft:
        for key in ("eaft_alpha", "eaft_k"):
            if c.given(key):
                c.warn(key, f"{key} has no effect without use_eaft: true")
        return
    if cfg.rl.rl or cfg.rl.reward_model:
        what = f"rl: {cfg.rl.rl}" if cfg.rl.rl else "reward_model: true"
        raise c.error("use_eaft", f"use_eaft weighs next-token cross-entropy, and {what} trains its own loss",
                      "remove use_eaft (EAFT is a supervised fine-tuning loss)")
    if cfg.is_pretraining and cfg.pretrain.objective == "mlm":
        raise c.error("use_eaft", "use_eaft weighs next-token cross-entropy, and this run trains a masked LM",
                      "remove use_eaft, or pretrain a causal LM")
    if cfg.model.processor_type:
        raise c.error("use_eaft", "use_eaft is not wired for image-text models (processor_type) yet",
                      "remove use_eaft for this image-text run")
    if t.chunked_cross_entropy:
        raise c.error("chunked_cross_entropy", "use_eaft needs the labelled positions' whole logits for its entropy "
                      "weights, and chunked_cross_entropy never builds them", "keep one of use_eaft and chunked_cross_entropy")


def _mistral_common(c: _Checker) -> None:
    """tokenizer_use_mistral_common: mistral-common encodes conversations itself (no Jinja template) with a fixed vocabulary."""
    model, data = c.cfg.model, c.cfg.data
    if not model.tokenizer_use_mistral_common:
        return
    why = "tokenizer_use_mistral_common encodes conversations with mistral-common, which uses no chat template"
    fix = "remove it (or set tokenizer_use_mistral_common: false to render the chat template with the Hugging Face tokenizer)"
    for key in ("chat_template_jinja", "chat_template_kwargs", "chat_template"):  # (chat_template_jinja implies chat_template)
        if getattr(data, key) not in (None, {}, ""):
            raise c.error(key, f"{key} sets a chat template, and {why}", fix)
    for group in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(data, group) or []):
            for key in ("chat_template_jinja", "chat_template"):
                if getattr(spec, key, None):
                    raise c.error((group, index, key), f"{group}[{index}].{key} sets a chat template, and {why}", fix)
    for key in ("special_tokens", "tokens"):
        if getattr(model, key):
            raise c.error(key, f"{key} adds tokens, and mistral-common's vocabulary (tekken.json) is fixed",
                          f"remove {key}, or set tokenizer_use_mistral_common: false")
    if data.eot_tokens:
        c.warn("eot_tokens", "eot_tokens changes nothing with tokenizer_use_mistral_common: mistral-common ends every "
                             "assistant turn with EOS (</s>), the one token an answer stops at")


def _preference(c: _Checker) -> None:
    """rl: trains on pairs (or labelled completions) of prompt + answer: no packing, no raw-text pretraining."""
    rl = c.cfg.rl
    if rl.reward_model and rl.rl:
        raise c.error("reward_model", f"reward_model: true trains a scorer, rl: {rl.rl} a policy; one run does one",
                      "remove rl (train the reward model first), or remove reward_model")
    if rl.num_labels is not None and not rl.reward_model:
        c.warn("num_labels", "num_labels only shapes a reward model's head (reward_model: true): it changes nothing here")
    if rl.center_rewards_coefficient and not rl.reward_model:
        c.warn("center_rewards_coefficient", "center_rewards_coefficient only adds to a reward model's loss (reward_model: true): "
               "it changes nothing here")
    if rl.reward_model and c.cfg.data.sample_packing:
        raise c.error("sample_packing", "reward_model scores whole answers per row; sample_packing does not apply to preference pairs",
                      "remove sample_packing (or set it to false)")
    if rl.rl is None:
        return
    if c.cfg.pretrain.pretraining_dataset or c.cfg.is_pretraining:
        key = "pretraining_dataset" if c.given("pretraining_dataset") else "rl"
        raise c.error(key, f"rl: {rl.rl} trains on preference rows of `datasets`; pretraining_dataset (raw text) has no pairs",
                      "pretrain (or fine-tune) first, then run rl: with datasets: of preference pairs")
    if c.cfg.data.sample_packing:
        raise c.error("sample_packing", f"rl: {rl.rl} compares whole answers per row; sample_packing does not apply to preference pairs",
                      "remove sample_packing (or set it to false)")
    if rl.precompute_ref_log_probs and rl.rl in ("orpo", "simpo"):
        c.warn("precompute_ref_log_probs", f"rl: {rl.rl} uses no reference model: precompute_ref_log_probs changes nothing")
    if rl.precompute_ref_log_probs and rl.rl == "kto":
        raise c.error("precompute_ref_log_probs", "rl: kto's KL rows pair each prompt with another row's answer of the same "
                      "micro-batch, so their reference log-probabilities cannot be computed before batching",
                      "remove precompute_ref_log_probs (LoRA runs use the policy with its adapter off: no second copy)")
    if rl.dpo_loss_type and rl.rl != "dpo":
        raise c.error("dpo_loss_type", f"dpo_loss_type chooses rl: dpo's loss, and rl is {rl.rl}", "remove dpo_loss_type, or set rl: dpo")


def _images(c: _Checker) -> None:
    """Image-text training (processor_type): what it cannot combine with, refused before anything loads."""
    cfg = c.cfg
    if not cfg.model.processor_type:
        for key in ("image_size", "image_resize_algorithm", "processor_kwargs"):
            if c.given(key) and c.raw.values.get(key) not in (None, {}, ""):
                c.warn(key, f"{key} has no effect without processor_type (an image-text model)")
        return
    if cfg.data.sample_packing:
        raise c.error("sample_packing", "sample_packing: true packs token rows, and image-text rows carry pixel "
                      "tensors that cannot be packed with them", "set sample_packing: false (image chats are padded per batch)")
    if cfg.is_pretraining:
        raise c.error("processor_type", "processor_type trains on image chats (datasets:), not on pretraining text",
                      "remove processor_type, or use datasets: with type: chat_template")


def _remote_code(c: _Checker) -> None:
    """trust_remote_code runs Python from the model's repository: allowed when asked, never silently."""
    if c.cfg.model.trust_remote_code:
        c.warn("trust_remote_code", "trust_remote_code: true runs Python code that comes with the model (and its tokenizer); "
                                    "use it only for a repository you trust")


def _model_and_adapter(c: _Checker) -> None:
    cfg = c.cfg
    adapter, q = cfg.adapter.adapter, cfg.quantization
    quantized = "load_in_4bit" if q.load_in_4bit else "load_in_8bit" if q.load_in_8bit else None
    if adapter == "qlora" and not quantized:
        raise c.error("adapter", "adapter: qlora trains LoRA on a quantized base, but the base is not quantized",
                      "add load_in_4bit: true, or use adapter: lora")
    if quantized and not adapter:
        raise c.error(quantized, f"{quantized}: a 4/8-bit base model cannot be fully fine-tuned (its weights cannot take updates)",
                      "set adapter: qlora (or lora), or remove " + quantized)
    if cfg.model.model_quantization_config and quantized:
        raise c.error(quantized, f"{quantized} quantizes a bf16 checkpoint, and model_quantization_config says the checkpoint "
                      "is quantized already", "keep one of them")
    if cfg.quantization.qat is not None and adapter:
        raise c.error("qat", "qat fake-quantises the weights that train, and an adapter leaves them frozen",
                      "remove adapter (QAT fine-tunes the full model), or remove qat")
    if cfg.training.unfrozen_parameters and adapter and cfg.adapter.lora_model_dir:
        raise c.error("unfrozen_parameters", "unfrozen_parameters with lora_model_dir: the loaded adapter fixes which modules train fully",
                      "remove unfrozen_parameters, or train a new adapter (no lora_model_dir)")
    if not adapter:
        unused = [k for k in ADAPTER_ONLY_KEYS if c.given(k)]
        if unused:
            c.warn(unused[0], f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without an adapter "
                              "(set adapter: lora, or remove them)")
    if q.quantize_moe_experts and not quantized:
        raise c.error("quantize_moe_experts", "quantize_moe_experts holds the experts in 4 or 8 bit beside a quantized "
                      "base, and the base is not quantized here", "add load_in_4bit: true (or load_in_8bit) with an adapter, "
                      "or remove quantize_moe_experts")
    if not q.load_in_4bit:
        unused = [k for k in FOUR_BIT_KEYS if c.given(k)]
        if unused:
            c.warn(unused[0], f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without load_in_4bit: true")


def _has_eval_split(cfg: "LmforgeConfig") -> bool:
    # Pretraining always holds out a share of the tokens (val_set_size, or a small default).
    return cfg.is_pretraining or bool(cfg.data.val_set_size) or bool(cfg.data.test_datasets)


def _evaluation(c: _Checker) -> None:
    cfg, t = c.cfg, c.cfg.training
    if cfg.data.test_datasets and cfg.data.val_set_size:
        raise c.error("val_set_size", "set either val_set_size or test_datasets, not both", "remove one")
    needs_eval = [k for k in ("early_stopping_patience", "load_best_model_at_end") if getattr(t, k)]
    if needs_eval and not _has_eval_split(cfg):
        raise c.error(needs_eval[0], f"{needs_eval[0]} compares eval losses, but there is no eval split",
                      "set val_set_size (e.g. 0.05) or test_datasets")
    if cfg.evaluation.do_causal_lm_eval and not _has_eval_split(cfg):
        c.warn("do_causal_lm_eval", "do_causal_lm_eval has no effect: it answers eval rows, and there is no eval split "
                                    "(set val_set_size or test_datasets)")
    if not _has_eval_split(cfg):
        for key in ("eval_steps", "evals_per_epoch", "eval_batch_size"):
            if getattr(t, key) is not None:
                c.warn(key, f"{key} has no effect: there is no eval split (set val_set_size or test_datasets)")
                break
    elif t.early_stopping_patience and not (t.eval_steps or t.evals_per_epoch):
        c.warn("early_stopping_patience", "early_stopping_patience never stops the run: without eval_steps or "
                                          "evals_per_epoch the run evaluates only at its end")


def _schedule(c: _Checker) -> None:
    t = c.cfg.training
    if t.max_steps and t.warmup_steps is not None and (line := warmup_warning(t, t.warmup_steps, t.max_steps)):
        c.warn("warmup_steps", line)


def _pretraining(c: _Checker) -> None:
    cfg = c.cfg
    if not cfg.is_pretraining:
        return
    p = cfg.pretrain
    if cfg.data.val_set_size >= 1:
        raise c.error("val_set_size", f"val_set_size {cfg.data.val_set_size:g} is a row count; pretraining holds out a share of the tokens",
                      "use a share below 1, e.g. 0.01")
    if p.model_config_ is not None:
        for key in ("adapter", "load_in_4bit", "load_in_8bit"):
            if getattr(cfg.adapter, key, None) or getattr(cfg.quantization, key, None):
                raise c.error(key, f"{key} with model_config: a new model's weights are random, so there is no base to adapt or quantize",
                              f"remove {key} (model_config trains every weight), or continue pretraining a base_model")
    if p.objective == "mlm" and cfg.adapter.adapter:
        raise c.error("adapter", "adapters are set up for causal LMs; objective: mlm trains every weight",
                      "remove adapter, or use objective: clm")
    if p.pretraining_dataset and cfg.data.datasets:
        c.warn("datasets", "datasets is not read: pretraining reads pretraining_dataset (list the text there)")
    elif not p.pretraining_dataset:
        for index, spec in enumerate(cfg.data.datasets or []):
            if spec.type != "completion":
                raise c.error(("datasets", index, "type"), f"pretraining reads raw text, but this dataset has type {spec.type!r}",
                              "use type: completion, or list the text under pretraining_dataset")
    if cfg.data.sample_packing:
        c.warn("sample_packing", "sample_packing has no effect in pretraining: every window is already full")


FLASH_ATTN_FIX = ("pip install flash-attn (a build for this torch and CUDA), or attn_implementation: sdpa "
                  "(sdp_attention: true; the same math, a little slower)")


def _speed(c: _Checker) -> None:
    cfg = c.cfg
    # On a machine without a GPU the key table already replaced flash_attention_2 with sdpa; here it would load
    # flash-attn's kernels, and transformers would fail only once the model is loading.
    if cfg.model.attn_implementation == "flash_attention_2" and not _installed("flash_attn"):
        key = next((k for k in ("flash_attention", "attn_implementation") if c.given(k)), "attn_implementation")
        raise c.error(key, f"{key} asks for flash_attention_2, which needs the flash-attn package, and it is not installed",
                      FLASH_ATTN_FIX)
    if cfg.speed.fp16 and cfg.training.bf16 is True:
        raise c.error("fp16", "fp16 and bf16 are both on; a run computes in one of them", "keep one (bf16 where the GPU supports it)")
    if cfg.speed.gradient_checkpointing_kwargs and not cfg.training.gradient_checkpointing:
        c.warn("gradient_checkpointing_kwargs", "gradient_checkpointing_kwargs has no effect without gradient_checkpointing: true")
    if cfg.training.loss_watchdog_threshold is None and c.given("loss_watchdog_patience"):
        c.warn("loss_watchdog_patience", "loss_watchdog_patience has no effect without loss_watchdog_threshold")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# The DeepSpeed configs lmforge ships, under axolotl's names (zero1..3, zero3_bf16, zero3_bf16_cpuoffload_all/_params).
SHIPPED_DEEPSPEED = Path(__file__).resolve().parents[2] / "deepspeed_configs"


def deepspeed_json(value: "str | dict") -> dict:
    """The DeepSpeed config a `deepspeed:` value names (a JSON file, or the mapping itself)."""
    import json
    from pathlib import Path

    if isinstance(value, dict):
        return value
    path = Path(value).expanduser()
    shipped = SHIPPED_DEEPSPEED / path.name
    if not path.is_file() and path.parent.name == "deepspeed_configs" and shipped.is_file():
        path = shipped  # axolotl's configs name its repository's files (deepspeed_configs/zero3_bf16.json): ours
    if not path.is_file():
        raise LmforgeError(f"deepspeed config file does not exist: {value}", where="deepspeed",
                           fix="give a JSON file, e.g. deepspeed_configs/zero2.json from the lmforge repository")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmforgeError(f"deepspeed config {value} is not valid JSON ({exc})", where=str(path), fix="fix the JSON") from exc


@dataclass(frozen=True)
class ZeroSettings:
    """What a DeepSpeed config says about ZeRO: the stage, and what it offloads to CPU or NVMe memory."""

    stage: int = 0
    offload_params: bool = False
    offload_optimizer: bool = False


def zero_settings(ds: dict) -> ZeroSettings:
    """The ZeRO settings of a parsed DeepSpeed config (:func:`deepspeed_json`): what the checks, the DeepSpeed
    engine and the planner read from it."""
    zero = ds.get("zero_optimization") or {}

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    return ZeroSettings(stage=int(zero.get("stage", 0) or 0), offload_params=offloaded("offload_param"),
                        offload_optimizer=offloaded("offload_optimizer"))


# Optimizers whose step needs each weight's own shape: ZeRO's flat partitions break them (measured: both fail to
# step in tests/test_deepspeed.py's sweep).
ZERO_INCOMPATIBLE_OPTIMIZERS = {
    "muon": "Muon orthogonalises each weight matrix as a 2-D whole",
    "adamw_torch_4bit": "torchao's 4-bit AdamW keeps block-quantized states per weight tensor",
    "adamw_torch_8bit": "torchao's 8-bit AdamW keeps block-quantized states per weight tensor",
}


def _distributed(c: _Checker) -> None:
    cfg = c.cfg
    d = cfg.distributed
    if (d.fsdp or d.fsdp_config) and cfg.training.load_best_model_at_end:
        raise c.error("load_best_model_at_end", "load_best_model_at_end is not supported yet with fsdp (the best weights "
                      "would be kept as shards)", "remove load_best_model_at_end; the best checkpoint is named in summary.json")
    # Measured on axolotl's GLM-4.7-Flash FSDP examples (bench/axolotl_e2e.py): both train a step, then stop, the
    # first at its first checkpoint, so refused here rather than after the steps are spent.
    if (d.fsdp or d.fsdp_config) and cfg.quantization.quantize_moe_experts:
        raise c.error("quantize_moe_experts", "quantize_moe_experts holds the experts as bitsandbytes parametrizations, "
                      "whose quantization state FSDP2's sharded checkpoints cannot read yet (the run would stop at its "
                      "first save)", "drop fsdp_config (one process, or DDP) for this run, or set quantize_moe_experts: false")
    if (d.fsdp or d.fsdp_config) and cfg.quantization.load_in_8bit:
        raise c.error("load_in_8bit", "bitsandbytes' 8-bit weights keep their quantization state beside the storage, "
                      "and FSDP2's shards drop it (the first forward fails)",
                      "use load_in_4bit: true (QLoRA shards under FSDP2), or drop fsdp_config")
    if d.deepspeed:
        try:
            ds = deepspeed_json(d.deepspeed)
        except LmforgeError as exc:
            raise LmforgeError(exc.message, where=c.where("deepspeed"), fix=exc.fix) from exc
        stage = zero_settings(ds).stage
        quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
        if stage == 3 and quantized:
            raise c.error("deepspeed", "DeepSpeed ZeRO-3 partitions every weight, which a bitsandbytes 4/8-bit base cannot be "
                          "(its packed weights and quantization state would be split apart)",
                          "use ZeRO-2 (deepspeed_configs/zero2.json) or fsdp with QLoRA, or drop load_in_4bit")
        if cfg.training.optimizer in ZERO_INCOMPATIBLE_OPTIMIZERS:
            raise c.error("optimizer", f"optimizer {cfg.training.optimizer} cannot step under DeepSpeed ZeRO: "
                          f"{ZERO_INCOMPATIBLE_OPTIMIZERS[cfg.training.optimizer]}, and ZeRO hands the optimizer flat "
                          "partitions of many weights", "use adamw_torch under deepspeed, or fsdp_config (FSDP2 keeps "
                          "each weight a tensor of its own)")
        if cfg.training.nan_policy == "skip":
            raise c.error("nan_policy", "nan_policy: skip cannot skip a step under deepspeed (its engine steps before the "
                          "gradient norm is known)", "use nan_policy: stop")
        if cfg.training.load_best_model_at_end:
            raise c.error("load_best_model_at_end", "load_best_model_at_end is not supported yet with deepspeed",
                          "remove it; the best checkpoint is named in summary.json")
