"""The root config: flat axolotl keys routed into feature sections, with errors that say where and what to do."""

from __future__ import annotations

import difflib
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge.config.compat import Notice, screen
from lmforge.config.checks import check_cross_keys
from lmforge.config.formats import (
    BUILTIN_TYPES, CHAT_TEMPLATE_NAMES, FALLBACK_PREFIX, LEGACY_BASES, LEGACY_STYLES, template_problem, type_problem,
)
from lmforge.config.hooks import is_hook, resolve_hook
from lmforge.config.loader import KeyPath, RawConfig, apply_overrides, read_config
from lmforge.config.sections import (
    AdapterSection,
    DatasetSpec,
    DataSection,
    DistributedSection,
    RLSection,
    InferenceSection,
    EvaluationSection,
    LoggingSection,
    ModelConfigSpec,
    ModelSection,
    PretrainingSource,
    PretrainSection,
    QuantizationSection,
    RLSection,
    SECTIONS,
    SpeedSection,
    TokenizerTrainSpec,
    TrainingSection,
    TrlSettings,
    UserDefinedFormat,
    describe,
    key_owners,
)
from lmforge.errors import LmforgeError


class LmforgeConfig(BaseModel):
    """A validated config. Sections mirror the pipeline: model → data → adapter → training → logging."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSection
    data: DataSection
    quantization: QuantizationSection = QuantizationSection()
    adapter: AdapterSection = AdapterSection()
    training: TrainingSection = TrainingSection()
    logging: LoggingSection = LoggingSection()
    pretrain: PretrainSection = PretrainSection()
    inference: InferenceSection = InferenceSection()
    evaluation: EvaluationSection = EvaluationSection()
    speed: SpeedSection = SpeedSection()
    distributed: DistributedSection = DistributedSection()
    rl: RLSection = RLSection()
    notices: list[Notice] = []  # axolotl keys accepted because they change nothing here (`lmforge validate` prints them)
    warnings: list[str] = []  # cross-key settings that run but likely not as meant ('file:line: what'); see config.checks

    def flat(self) -> dict[str, Any]:
        """The resolved config as axolotl-style flat keys (what gets saved next to outputs)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(getattr(self, name).model_dump(mode="json", by_alias=True))
        return out

    @property
    def is_pretraining(self) -> bool:
        """Pretraining (from scratch or continued on raw text) rather than fine-tuning on `datasets`."""
        return self.pretrain.model_config_ is not None or bool(self.pretrain.pretraining_dataset)


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else "see `lmforge config-schema` for the keys"


