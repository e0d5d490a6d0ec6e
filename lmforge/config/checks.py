"""Cross-key checks: keys that are each valid alone but contradict each other, caught before any model loads.

Every config goes through here once (``build_config``), so `validate`, `train`, `pretrain` and
the other commands refuse the same mistakes with the same line, naming the key's ``file:line``.
A contradiction that would fail (or silently do nothing) minutes into a run is an error; a
setting that runs but most likely not as meant is a warning (``LmforgeConfig.warnings``), which
`validate` and the training recipes print.

Imports no torch: validating a config stays instant.
"""

from __future__ import annotations

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
    _remote_code(c)
    return c.warnings


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
    if cfg.training.unfrozen_parameters and adapter:
        raise c.error("unfrozen_parameters", "unfrozen_parameters selects weights for full fine-tuning; it does not combine with an adapter",
                      "remove adapter, or list the modules to train fully in lora_modules_to_save")
    if not adapter:
        unused = [k for k in ADAPTER_ONLY_KEYS if c.given(k)]
        if unused:
            c.warn(unused[0], f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without an adapter "
                              "(set adapter: lora, or remove them)")
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
