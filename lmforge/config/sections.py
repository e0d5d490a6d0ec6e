"""Feature-scoped config models. Users write axolotl's flat keys; each key lives in one section.

Every section forbids unknown keys, so a typo can never be silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Switch = bool | Literal["auto"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class UserDefinedFormat(Section):
    """axolotl's user-defined prompt format: map your own field names onto a prompt string."""

    system_prompt: str | None = Field(None, description="System text substituted for {system}.")
    field_system: str | None = Field(None, description="Column holding a per-row system prompt.")
    field_instruction: str = Field("instruction", description="Column holding the instruction/question.")
    field_input: str | None = Field(None, description="Column holding optional extra input.")
    field_output: str = Field("output", description="Column holding the response (the only part trained on).")
    format: str = Field("{instruction}\n", description="Prompt template with {instruction}, {input}, {system}.")
    no_input_format: str | None = Field(None, description="Template used when the row has no input.")


class DatasetSpec(Section):
    """One entry of ``datasets:``."""

    path: str = Field(description="Local file or folder, or a Hugging Face Hub dataset id.")
    type: str | UserDefinedFormat = Field("alpaca", description="Prompt format: alpaca, or a user-defined mapping.")
    ds_type: Literal["json", "jsonl", "csv", "parquet", "text"] | None = Field(
        None, description="File type when the extension does not say."
    )
    data_files: str | list[str] | None = Field(None, description="Files inside `path` to read.")
    split: str = Field("train", description="Split to read from a Hub dataset.")
    name: str | None = Field(None, description="Hub dataset configuration name.")


class ModelSection(Section):
    base_model: str = Field(description="Local HF folder, .gguf file, pkg://PACKAGE/FILE, or Hub id.")
    base_model_config: str | None = Field(None, description="Where to read the model config (defaults to base_model).")
    tokenizer_config: str | None = Field(None, description="Where to read the tokenizer (defaults to base_model).")
    tokenizer_type: str | None = Field(None, description="Tokenizer class (AutoTokenizer picks the right one).")
    model_type: str | None = Field(None, description="Model class (AutoModelForCausalLM picks the right one).")
    trust_remote_code: bool = Field(False, description="Run custom code from the model repository.")
    special_tokens: dict[str, str] = Field(
        default_factory=dict, description="bos_token/eos_token/pad_token/unk_token to set or add."
    )


class DataSection(Section):
    datasets: list[DatasetSpec] = Field(description="Training data sources.")
    val_set_size: float = Field(0.0, ge=0, description="Held-out share (<1) or row count (>=1) for evaluation.")
    dataset_prepared_path: str | None = Field(None, description="Where tokenized data is cached.")
    sequence_len: int = Field(2048, gt=0, description="Maximum tokens per example; longer rows are truncated.")
    train_on_inputs: bool = Field(False, description="Also compute loss on prompt tokens.")
    chat_template: str | None = Field(None, description="'tokenizer_default' or a Jinja template string.")
    dataset_processes: int | None = Field(None, ge=1, description="Processes used to tokenize.")


class AdapterSection(Section):
    adapter: Literal["lora"] | None = Field(None, description="Parameter-efficient method; empty for full fine-tune.")
    lora_model_dir: str | None = Field(None, description="Existing adapter to load.")
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str | None = Field(None, description="Module names to adapt, e.g. [q_proj, v_proj].")
    lora_target_linear: bool = Field(False, description="Adapt every linear layer except the output head.")
    lora_fan_in_fan_out: bool = Field(False, description="Set for Conv1D layers that store weights transposed (GPT-2).")
    lora_modules_to_save: list[str] | None = Field(None, description="Modules trained fully and saved with the adapter.")


class TrainingSection(Section):
    output_dir: str = Field("./outputs/run", description="Where the adapter/model, tokenizer and logs go.")
    micro_batch_size: int = Field(1, gt=0, description="Examples per forward pass.")
    eval_batch_size: int | None = Field(None, gt=0, description="Examples per eval forward (default micro_batch_size).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw", "adamw_hf"] = Field(
        "adamw_torch", description="Optimizer."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a share of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on norms and biases).")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, ge=0, description="Gradient clipping norm (0 or empty: off).")
    bf16: Switch = Field("auto", description="bfloat16 compute: true, false or auto (on where supported).")
    fp16: Switch = Field(False, description="float16 compute with loss scaling (CUDA only).")
    tf32: Switch = Field(False, description="TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    logging_steps: int = Field(1, gt=0, description="Log every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps.")
    evals_per_epoch: int | None = Field(None, gt=0, description="Evaluations per epoch (alternative to eval_steps).")
    save_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N steps.")
    saves_per_epoch: int | None = Field(None, gt=0, description="Checkpoints per epoch (alternative to save_steps).")
    seed: int = Field(42, description="Seed for data order, splits, dropout and init.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (random batch order) to cut padding."
    )

    @field_validator("max_grad_norm")
    @classmethod
    def _zero_is_off(cls, value: float | None) -> float | None:
        return value or None

    @model_validator(mode="after")
    def _one_of_each(self) -> "TrainingSection":
        for a, b in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch"), ("warmup_steps", "warmup_ratio")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"set either {a} or {b}, not both")
        return self


class LoggingSection(Section):
    wandb_project: str | None = Field(None, description="Weights & Biases project; set to log there.")
    wandb_entity: str | None = Field(None, description="W&B team or user.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to resume a run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")
    wandb_watch: str | None = Field(None, description="W&B watch setting (gradients, all, false).")
    wandb_log_model: str | None = Field(None, description="W&B model logging (checkpoint, end, false).")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "adapter": AdapterSection,
    "training": TrainingSection,
    "logging": LoggingSection,
}


def key_owners() -> dict[str, str]:
    """Flat axolotl key → the section that owns it."""
    return {key: section for section, model in SECTIONS.items() for key in model.model_fields}


def field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