def _nested_model(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at a dataset sub-path, for did-you-mean."""
    if len(path) == 2 and path[0] in ("datasets",):
        return DatasetSpec
    if len(path) == 3 and path[0] == "datasets" and path[2] == "type":
        return UserDefinedFormat
    if len(path) == 2 and path[0] == "pretraining_dataset":
        return PretrainingSource
    if path == ("tokenizer_train",):
        return TokenizerTrainSpec
    if path == ("trl",):
        return TrlSettings
    return None


def _explain(raw: RawConfig, err: dict[str, Any], section: str) -> LmforgeError:
    loc = tuple(err["loc"])
    # pydantic adds union member names ('str', 'UserDefinedFormat', ...) to loc; keep only real keys.
    known = set(key_owners()) | set(DatasetSpec.model_fields) | set(UserDefinedFormat.model_fields)
    known |= set(PretrainingSource.model_fields) | set(TokenizerTrainSpec.model_fields) | set(ModelConfigSpec.model_fields)
    known |= set(TrlSettings.model_fields)
    keep_last = err["type"] == "extra_forbidden"
    path: KeyPath = tuple(
        p for i, p in enumerate(loc) if isinstance(p, int) or p in known or (keep_last and i == len(loc) - 1)
    )
    key = ".".join(str(p) for p in path) or section
    where = raw.where(path)
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _nested_model(path[:-1])
        candidates = list(owner.model_fields) if owner else []
        return LmforgeError(f"unknown key '{path[-1]}'", where=where, fix=_suggest(str(path[-1]), candidates))
    if kind == "missing":
        return LmforgeError(f"required key '{key}' is missing", where=raw.source, fix=f"add {path[-1]}: ...")
    value = err.get("input")
    return LmforgeError(f"{key}: {err['msg']}, got {describe(value)}", where=where, fix=f"change {key}")


def build_config(raw: RawConfig, *, gpu: bool | None = None) -> LmforgeConfig:
    """Screen the axolotl keys, route the rest into sections and validate; any mistake becomes one LmforgeError.

    `gpu` says whether this machine has a GPU (default: detected); it decides whether GPU-only keys
    may be accepted as changing nothing here.
    """
    values, notices = screen(raw, gpu)
    owners = key_owners()
    grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if key not in owners:  # the key table renamed a key onto one lmforge does not have: a table bug, said plainly
            raise LmforgeError(f"unknown key '{key}'", where=raw.where((key,)), fix="see `lmforge config-schema --table`")
        grouped[owners[key]][key] = value
    sections: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = model.model_validate(grouped[name])
        except ValidationError as exc:
            errors = exc.errors()
            # For a union (e.g. a dataset `type` given as a mapping), the branch that names a key is the useful one.
            best = next((e for e in errors if e["type"] == "extra_forbidden"), max(errors, key=lambda e: len(e["loc"])))
            raise _explain(raw, best, name) from exc
    cfg = LmforgeConfig(**sections, notices=notices)
    _check_model_and_data(cfg, raw)
    _check_formats(cfg, raw)
    _resolve_hooks(cfg, raw)
    _check_grpo(cfg, raw)
    cfg.warnings = check_cross_keys(cfg, raw)
    return cfg


# The families of axolotl's preference types (family.variant), read by lmforge/data/formats/preference.py.
PREFERENCE_FAMILIES = ("chat_template", "bradley_terry", "chatml", "llama3", "zephyr", "user_defined")


def _resolve_hooks(cfg: LmforgeConfig, raw: RawConfig) -> None:
    """Each dataset hook (`type: module.function`) checked to come from the config's folder or an installed
    package (config.hooks), and pinned to the file it runs."""
    config_dir = None if raw.source.startswith(("http://", "https://")) else raw.base_dir
    for key in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(cfg.data, key) or []):
            # rl: axolotl's preference types are written like hooks (chatml.intel, chat_template.default)
            if is_hook(spec.type) and not (cfg.rl.preference and spec.type.split(".")[0] in PREFERENCE_FAMILIES):
                spec.type = resolve_hook(spec.type, config_dir, raw.where((key, index, "type")))
    trl = cfg.rl.trl
    for index, name in enumerate(trl.reward_funcs or []):
        where = raw.where(("trl", "reward_funcs", index))
        if not is_hook(name):  # TRL also takes a reward model's Hub id here
            raise LmforgeError(f"reward function '{name}' is not a Python function (a reward model as a reward function is "
                               "not supported yet)", where=where, fix="name a function: rewards.py:my_reward or module.my_reward")
        trl.reward_funcs[index] = resolve_hook(name, config_dir, where)


def _check_grpo(cfg: LmforgeConfig, raw: RawConfig) -> None:
    """rl: grpo's cross-key rules: reward functions and their weights, groups that fit a step, prompt datasets."""
    if cfg.rl.rl != "grpo":
        return
    trl, t = cfg.rl.trl, cfg.training
    if cfg.is_pretraining:
        raise LmforgeError("rl: grpo trains on prompt datasets, not pretraining_dataset", where=raw.where(("rl",)),
                           fix="give the prompts as datasets: with a transform (type: rewards.py:prompt_transform)")
    if not trl.reward_funcs:
        raise LmforgeError("rl: grpo needs reward functions", where=raw.where(("trl",)) if "trl" in raw.values else raw.where(("rl",)),
                           fix="add trl: {reward_funcs: [rewards.py:my_reward]}")
    if trl.reward_weights is not None and len(trl.reward_weights) != len(trl.reward_funcs):
        raise LmforgeError(f"trl.reward_weights has {len(trl.reward_weights)} weights for {len(trl.reward_funcs)} reward functions",
                           where=raw.where(("trl", "reward_weights")), fix="give one weight per reward function")
    completions = t.micro_batch_size * t.gradient_accumulation_steps
    if completions % trl.num_generations:
        raise LmforgeError(
            f"a step's {completions} completions (micro_batch_size {t.micro_batch_size} x gradient_accumulation_steps "
            f"{t.gradient_accumulation_steps}) are not whole groups of num_generations {trl.num_generations}",
            where=raw.where(("trl", "num_generations")) if "trl" in raw.values else raw.where(("rl",)),
            fix="make micro_batch_size x gradient_accumulation_steps a multiple of trl.num_generations")
    if cfg.data.sample_packing:
        raise LmforgeError("sample_packing does not apply to rl: grpo (each completion is scored on its own)",
                           where=raw.where(("sample_packing",)), fix="remove sample_packing")
    for key in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(cfg.data, key) or []):
            if not is_hook(spec.type):
                raise LmforgeError(f"rl: grpo reads prompts through a transform, and this dataset's type is {spec.type!r}",
                                   where=raw.where((key, index, "type")) if "type" in (raw.values[key][index] or {}) else raw.where((key, index)),
                                   fix="type: rewards.py:prompt_transform (a function returning the row transform, as in axolotl)")


def _check_formats(cfg: LmforgeConfig, raw: RawConfig) -> None:
    """Dataset types and chat template names are checked here, not when the data is read minutes later."""
    choices = [(("chat_template",), cfg.data.chat_template)]
    for key in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(cfg.data, key) or []):
            choices.append(((key, index, "chat_template"), spec.chat_template))
            if isinstance(spec.type, str) and not is_hook(spec.type) and (problem := type_problem(spec.type)):
                raise LmforgeError(problem, where=raw.where((key, index, "type")),
                                   fix=f"use one of: {', '.join(BUILTIN_TYPES)}, axolotl's BASE:STYLE "
                                   f"({'/'.join(LEGACY_BASES)} : {'/'.join(LEGACY_STYLES)}), module.function, "
                                   "file.py:function, or a mapping with field_instruction/field_output/format")
    for path, setting in choices:
        if problem := template_problem(setting):
            raise LmforgeError(problem, where=raw.where(path),
                               fix=f"use tokenizer_default, {FALLBACK_PREFIX}NAME, jinja (with chat_template_jinja), "
                               f"a Jinja string, or one of: {', '.join(CHAT_TEMPLATE_NAMES)}")


def _check_model_and_data(cfg: LmforgeConfig, raw: RawConfig) -> None:
    """Keys that depend on each other across sections: where the model and the data come from."""
    has_base, has_new = cfg.model.base_model is not None, cfg.pretrain.model_config_ is not None
    if not has_base and not has_new:
        raise LmforgeError(
            "no model: set either base_model (a pretrained model) or model_config (a new model to pretrain)",
            where=raw.source, fix="add base_model: HF_ID_OR_FOLDER, or model_config: {architecture: llama, preset: tiny}",
        )
    if has_base and has_new:
        raise LmforgeError(
            "base_model and model_config are both set", where=raw.where(("model_config",)),
            fix="keep base_model to continue pretraining a model, or model_config to build a new one",
        )
    if cfg.data.datasets is None and not cfg.pretrain.pretraining_dataset:
        if cfg.is_pretraining:
            raise LmforgeError("model_config needs pretraining data", where=raw.source,
                               fix="add pretraining_dataset: [TEXT_FILE_OR_GLOB_OR_HUB_ID] (or datasets with type: completion)")
        raise LmforgeError("datasets is required", where=raw.source,
                           fix="add datasets: [{path: ..., type: ...}] (or pretraining_dataset: for raw-text pretraining)")


def looks_like_local_path(path: str) -> bool:
    """True for paths a user clearly meant as local files (not Hub ids)."""
    return path.startswith(("/", ".", "~")) or os.path.splitext(path)[1].lower() in {
        ".json", ".jsonl", ".csv", ".parquet", ".txt", ".gguf",
    }


def check_files(cfg: LmforgeConfig, raw: RawConfig | None = None) -> None:
    """Fail early, before any model loads, when a local dataset or model path is missing."""
    for index, spec in enumerate(cfg.data.datasets or []):
        path = os.path.expanduser(spec.path)
        if not os.path.exists(path) and looks_like_local_path(spec.path) and not spec.path.startswith("pkg://") and not any(c in spec.path for c in "*?["):
            where = raw.where(("datasets", index, "path")) if raw else f"datasets[{index}].path"
            raise LmforgeError(f"dataset file does not exist: {spec.path}", where=where, fix="fix the path (relative paths are read from the current folder)")
    base = cfg.model.base_model
    if base is not None and not base.startswith("pkg://") and looks_like_local_path(base) and not os.path.exists(os.path.expanduser(base)):
        where = raw.where(("base_model",)) if raw else "base_model"
        raise LmforgeError(f"model path does not exist: {base}", where=where, fix="fix the path or use a Hub id")


def load_config(location: str, overrides: list[str] | None = None, *, check_paths: bool = True,
                gpu: bool | None = None) -> LmforgeConfig:
    """Read, override, validate and (optionally) check the files of a config."""
    raw = apply_overrides(read_config(location), overrides or [])
    cfg = build_config(raw, gpu=gpu)
    if check_paths:
        check_files(cfg, raw)
    return cfg


def json_schema() -> dict[str, Any]:
    """The JSON schema of the flat config a user writes."""
    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    required: list[str] = []
    for model in SECTIONS.values():
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        properties.update(schema.get("properties", {}))
        defs.update(schema.get("$defs", {}))
        required += schema.get("required", [])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lmforge config",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        "$defs": defs,
    }
