"""Feature-scoped config models. Users write axolotl's flat keys; each key lives in one section.

Every section forbids unknown keys, so a typo can never be silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    # Preference pairs (rl:, axolotl's user_defined.default): {prompt}, {system}, {chosen}, {rejected} in the formats.
    field_prompt: str | None = Field(None, description="rl: column holding the prompt (default prompt).")
    field_chosen: str | None = Field(None, description="rl: column holding the preferred answer (default chosen).")
    field_rejected: str | None = Field(None, description="rl: column holding the dispreferred answer (default rejected).")
    prompt_format: str | None = Field(None, description="rl: prompt template with {prompt} and {system} (default {prompt}).")
    chosen_format: str | None = Field(None, description="rl: chosen-answer template with {chosen} (default {chosen}).")
    rejected_format: str | None = Field(None, description="rl: rejected-answer template with {rejected} (default {rejected}).")


class DatasetSpec(Section):
    """One entry of ``datasets:``."""

    path: str = Field(description="Local file or folder, or a Hugging Face Hub dataset id.")
    type: str | UserDefinedFormat = Field(
        "alpaca",
        description="Prompt format: alpaca, alpaca_w_system, completion, input_output, chat_template, "
        "axolotl's BASE:STYLE (alpaca:chat, alpaca:phi, jeopardy, ...), module.function / file.py:function (your converter), or a user-defined mapping.",
    )
    ds_type: Literal["json", "jsonl", "csv", "parquet", "text"] | None = Field(
        None, description="File type when the extension does not say."
    )
    data_files: str | list[str] | None = Field(None, description="Files inside `path` to read.")
    split: str = Field("train", description="Split to read from a Hub dataset.")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    field: str | None = Field(None, description="Column with the text (completion: 'text'; input_output: 'segments').")
    system_prompt: str | None = Field(None, description="alpaca_w_system: system text for rows without a `system` column.")
    field_messages: str | None = Field(None, description="chat_template: column with the turns (default messages, else conversations).")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="chat_template: turn keys, e.g. {role: from, content: value} (ShareGPT is detected)."
    )
    roles: dict[str, str | list[str]] | None = Field(
        None, description="chat_template: extra speaker names per role, e.g. {assistant: [gpt, bot]}."
    )
    roles_to_train: list[str] | None = Field(None, description="chat_template: roles whose turns are trained (default [assistant]).")
    train_on_eos: Literal["turn", "all", "last", "none"] | None = Field(
        None, description="chat_template: train the EOS token after trained turns (turn, default), after all turns, the last, or none."
    )
    train_on_eot: Literal["turn", "all", "last", "none"] | None = Field(
        None, description="chat_template: the same for each turn's end-of-turn token (e.g. <|im_end|>); default: as train_on_eos."
    )
    chat_template: str | None = Field(
        None, description="chat_template: this dataset's template (overrides the top-level chat_template; same values)."
    )
    chat_template_jinja: str | None = Field(
        None, description="chat_template: Jinja text or a .jinja file, used with chat_template: jinja (or when chat_template is unset)."
    )
    field_thinking: str | None = Field(
        None, description="chat_template: turn key holding an assistant's reasoning (default reasoning_content)."
    )
    template_thinking_key: str | None = Field(
        None, description="chat_template: the message key the template reads the reasoning from (default reasoning_content)."
    )
    split_thinking: bool | None = Field(
        None, description="chat_template: split <think>...</think> (or <reasoning>, <|begin_of_thought|>) out of assistant "
        "content into the reasoning field."
    )
    train_on_thinking: bool | None = Field(
        None, description="chat_template: train the reasoning of assistant turns (default true); false trains from the answer on."
    )
    drop_system_message: bool | None = Field(None, description="chat_template: drop a conversation's leading system turn.")
    field_chosen: str | None = Field(None, description="rl, chat_template.default: column with the preferred answer (default chosen).")
    field_rejected: str | None = Field(None, description="rl, chat_template.default: column with the dispreferred answer (default rejected).")
    message_field_role: str | None = Field(
        None, description="chat_template: deprecated (axolotl); same as message_property_mappings: {role: ...}."
    )
    message_field_content: str | None = Field(
        None, description="chat_template: deprecated (axolotl); same as message_property_mappings: {content: ...}."
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_message_fields(cls, data: Any) -> Any:
        """axolotl's older message_field_role/content keys, folded into message_property_mappings."""
        if not isinstance(data, dict) or not ({"message_field_role", "message_field_content"} & set(data)):
            return data
        data = dict(data)
        mappings = dict(data.get("message_property_mappings") or {})
        for old, key in (("message_field_role", "role"), ("message_field_content", "content")):
            value = data.pop(old, None)
            if value is None:
                continue
            if mappings.get(key, value) != value:
                raise ValueError(f"{old}: {value} conflicts with message_property_mappings.{key}: {mappings[key]}; keep one")
            mappings[key] = value
        data["message_property_mappings"] = mappings
        return data

    @model_validator(mode="before")
    @classmethod
    def _inline_template(cls, data: Any) -> Any:
        return _jinja_choice(data)


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


class ModelSection(Section):
    @model_validator(mode="before")
    @classmethod
    def _tokens_mapping(cls, data: Any) -> Any:
        """tokens: {bos_token: <s>, ...} (older axolotl configs) names special tokens: it is special_tokens."""
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, dict):
            return data
        special = dict(data.get("special_tokens") or {})
        for name, token in tokens.items():
            if name not in SPECIAL_TOKEN_NAMES:
                raise ValueError(f"tokens.{name}: a mapping under tokens names special tokens ({', '.join(SPECIAL_TOKEN_NAMES)}); "
                                 "list plain tokens to add as tokens: [...]")
            if special.get(name, token) != token:
                raise ValueError(f"tokens.{name} is {token!r} but special_tokens.{name} is {special[name]!r}; keep one")
            special[name] = token
        return {**{k: v for k, v in data.items() if k != "tokens"}, "special_tokens": special}

    base_model: str | None = Field(
        None, description="Local HF folder, .gguf file, pkg://PACKAGE/FILE, or Hub id. Optional when model_config "
        "builds a model from scratch."
    )
    tokenizer_config: str | None = Field(None, description="Where to read the tokenizer (defaults to base_model).")
    trust_remote_code: bool = Field(False, description="Run custom code from the model repository.")
    special_tokens: dict[str, str] = Field(
        default_factory=dict, description="bos_token/eos_token/pad_token/unk_token to set or add."
    )
    base_model_config: str | None = Field(
        None, description="Read the model config (config.json) from this folder or Hub id instead of base_model's."
    )
    model_type: str | None = Field(
        None, description="transformers class to load the model with (e.g. LlamaForCausalLM; default AutoModelForCausalLM)."
    )
    tokenizer_type: str | None = Field(
        None, description="transformers class to load the tokenizer with (e.g. PreTrainedTokenizerFast; default AutoTokenizer)."
    )
    model_quantization_config: Literal["Mxfp4Config"] | None = Field(
        None, description="Mxfp4Config: the base checkpoint is MXFP4-quantized (gpt-oss); with "
        "model_quantization_config_kwargs: {dequantize: true} its weights load dequantized, to train.")
    model_quantization_config_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of transformers' Mxfp4Config: dequantize (required: true), modules_to_not_convert.")
    tokenizer_legacy: bool | None = Field(
        None, description="The tokenizer's legacy flag (Llama/SentencePiece): true adds a word-start marker after every "
        "special token, false only at the start of the text (default: the tokenizer's own).")
    tokenizer_use_mistral_common: bool = Field(
        False, description="Read the model's Mistral tokenizer file (tekken.json) with mistral-common, through "
        "transformers' MistralCommonBackend: chat datasets and prompts encode straight to ids, as Mistral's own "
        "tokenizer does (no chat template; the loss on assistant turns only).")
    revision_of_model: str | None = Field(
        None, description="The Hub revision (branch, tag or commit) of base_model and its tokenizer.")
    cls_model_config: str | None = Field(
        None, pattern=r"^[A-Z][A-Za-z0-9]*Config$", description="A transformers config class (e.g. Gemma3TextConfig) "
        "that reads base_model's config.json instead of AutoConfig: the model loads as that architecture (a multimodal "
        "checkpoint's text model).")
    reinit_weights: bool = Field(
        False, description="Build base_model's architecture with freshly initialised weights (seeded by seed) instead of "
        "reading its weights: pretraining from scratch in a known shape.")
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Fields set on the base model's config before it loads, e.g. {output_router_logits: true} "
        "(axolotl writes it as model_config: beside base_model)."
    )
    tokens: list[str] | None = Field(
        None, description="Tokens to add to the vocabulary (the embeddings grow to match). A mapping of special-token "
        "names ({bos_token: <s>}, axolotl's older form) is read as special_tokens.")
    resize_token_embeddings_to_32x: bool = Field(
        False, description="Pad the embedding rows to a multiple of 32 (faster matmuls on GPUs); the extra rows are never used."
    )
    processor_type: str | None = Field(
        None, description="An image-text model: the transformers processor class (AutoProcessor) that turns images and "
        "text into the model's inputs; the model then loads with AutoModelForImageTextToText (unless model_type names a class)."
    )
    processor_kwargs: dict[str, Any] | None = Field(
        None, description="Keyword arguments for the processor's from_pretrained (e.g. image_seq_len, min_pixels)."
    )
    freeze_mm_modules: bool | None = Field(
        None, description="Image-text models: keep the vision tower and projector frozen (the default without "
        "unfrozen_parameters); false trains them too in a full fine-tune."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="Attention backend (default: transformers' choice, sdpa where supported). Without CUDA, "
        "flash_attention_2 and flex_attention run as sdpa. Packed rows never attend across examples on any backend."
    )
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = Field(
        None, description="How a mixture-of-experts model runs its experts (transformers' experts_implementation; default "
        "grouped_mm where it can, else eager). Kernels lmforge does not ship (scattermoe, sonicmoe) run as the default."
    )


def _jinja_choice(data: Any) -> Any:
    """axolotl's inline template: chat_template_jinja alone means chat_template: jinja, and jinja needs the text."""
    if not isinstance(data, dict):
        return data
    if data.get("chat_template") == "jinja" and not data.get("chat_template_jinja"):
        raise ValueError("chat_template: jinja needs chat_template_jinja (the template text or a .jinja file)")
    if data.get("chat_template_jinja") and not data.get("chat_template"):
        return {**data, "chat_template": "jinja"}
    return data


class DataSection(Section):
    # Optional here because pretraining reads pretraining_dataset instead; build_config requires it otherwise.
    datasets: list[DatasetSpec] | None = Field(None, description="Training data sources (required unless pretraining).")
    val_set_size: float = Field(0.0, ge=0, description="Held-out share (<1) or row count (>=1) for evaluation.")
    dataset_prepared_path: str | None = Field(None, description="Where tokenized data is cached.")
    sequence_len: int = Field(2048, gt=0, description="Maximum tokens per example; longer rows are truncated.")
    train_on_inputs: bool = Field(False, description="Also compute loss on prompt tokens.")
    chat_template: str | None = Field(
        None, description="'tokenizer_default', a name (chatml, llama3, mistral, gemma, or any of axolotl's: gemma3, qwen3, "
        "llama4, phi_3, ... listed in lmforge/config/formats.py), "
        "tokenizer_default_fallback_NAME, 'jinja' (with chat_template_jinja) or a Jinja template string."
    )
    chat_template_jinja: str | None = Field(
        None, description="Jinja chat template text, or a .jinja file, used with chat_template: jinja (or when chat_template is unset)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template, in training and inference alike (e.g. {enable_thinking: false})."
    )
    eot_tokens: list[str] | None = Field(
        None, description="chat_template: the tokens that end a turn (default: found from the template, e.g. <|im_end|>, and EOS)."
    )
    dataset_processes: int | None = Field(None, ge=1, description="Processes used to tokenize.")
    test_datasets: list[DatasetSpec] | None = Field(None, description="Explicit evaluation data (instead of val_set_size).")
    shuffle_merged_datasets: bool = Field(True, description="Shuffle the rows of all datasets together, by seed.")
    skip_bad_rows: bool = Field(False, description="Skip malformed rows and records (counted and reported) instead of failing.")
    sample_packing: bool = Field(False, description="Pack several examples per sequence (no attention across them).")
    pad_to_sequence_len: bool = Field(False, description="Pad every batch to sequence_len tokens (fixed shapes; same loss).")
    skip_prepare_dataset: bool = Field(
        False, description="Tokenize in memory for this run only: the prepared-data cache is neither read nor written."
    )
    eval_sample_packing: bool | None = Field(None, description="Pack eval batches too (default: as sample_packing).")
    min_sample_len: int | None = Field(None, ge=1, description="Drop examples of fewer tokens than this.")
    dataset_exact_deduplication: bool = Field(
        False, description="Keep one of identical tokenized examples (eval examples the training data holds are dropped).")
    image_size: int | tuple[int, int] | None = Field(
        None, description="Image-text data: resize every image to this size first: N pads it to a square, then N×N; "
        "[W, H] resizes to W×H (default: as read; the processor then applies its own size)."
    )
    image_resize_algorithm: Literal["bilinear", "bicubic", "lanczos", "nearest"] | None = Field(
        None, description="Pillow's resampling filter for image_size (default bilinear)."
    )

    @model_validator(mode="before")
    @classmethod
    def _inline_template(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("image_resize_algorithm"), str):  # axolotl takes any case
            data = {**data, "image_resize_algorithm": data["image_resize_algorithm"].lower()}
        return _jinja_choice(data)


QAT_DTYPES = {"int4": "int4", "int8": "int8", "float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn",
              "float8": "float8_e4m3fn", "nvfp4": "nvfp4", "mxfp4": "mxfp4"}
# (weight, activation) pairs torchao can fake-quantise in training and quantize after it (axolotl's list).
QAT_PAIRS = {("int4", None), ("int4", "int8"), ("int4", "float8_e4m3fn"), ("float8_e4m3fn", "float8_e4m3fn"),
             ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")}


class QatSpec(Section):
    """``qat:`` quantization-aware training through torchao (axolotl's keys)."""

    weight_dtype: str = Field("int8", description="Weights' target format: int4, float8_e4m3fn (fp8), mxfp4, nvfp4.")
    activation_dtype: str | None = Field(None, description="Activations' target format: int8, float8_e4m3fn, mxfp4, nvfp4, or none.")
    group_size: int | None = Field(32, gt=0, description="Values per quantization group (int4: divides the layer widths; mxfp4: 32; nvfp4: 16).")
    quantize_embedding: bool | None = Field(False, description="Fake-quantise the input embedding's weights too.")
    fake_quant_after_n_steps: int | None = Field(
        None, ge=0, description="Train the first N optimizer steps without fake quantization, then with it.")

    @field_validator("weight_dtype", "activation_dtype", mode="before")
    @classmethod
    def _dtype_names(cls, value: Any) -> Any:
        if value is None:
            return None
        if value not in QAT_DTYPES:
            raise ValueError(f"qat: unknown dtype {value!r} (one of {', '.join(QAT_DTYPES)})")
        return QAT_DTYPES[value]

    @model_validator(mode="after")
    def _pairs(self) -> "QatSpec":
        if (self.weight_dtype, self.activation_dtype) not in QAT_PAIRS:
            pairs = ", ".join(f"{w}/{a or 'none'}" for w, a in sorted(QAT_PAIRS, key=str))
            raise ValueError(f"qat: weight_dtype {self.weight_dtype} with activation_dtype {self.activation_dtype} is not a "
                             f"format torchao quantizes after training (weight/activation: {pairs})")
        if self.weight_dtype == "nvfp4" and self.group_size not in (None, 16):
            raise ValueError("qat: nvfp4 uses groups of 16 (group_size: 16)")
        if self.weight_dtype == "mxfp4" and self.group_size not in (None, 32):
            raise ValueError("qat: mxfp4 uses blocks of 32 (group_size: 32)")
        return self


class QuantizationSection(Section):
    qat: QatSpec | None = Field(
        None, description="Quantization-aware training (torchao): {weight_dtype, activation_dtype, group_size, "
        "quantize_embedding, fake_quant_after_n_steps}; the saved model holds the trained weights, unquantized.")
    load_in_4bit: bool = Field(False, description="Load the base model in 4 bit through bitsandbytes (QLoRA).")
    load_in_8bit: bool = Field(False, description="Load the base model in 8 bit through bitsandbytes.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit matmuls compute in; auto: bfloat16 where the run trains in bf16, "
        "else float32 (a CPU without native bf16 emulates bf16 matmuls, over 10x slower)."
    )
    quantize_moe_experts: bool = Field(
        False, description="With load_in_4bit or load_in_8bit: also hold a mixture-of-experts model's expert weights (3D "
        "tensors, which those skip) in 4 or 8 bit, through bitsandbytes, dequantized on access (the model's largest weights)."
    )

    @model_validator(mode="after")
    def _not_both(self) -> "QuantizationSection":
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("set either load_in_4bit or load_in_8bit, not both")
        return self


class AdapterSection(Section):
    adapter: Literal["lora", "qlora"] | None = Field(None, description="lora, qlora (4-bit base) or empty for full fine-tune.")
    peft_use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    peft_use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    lora_model_dir: str | None = Field(None, description="Existing adapter to load.")
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str | None = Field(None, description="Module names to adapt, e.g. [q_proj, v_proj].")
    lora_target_linear: bool = Field(False, description="Adapt every linear layer except the output head.")
    lora_fan_in_fan_out: bool = Field(False, description="Set for Conv1D layers that store weights transposed (GPT-2).")
    lora_modules_to_save: list[str] | None = Field(None, description="Modules trained fully and saved with the adapter.")
    lora_target_parameters: list[str] | None = Field(
        None, description="Parameters (not modules) to adapt, by name suffix, e.g. [experts.gate_up_proj] for MoE experts "
        "(peft's target_parameters)."
    )
    peft: dict[str, Any] | None = Field(
        None, description="PEFT's initialisation options as axolotl writes them: {loftq_config: {loftq_bits: 4}} starts "
        "the LoRA weights with LoftQ (the base weights become their 4-bit quantized values, the adapter the low-rank "
        "rest; the adapter then suits the base loaded with load_in_4bit); loftq_bits 4 (nf4) or 8, loftq_iter (1)."
    )

    @field_validator("peft")
    @classmethod
    def _loftq_settings(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        loftq = (value or {}).get("loftq_config")
        if loftq is None:
            return value
        if not isinstance(loftq, dict) or set(loftq) - {"loftq_bits", "loftq_iter"}:
            raise ValueError("peft.loftq_config takes loftq_bits (4 or 8) and loftq_iter")
        bits, iterations = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
        if bits not in (4, 8) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError("peft.loftq_config: loftq_bits is 4 (nf4) or 8 (int8), loftq_iter a count of 1 or more")
        return {**value, "loftq_config": {"loftq_bits": bits, "loftq_iter": iterations}}


class TrainingSection(Section):
    output_dir: str = Field("./outputs/run", description="Where the adapter/model, tokenizer and logs go.")
    micro_batch_size: int = Field(1, gt=0, description="Examples per forward pass.")
    eval_batch_size: int | None = Field(None, gt=0, description="Examples per eval forward (default micro_batch_size).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    unfrozen_parameters: list[str] | None = Field(
        None, description="Regexes (matched from the start of a parameter name) of the parameters to train; all others "
        "are frozen. Empty: train all. With an adapter, the modules owning them train fully beside it (saved with it, as "
        "lora_modules_to_save); layers the adapter adapts train through it."
    )
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw", "adamw_hf", "adamw_bnb_8bit", "sgd", "adafactor",
        "lion_8bit", "lion_32bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_4bit", "adamw_torch_8bit", "muon",
    ] = Field(
        "adamw_torch",
        description="adamw_torch (fused on GPU), adamw_torch_fused (fused on CPU too), adamw_bnb_8bit (bitsandbytes "
        "8-bit states), sgd (see sgd_momentum, sgd_nesterov), adafactor (transformers, explicit lr), "
        "lion_8bit / lion_32bit (bitsandbytes Lion; betas from adam_beta1/adam_beta2), paged_adamw_8bit / "
        "paged_adamw_32bit (bitsandbytes, states paged on CUDA), adamw_torch_4bit / adamw_torch_8bit (torchao, 4- or 8-bit states), muon "
        "(torch's Muon on hidden matrices, AdamW on embeddings, head, norms and biases).",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0, le=1, description="cosine only: decay to this share of the peak rate instead of to zero."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup steps; a fraction below 1 (0.1) is a share of all steps, as warmup_ratio.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a share of all steps.")
    lr_quadratic_warmup: bool = Field(False, description="Warm up along a quadratic curve instead of a straight line.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on norms and biases).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay (Lion: its first beta).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's second-moment decay (Lion: its second beta).")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's epsilon.")
    sgd_momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum factor.")
    sgd_nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs sgd_momentum > 0).")
    max_grad_norm: float | None = Field(1.0, ge=0, description="Gradient clipping norm (0 or empty: off).")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="Set every dropout probability the model config has (attention_dropout, "
        "hidden_dropout, resid_pdrop, ...) to this value."
    )
    label_smoothing_factor: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss (eval loss stays plain).")
    chunked_cross_entropy: bool = Field(
        False, description="Compute the output head and loss in slices of the labelled positions, each recomputed in "
        "backward: the vocabulary-sized logits never exist whole (same loss, less peak memory, one more head pass)."
    )
    chunked_cross_entropy_num_chunks: int = Field(8, ge=2, description="chunked_cross_entropy: how many slices.")
    use_eaft: bool = Field(
        False, description="Entropy-aware focal training (EAFT): weigh each labelled token's cross-entropy by the entropy "
        "of the model's top-k next-token distribution raised to eaft_alpha (confident tokens count less; eval loss stays plain)."
    )
    eaft_alpha: float = Field(1.0, ge=0, description="use_eaft: the exponent on the entropy weight.")
    eaft_k: int = Field(20, gt=1, description="use_eaft: how many top logits approximate the entropy.")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop (naming the step and last good checkpoint) or skip the step."
    )
    bf16: Switch = Field("auto", description="bfloat16 compute: true, false or auto (on where supported).")
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="Recompute activations to save memory; offload (axolotl's) also keeps the checkpointed "
        "activations in CPU memory until backward, as activation_offloading: true does (CUDA).")
    logging_steps: int = Field(1, gt=0, description="Log every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps.")
    evals_per_epoch: int | None = Field(None, gt=0, description="Evaluations per epoch (alternative to eval_steps).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when the eval loss has not improved for this many evaluations."
    )
    load_best_model_at_end: bool = Field(False, description="Save the weights of the best evaluation, not the last.")
    save_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N steps.")
    saves_per_epoch: int | None = Field(None, gt=0, description="Checkpoints per epoch (alternative to save_steps).")
    save_total_limit: int | None = Field(None, gt=0, description="Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = Field(
        None, description="A checkpoint folder to resume from, or 'auto' for the newest valid one in output_dir."
    )
    auto_resume_from_checkpoints: bool = Field(False, description="Same as resume_from_checkpoint: auto.")
    seed: int = Field(42, description="Seed for data order, splits, dropout and init.")
    fast_dropout: bool = Field(
        True, description="On CPU, LoRA dropout draws random bits 16 at a time (same distribution, less time)."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="CPU threads for training (default: OMP_NUM_THREADS, else every core this process may use; "
        "on a busy machine the threads then wait passively)."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (random batch order) to cut padding."
    )
    save_strategy: Literal["steps", "epoch", "no"] | None = Field(
        None, description="steps (save_steps / saves_per_epoch), epoch (one checkpoint per epoch) or no (no checkpoints, "
        "except one on SIGTERM/SIGINT)."
    )
    eval_strategy: Literal["steps", "epoch", "no"] | None = Field(
        None, description="steps (eval_steps / evals_per_epoch), epoch (one evaluation per epoch) or no (never evaluate)."
    )
    save_only_model: bool = Field(
        False, description="Checkpoints hold the weights only (no optimizer, schedule or RNG state): smaller, but a run "
        "cannot resume from them."
    )
    loss_watchdog_threshold: float | None = Field(
        None, gt=0, description="Stop the run when the training loss stays above this for loss_watchdog_patience steps."
    )
    loss_watchdog_patience: int = Field(3, gt=0, description="Steps in a row above loss_watchdog_threshold before stopping.")
    hub_model_id: str | None = Field(
        None, description="A Hugging Face Hub model repo (user/name) the finished run's output_dir is pushed to (not its "
        "checkpoints), with HF_TOKEN; a failed push leaves the output in place and names the `hf upload` command.")
    hub_revision: str | None = Field(None, description="The repo branch to push to (created when missing; default main).")
    lisa_n_layers: int | None = Field(
        None, gt=0, description="LISA: train this many decoder layers at a time, drawn at random every lisa_step_interval "
        "steps (the others frozen; embeddings, head and norms train throughout).")
    lisa_step_interval: int | None = Field(None, gt=0, description="LISA: steps between draws of the trained layers.")
    lisa_layers_attribute: str = Field("model.layers", description="LISA: the path of the decoder-layer list in the model.")

    @field_validator("max_grad_norm")
    @classmethod
    def _zero_is_off(cls, value: float | None) -> float | None:
        return value or None

    @field_validator("hub_model_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if value:
            try:
                validate_repo_id(value)
            except HFValidationError as exc:
                raise ValueError(f"hub_model_id: '{value}' is not a Hub repo id: {str(exc).splitlines()[0]} "
                                 "(write user/name, or remove the key)") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _warmup_fraction(cls, data: Any) -> Any:
        """warmup_steps: 0.1 (in axolotl's examples; transformers reads a value below 1 so) is warmup_ratio: 0.1."""
        steps = data.get("warmup_steps") if isinstance(data, dict) else None
        if isinstance(steps, float) and 0 < steps < 1:
            if data.get("warmup_ratio") is not None:
                raise ValueError(f"warmup_steps: {steps} is a share of all steps, as warmup_ratio, which is also set; keep one")
            data = {**data, "warmup_ratio": steps}
            del data["warmup_steps"]
        return data

    @model_validator(mode="after")
    def _one_of_each(self) -> "TrainingSection":
        for a, b in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch"), ("warmup_steps", "warmup_ratio")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"set either {a} or {b}, not both")
        for strategy, keys in (("save_strategy", ("save_steps", "saves_per_epoch")), ("eval_strategy", ("eval_steps", "evals_per_epoch"))):
            given = [k for k in keys if getattr(self, k) is not None]
            if getattr(self, strategy) in ("epoch", "no") and given:
                raise ValueError(f"{strategy}: {getattr(self, strategy)} contradicts {given[0]}; keep one")
        if self.cosine_min_lr_ratio is not None and self.lr_scheduler != "cosine":
            raise ValueError("cosine_min_lr_ratio needs lr_scheduler: cosine")
        if self.sgd_nesterov and not (self.optimizer == "sgd" and self.sgd_momentum > 0):
            raise ValueError("sgd_nesterov needs optimizer: sgd and sgd_momentum > 0")
        if (self.lisa_n_layers is None) != (self.lisa_step_interval is None):
            raise ValueError("LISA needs both lisa_n_layers and lisa_step_interval (how many layers train, and how often "
                             "they are drawn again)")
        if self.lisa_n_layers and self.load_best_model_at_end:
            raise ValueError("LISA with load_best_model_at_end: the best weights are kept for the layers training at that "
                             "step only; keep one")
        return self


class ModelConfigSpec(BaseModel):
    """``model_config:`` the architecture and size of a model built from scratch.

    Unknown keys are allowed on purpose: any field of the transformers config class
    (``rope_theta``, ``tie_word_embeddings``...) may be set; the builder checks them.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    architecture: str = Field(description="llama, gpt2, bert, ... or any transformers model type / config class name.")
    preset: Literal["tiny", "50M", "125M", "1B"] | None = Field(
        None, description="Starting shape (tiny: tests, 50M, 125M, 1B); the size keys below override it."
    )
    hidden_size: int | None = Field(None, gt=0, description="Width of the residual stream.")
    num_layers: int | None = Field(None, gt=0, description="Transformer blocks.")
    num_heads: int | None = Field(None, gt=0, description="Attention heads.")
    num_kv_heads: int | None = Field(None, gt=0, description="Key/value heads (grouped-query attention).")
    intermediate_size: int | None = Field(None, gt=0, description="MLP width (default 4·d, or 8/3·d for gated MLPs).")
    max_position_embeddings: int | None = Field(None, gt=0, description="Longest context (default: at least sequence_len + 1).")
    head_dim: int | None = Field(None, gt=0, description="Per-head size (default hidden_size / num_heads).")

    def overrides(self) -> dict[str, Any]:
        """Size keys and native config fields the user set (for models.build.build_model)."""
        data = self.model_dump(exclude_none=True)
        data.pop("architecture")
        data.pop("preset", None)
        return data


class TokenizerTrainSpec(Section):
    """``tokenizer_train:`` train a tokenizer before pretraining (skipped when output_dir already holds one)."""

    files: list[str] | None = Field(
        None, description="Text files or globs to train on (default: the local files of pretraining_dataset)."
    )
    vocab_size: int = Field(8000, ge=262, description="Vocabulary size, special tokens and 256 byte pieces included.")
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="Subword algorithm.")
    backend: Literal["sentencepiece", "hf"] = Field("hf", description="hf (tokenizers, byte-level) or sentencepiece (byte fallback).")
    output_dir: str | None = Field(None, description="Where the tokenizer is saved (default: OUTPUT_DIR/tokenizer).")
    held_out_fraction: float = Field(0.01, ge=0, lt=0.5, description="Share of the text kept out to report tokens/word.")

    @field_validator("files", mode="before")
    @classmethod
    def _one_file(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class PretrainingSource(Section):
    """One entry of ``pretraining_dataset:`` (axolotl's keys)."""

    path: str = Field(description="Text file, glob (** recursive), JSONL/Parquet file, or a Hub dataset id (streamed).")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split of a Hub dataset.")
    text_column: str = Field("text", description="Column with the text (not used for .txt files).")
    type: str | None = Field(None, description="pretrain or completion: the text is read as is either way.")
    data_files: str | list[str] | None = Field(None, description="Files inside a Hub dataset to read.")
    max_documents: int | None = Field(None, gt=0, description="Stop reading this source after N documents (for Hub streams).")


class PretrainSection(Section):
    """Pretraining from scratch (``model_config``) or continued pretraining (``base_model`` + raw text)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), populate_by_name=True)

    # `model_config` is pydantic's own attribute name, so the field is spelled with an alias.
    model_config_: ModelConfigSpec | None = Field(
        None, alias="model_config", description="Build a new model: {architecture, preset, hidden_size, num_layers, ...}."
    )
    objective: Literal["clm", "mlm"] = Field("clm", description="clm (next token, decoders) or mlm (masked tokens, encoders).")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens chosen for prediction.")
    pretrain_multipack_attn: bool = Field(
        False, description="clm: keep the documents packed into a window apart (position ids restart after each "
        "end-of-text token, so attention is block-diagonal, and no document predicts the next one's first token)."
    )
    tokenizer_train: TokenizerTrainSpec | None = Field(None, description="Train a tokenizer first (see its keys).")
    pretraining_dataset: list[PretrainingSource] | None = Field(
        None, description="Raw text for pretraining: paths/globs or Hub ids, or entries {path, name, split, text_column}."
    )
    shards_dir: str | None = Field(None, description="Where token shards go (default: OUTPUT_DIR/shards); reruns resume.")
    shard_doc_per: Literal["file", "line"] = Field("file", description="One document per text file, or per non-empty line.")
    sample_prompt: str | None = Field(
        None, description="Text to continue after training (clm) or to fill in, with the tokenizer's mask token (mlm)."
    )

    @field_validator("pretraining_dataset", mode="before")
    @classmethod
    def _paths_to_entries(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class LoggingSection(Section):
    wandb_project: str | None = Field(None, description="Weights & Biases project; set to log there.")
    wandb_entity: str | None = Field(None, description="W&B team or user.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to resume a run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store (http://..., sqlite:///mlflow.db, file:./mlruns); set to log there."
    )
    mlflow_experiment_name: str | None = Field(None, description="MLflow experiment (created if missing; default lmforge).")
    mlflow_run_name: str | None = Field(None, description="MLflow run name.")
    use_tensorboard: bool = Field(True, description="Write TensorBoard event files to output_dir (false: off).")
    wandb_watch: Literal["gradients", "parameters", "all"] | None = Field(
        None, description="W&B: log histograms of gradients, parameters or both (wandb.watch)."
    )
    swanlab_project: str | None = Field(None, description="SwanLab project; set to log there.")
    swanlab_experiment_name: str | None = Field(None, description="SwanLab experiment name.")
    swanlab_description: str | None = Field(None, description="SwanLab experiment description.")
    swanlab_mode: Literal["cloud", "local", "offline", "disabled"] | None = Field(
        None, description="SwanLab mode: cloud (default), local (needs swanlab[dashboard]), offline (files in "
        "output_dir/swanlog, `swanlab sync` uploads them later) or disabled.")
    swanlab_workspace: str | None = Field(None, description="SwanLab workspace (organisation) of the project.")
    use_otel_metrics: bool = Field(
        False, description="Serve the training metrics over HTTP for Prometheus to scrape (OpenTelemetry's Prometheus "
        "reader), at http://otel_metrics_host:otel_metrics_port/metrics.")
    otel_metrics_host: str = Field("localhost", description="use_otel_metrics: the address the metrics are served on.")
    otel_metrics_port: int = Field(8000, gt=0, lt=65536, description="use_otel_metrics: the port the metrics are served on.")
    wandb_log_model: Literal["checkpoint", "end"] | None = Field(
        None, description="W&B: upload each checkpoint (checkpoint) or the final output (end) as a model artifact."
    )


class InferenceSection(Section):
    """Generation after training: `inference` (one prompt, batches, --chat, --gradio) and `serve`.

    Command-line flags (--temperature ...) override these; the gradio_* keys are axolotl's."""

    max_new_tokens: int = Field(256, gt=0, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy (deterministic).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this much probability (1: off).")
    top_k: int = Field(0, ge=0, description="Sample only among the k likeliest tokens (0: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on tokens already generated (1: off).")
    truncate_prompt: bool = Field(
        False, description="A prompt longer than the context window keeps only its last tokens, instead of being refused."
    )
    gradio_title: str | None = Field(None, description="--gradio: page title (default: the model's name).")
    gradio_share: bool = Field(False, description="--gradio: also open a public gradio.live link (off: 127.0.0.1 only).")
    gradio_server_name: str | None = Field(None, description="--gradio: address to listen on (default 127.0.0.1).")
    gradio_server_port: int | None = Field(None, gt=0, lt=65536, description="--gradio: port (default 7860).")
    gradio_max_new_tokens: int | None = Field(None, gt=0, description="--gradio: initial max_new_tokens in the UI.")
    gradio_temperature: float | None = Field(None, ge=0, description="--gradio: initial temperature in the UI.")


class EvaluationSection(Section):
    """Evaluation: `lmforge eval` (task metrics, perplexity, lm-eval tasks, before/after), generation metrics at each
    eval step while training (do_causal_lm_eval), and lm-eval tasks at the end of `train` (lm_eval_tasks)."""

    eval_answer_extractor: Literal["auto", "gsm8k", "last_number", "boxed", "regex", "none"] = Field(
        "auto", description="How exact match reads the final answer: gsm8k (#### N), last_number, boxed (\\boxed{}), "
        "regex (eval_answer_regex), none (the whole text); auto: gsm8k or boxed when the references use them, else none."
    )
    eval_answer_regex: str | None = Field(None, description="eval_answer_extractor: regex: the answer is its first group.")
    eval_metrics: list[str] = Field(
        ["exact_match", "token_f1", "rouge_l", "bleu", "chrf", "perplexity"],
        description="`lmforge eval`: task metrics on held-out rows (exact_match, token_f1, rouge_l, bleu/sacrebleu, chrf, ter, perplexity).",
    )
    eval_general_text: str | None = Field(
        "data/tinyshakespeare/input.txt",
        description="`lmforge eval`: general text not in the training data, whose perplexity shows forgetting (null: skip).",
    )
    eval_general_tokens: int = Field(4096, gt=0, description="`lmforge eval`: tokens of eval_general_text scored (from its end).")
    eval_general_tasks: list[str] = Field(
        ["mmlu_dev_local"], description="`lmforge eval`: lm-eval tasks scored before and after, to show forgetting.")
    do_causal_lm_eval: bool = Field(False, description="At each eval step, generate answers to held-out rows and score them.")
    eval_causal_lm_metrics: list[str] = Field(
        ["sacrebleu", "chrf", "ter", "perplexity", "exact_match"],
        description="do_causal_lm_eval: sacrebleu, chrf, ter, perplexity, exact_match, rouge, token_f1.",
    )
    eval_max_new_tokens: int = Field(128, gt=0, description="do_causal_lm_eval: most tokens generated per held-out answer.")
    eval_causal_lm_examples: int = Field(16, gt=0, description="do_causal_lm_eval: held-out rows generated at each eval step.")
    lm_eval_tasks: list[str] = Field([], description="lm-eval tasks run at the end of `train` and by `lmforge eval` "
                                     "(gsm8k_local and mmlu_dev_local ship with lmforge; others need the Hub).")
    lm_eval_batch_size: int = Field(8, gt=0, description="lm-eval batch size.")
    lm_eval_limit: float | None = Field(None, gt=0, description="lm-eval: documents per task (a count, or a share below 1).")


class SpeedSection(Section):
    """How the model runs: precision extras, compile, activation memory, fused-kernel plugins (GPU)."""

    fp16: bool = Field(False, description="float16 mixed precision with a gradient scaler (CUDA, or CPU autocast).")
    tf32: bool | None = Field(None, description="CUDA: TF32 matmuls and convolutions (true/false; default: torch's).")
    torch_compile: Switch = Field(False, description="Compile each decoder layer with torch.compile (auto: on CUDA only).")
    torch_compile_backend: str | None = Field(None, description="torch.compile backend (default inductor).")
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = Field(
        None, description="torch.compile mode.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of gradient checkpointing (torch.utils.checkpoint), e.g. {use_reentrant: false}."
    )
    activation_offloading: bool = Field(
        False, description="CUDA: keep saved activations (not the weights) in pinned CPU memory until backward."
    )
    liger_rope: bool = Field(False, description="Liger's fused RoPE (liger-kernel, CUDA).")
    liger_rms_norm: bool = Field(False, description="Liger's fused RMSNorm (liger-kernel, CUDA).")
    liger_layer_norm: bool = Field(False, description="Liger's fused LayerNorm (liger-kernel, CUDA).")
    liger_glu_activation: bool = Field(False, description="Liger's fused SwiGLU/GeGLU MLP (liger-kernel, CUDA).")
    liger_fused_linear_cross_entropy: bool = Field(
        False, description="Liger's fused output head + loss (liger-kernel, CUDA): no vocab-sized logits in memory.")
    cut_cross_entropy: bool = Field(
        False, description="Cut Cross-Entropy's fused output head + loss (cut-cross-entropy, CUDA).")
    tiled_mlp: bool = Field(
        False, description="Compute each decoder layer's MLP over slices of the sequence and recompute it in backward "
        "(ALST's TiledMLP): the same loss and gradients, with one slice's MLP activations in memory at a time.")
    tiled_mlp_num_shards: int | None = Field(
        None, gt=0, description="tiled_mlp: slices per sequence (default: one per 32K tokens, so shorter rows run untiled).")

    @model_validator(mode="after")
    def _one_fused_loss(self) -> "SpeedSection":
        if self.liger_fused_linear_cross_entropy and self.cut_cross_entropy:
            raise ValueError("set either liger_fused_linear_cross_entropy or cut_cross_entropy, not both")
        return self


# --- scale-out (read by lmforge/train/distributed.py) -------------------------------------------------------------

# fsdp_config keys, as axolotl writes them (its older `fsdp_`-prefixed spellings are read as these).
FSDP_CONFIG_KEYS = (
    "fsdp_version", "offload_params", "cpu_ram_efficient_loading", "transformer_layer_cls_to_wrap", "state_dict_type",
    "final_state_dict_type", "reshard_after_forward", "activation_checkpointing", "auto_wrap_policy", "min_num_params",
    "sharding_strategy", "mixed_precision_policy", "cpu_offload_pin_memory",
    # FSDP1 switches with no FSDP2 counterpart: accepted, and named by a notice (config.keytable).
    "sync_module_states", "use_orig_params", "limit_all_gathers", "backward_prefetch", "forward_prefetch",
)
FSDP1_ONLY_KEYS = ("sync_module_states", "use_orig_params", "limit_all_gathers", "backward_prefetch", "forward_prefetch")
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
# transformers' `fsdp` list options (axolotl's older form): what each asks of FSDP2.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


@dataclass(frozen=True)
class FsdpSettings:
    """FSDP as lmforge runs it (always FSDP2, ``fully_shard``), resolved from fsdp, fsdp_config and fsdp_version."""

    reshard_after_forward: bool = True  # full_shard (ZeRO-3); false: shard_grad_op (ZeRO-2)
    offload_params: bool = False  # parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)
    cpu_offload_pin_memory: bool = True
    # Not acted on yet: every rank reads the weights (validate says so, config/keytable.py fsdp1_switches)
    cpu_ram_efficient_loading: bool = False
    layer_classes: tuple[str, ...] = ()  # classes sharded one per group (default: the model's decoder layers)
    wrap: str = "TRANSFORMER_BASED_WRAP"  # or SIZE_BASED_WRAP (min_num_params) or NO_WRAP (one group)
    min_num_params: int | None = None
    state_dict_type: str = "SHARDED_STATE_DICT"  # checkpoints: DCP shards; FULL_STATE_DICT: also consolidated weights
    final_state_dict_type: str = "FULL_STATE_DICT"
    activation_checkpointing: bool = False
    mixed_precision: str | None = None  # bf16 / fp16 / fp32 for the all-gathered weights (default: from bf16)


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"fsdp_config.{key} must be true or false, got {value!r}")


def normalize_fsdp_config(values: dict[str, Any]) -> dict[str, Any]:
    """axolotl's fsdp_config with the `fsdp_` prefixes removed and `version` read as fsdp_version; unknown keys refused."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key)
        if name.startswith("fsdp_") and name != "fsdp_version":
            name = name[len("fsdp_"):]
        if name == "version":
            name = "fsdp_version"
        if name not in FSDP_CONFIG_KEYS:
            import difflib

            close = difflib.get_close_matches(name, FSDP_CONFIG_KEYS, n=1, cutoff=0.6)
            raise ValueError(f"unknown fsdp_config key '{key}'" + (f" (did you mean {close[0]}?)" if close else
                                                                   f"; known: {', '.join(FSDP_CONFIG_KEYS[:13])}"))
        if name in out and out[name] != value:
            raise ValueError(f"fsdp_config sets {name} twice (with and without the fsdp_ prefix) to different values")
        out[name] = value
    return out


class DistributedSection(Section):
    """Training on several devices or machines: start it with `torchrun` (or `lmforge train --nproc N`).

    Without fsdp or deepspeed, several ranks train with DDP; fsdp/fsdp_config shard with FSDP2
    (``fully_shard``); deepspeed hands the step to DeepSpeed's ZeRO engine (GPUs).
    """

    fsdp: list[str] | None = Field(
        None, description="transformers' list form: [full_shard | shard_grad_op, auto_wrap, offload] (FSDP2 underneath)."
    )
    fsdp_config: dict[str, Any] | None = Field(
        None, description="FSDP2 settings: offload_params, cpu_ram_efficient_loading, transformer_layer_cls_to_wrap, "
        "state_dict_type, reshard_after_forward, activation_checkpointing, auto_wrap_policy, ... (fsdp_ prefixes accepted)."
    )
    fsdp_version: int | None = Field(None, ge=1, le=2, description="1 or 2; lmforge always shards with FSDP2 (fully_shard).")
    fsdp_final_state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] | None = Field(
        None, description="axolotl's older spelling of fsdp_config.final_state_dict_type."
    )
    deepspeed: str | dict[str, Any] | None = Field(
        None, description="DeepSpeed config: a JSON file (e.g. deepspeed_configs/zero2.json) or the mapping itself; CUDA GPUs, or CPUs where deepspeed is installed."
    )
    dp_shard_size: int | None = Field(
        None, ge=1, description="FSDP: the ranks one copy of the weights is sharded over: every rank, or with "
        "dp_replicate_size the ranks of one group (a run checks that it starts that many)."
    )
    dp_replicate_size: int | None = Field(
        None, ge=1, description="FSDP: HSDP, groups of ranks that each hold a sharded copy of the weights (torch's 2-D "
        "device mesh); dp_replicate_size × dp_shard_size is every rank."
    )
    ddp_timeout: int | None = Field(None, gt=0, description="Seconds a collective may wait for the other ranks (default 1800).")
    ddp_bucket_cap_mb: int | None = Field(None, gt=0, description="DDP gradient bucket size in MB (default 25).")
    ddp_broadcast_buffers: bool | None = Field(None, description="DDP: broadcast module buffers from rank 0 every forward (default false).")
    ddp_find_unused_parameters: bool | None = Field(
        None, description="DDP: allow parameters that get no gradient in a step (slower; default false)."
    )

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_words(cls, value: Any) -> Any:
        if isinstance(value, str):  # transformers' string form: "full_shard auto_wrap"
            value = value.split()
        if isinstance(value, list):
            for option in value:
                if option in ("no_shard",):
                    raise ValueError("fsdp: no_shard shards nothing: leave fsdp out and several ranks train with DDP")
                if option in ("hybrid_shard", "hybrid_shard_zero2"):
                    raise ValueError(f"fsdp: {option} (HSDP, sharded within a node and replicated across nodes) is not "
                                     "supported yet; use full_shard")
                if option not in FSDP_OPTIONS:
                    raise ValueError(f"fsdp: unknown option {option!r} (known: {', '.join(FSDP_OPTIONS)})")
        return value

    @field_validator("fsdp_config", mode="before")
    @classmethod
    def _fsdp_config_keys(cls, value: Any) -> Any:
        return normalize_fsdp_config(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_engine(self) -> "DistributedSection":
        if self.deepspeed and (self.fsdp or self.fsdp_config):
            raise ValueError("set either deepspeed or fsdp / fsdp_config, not both")
        # every fsdp_config value checked here, before any run (lmforge.train.distributed acts on them)
        resolve_fsdp(self.fsdp, self.fsdp_config, self.fsdp_version, self.fsdp_final_state_dict_type)
        return self


def resolve_fsdp(fsdp: list[str] | None, fsdp_config: dict[str, Any] | None, fsdp_version: int | None,
                 final_state_dict_type: str | None) -> FsdpSettings | None:
    """The FSDP settings the keys ask for, or None when they ask for no FSDP; ValueError for a value lmforge cannot run."""
    if not fsdp and not fsdp_config:
        return None
    c = dict(fsdp_config or {})
    options = set(fsdp or [])
    reshard = "shard_grad_op" not in options
    strategy = str(c.get("sharding_strategy", "")).upper()
    if strategy in ("NO_SHARD", "2"):
        raise ValueError("fsdp_config.sharding_strategy NO_SHARD shards nothing: leave fsdp out and several ranks train with DDP")
    if strategy.startswith("HYBRID"):
        raise ValueError(f"fsdp_config.sharding_strategy {strategy} (HSDP) is not supported yet; use FULL_SHARD")
    if strategy in ("SHARD_GRAD_OP", "3"):
        reshard = False
    elif strategy and strategy not in ("FULL_SHARD", "1"):
        raise ValueError(f"fsdp_config.sharding_strategy: unknown value {strategy!r} (FULL_SHARD or SHARD_GRAD_OP)")
    if "reshard_after_forward" in c:
        reshard = _bool(c["reshard_after_forward"], "reshard_after_forward")
    layers = c.get("transformer_layer_cls_to_wrap")
    if isinstance(layers, str):
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    wrap = str(c.get("auto_wrap_policy") or "TRANSFORMER_BASED_WRAP").upper()
    if wrap not in ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"):
        raise ValueError(f"fsdp_config.auto_wrap_policy: unknown value {wrap!r} (TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP)")
    if wrap == "SIZE_BASED_WRAP" and not c.get("min_num_params"):
        raise ValueError("fsdp_config.auto_wrap_policy SIZE_BASED_WRAP needs min_num_params")
    state = {}
    for key in ("state_dict_type", "final_state_dict_type"):
        value = str(c.get(key) or ("SHARDED_STATE_DICT" if key == "state_dict_type" else "FULL_STATE_DICT")).upper()
        if value == "LOCAL_STATE_DICT":
            raise ValueError(f"fsdp_config.{key}: LOCAL_STATE_DICT (FSDP1's per-rank flat tensors) is not supported; "
                             "SHARDED_STATE_DICT saves per-rank shards that any number of ranks can resume from")
        if value not in STATE_DICT_TYPES:
            raise ValueError(f"fsdp_config.{key}: unknown value {value!r} ({', '.join(STATE_DICT_TYPES)})")
        state[key] = value
    if final_state_dict_type:
        state["final_state_dict_type"] = final_state_dict_type
    precision = c.get("mixed_precision_policy")
    if precision is not None and str(precision).lower() not in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
        raise ValueError(f"fsdp_config.mixed_precision_policy: unknown value {precision!r} (bf16, fp16 or fp32)")
    version = c.get("fsdp_version", fsdp_version)
    if version is not None and int(version) not in (1, 2):
        raise ValueError(f"fsdp_version must be 1 or 2, got {version!r}")
    return FsdpSettings(
        reshard_after_forward=reshard,
        offload_params="offload" in options or _bool(c.get("offload_params", False), "offload_params"),
        cpu_offload_pin_memory=_bool(c.get("cpu_offload_pin_memory", True), "cpu_offload_pin_memory"),
        cpu_ram_efficient_loading=_bool(c.get("cpu_ram_efficient_loading", False), "cpu_ram_efficient_loading"),
        layer_classes=tuple(layers or ()),
        wrap=wrap,
        min_num_params=c.get("min_num_params"),
        state_dict_type=state["state_dict_type"],
        final_state_dict_type=state["final_state_dict_type"],
        activation_checkpointing=_bool(c.get("activation_checkpointing", False), "activation_checkpointing"),
        mixed_precision=str(precision).lower() if precision is not None else None,
    )


class TrlSettings(Section):
    """``trl:`` GRPO's settings: axolotl's TRLConfig keys, with TRL's GRPOConfig defaults."""

    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference model (0, TRL's default: no reference model is used).")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (one group; advantages are relative within it).")
    max_completion_length: int = Field(512, gt=0, description="Most tokens a completion may have.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also divides the logits the loss's log-probabilities come from).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty for tokens already in the prompt or completion (1: off).")
    reward_funcs: list[str] | None = Field(
        None, description="Reward functions: file.py:function or module.function (same rules as dataset hooks), called as "
        "fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None].")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1).")
    epsilon: float = Field(0.2, ge=0, description="Clip range: the probability ratio is clipped to [1 - epsilon, 1 + epsilon_high].")
    epsilon_high: float | None = Field(None, ge=0, description="Upper clip range (default: epsilon).")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps per generated batch (GRPO's mu).")
    scale_rewards: bool | Literal["group", "batch", "none"] = Field(
        True, description="Divide advantages by the reward std of the group (true/group), of the whole batch, or not (false/none).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="How per-token losses are averaged: per completion then over completions (grpo), over the "
        "micro-batch's tokens (bnpo), over completions x max_completion_length (dr_grpo), over the step's tokens (dapo).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Probability ratios per token, or one per completion (GSPO).")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_completion_length out of the loss.")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="Weighted rewards summed then normalised per group, or each reward normalised first.")
    use_bias_correction_kl: bool = Field(False, description="Multiply the per-token KL by the probability ratio.")
    skip_zero_advantage_batches: bool = Field(
        True, description="Skip the forward and backward of a micro-batch whose advantages are all zero (one process only).")
    log_completions: bool = Field(False, description="Print sample completions with their rewards at each logging step.")
    num_completions_to_print: int | None = Field(None, ge=1, description="How many completions log_completions prints (default 1).")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra variables for the chat template that renders prompts.")


PREFERENCE_METHODS = ("dpo", "ipo", "orpo", "simpo", "kto")  # rl: grpo (generation in training) is built beside these
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


class RLSection(Section):
    """Preference tuning and RL after SFT (axolotl's `rl:` keys and defaults, which are TRL's): one objective each in
    lmforge/train/preference.py, the pairs read by lmforge/data/preference.py."""

    rl: Literal["dpo", "ipo", "orpo", "simpo", "kto", "grpo"] | None = Field(
        None, description="Preference method: dpo (with dpo_loss_type), ipo, orpo, simpo or kto; grpo: generate completions "
        "while training and learn from their rewards (the trl: block). Empty: supervised fine-tuning."
    )
    trl: TrlSettings = Field(TrlSettings(), description="GRPO's settings (axolotl's trl: block).")
    rl_beta: float | None = Field(
        None, gt=0, description="beta: the KL strength of DPO/IPO/KTO, SimPO's reward scale (default 0.1, as TRL's)."
    )
    dpo_loss_type: list[Literal["sigmoid", "hinge", "ipo", "robust"]] | None = Field(
        None, min_length=1, description="rl: dpo losses, summed with dpo_loss_weights (default [sigmoid])."
    )
    dpo_loss_weights: list[float] | None = Field(None, min_length=1, description="Weight of each dpo_loss_type (default 1 each).")
    dpo_label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO / robust DPO: the assumed share of flipped preference labels."
    )
    dpo_use_weighting: bool = Field(
        False, description="WPO: weigh each pair's loss by the policy's own (length-normalised) probability of both answers."
    )
    dpo_norm_loss: bool = Field(
        False, description="Length-normalised DPO: the log-ratios are averaged over each answer's tokens, not summed."
    )
    rpo_alpha: float | None = Field(
        None, ge=0, description="RPO: add this times the NLL of the chosen answers (per token) to the DPO loss."
    )
    orpo_alpha: float = Field(0.1, gt=0, description="rl: orpo: weight of the odds-ratio term beside the chosen NLL.")
    simpo_gamma: float = Field(0.5, ge=0, description="rl: simpo: target reward margin.")
    cpo_alpha: float = Field(0.0, ge=0, description="rl: simpo: weight of the chosen NLL (behaviour cloning) term.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="rl: kto: weight of the desirable rows' loss.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="rl: kto: weight of the undesirable rows' loss.")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference model's log-probabilities once before training (stored with the "
        "prepared data): no reference model is held while training."
    )
    reward_model: bool = Field(
        False, description="Train a reward model on preference pairs: a sequence-classification head scoring each answer, "
        "Bradley-Terry loss -log σ(score(chosen) - score(rejected)); it saves as AutoModelForSequenceClassification."
    )
    num_labels: int | None = Field(None, ge=1, le=1, description="reward_model: scores per sequence (1, the only value).")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="reward_model: adds coefficient x mean((score(chosen) + score(rejected))^2) to the loss "
        "(TRL's RewardTrainer), pulling the scores towards mean zero."
    )
    max_prompt_len: int | None = Field(
        None, gt=0, description="Preference rows: keep at most this many prompt tokens (the tail); default sequence_len // 2."
    )

    @property
    def preference(self) -> str | None:
        """What trains on preference rows: the rl: method of the DPO family or KTO, "reward_model", or None (SFT, GRPO)."""
        return self.rl if self.rl in PREFERENCE_METHODS else "reward_model" if self.reward_model else None

    @model_validator(mode="after")
    def _weights_match(self) -> "RLSection":
        if self.dpo_loss_weights is not None and len(self.dpo_loss_weights) != len(self.dpo_loss_type or ["sigmoid"]):
            raise ValueError("dpo_loss_weights needs one weight per dpo_loss_type")
        return self


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "quantization": QuantizationSection,
    "adapter": AdapterSection,
    "training": TrainingSection,
    "logging": LoggingSection,
    "pretrain": PretrainSection,
    "inference": InferenceSection,
    "evaluation": EvaluationSection,
    "speed": SpeedSection,
    "distributed": DistributedSection,
    "rl": RLSection,
}


def key_owners() -> dict[str, str]:
    """Flat axolotl key → the section that owns it."""
    # A field's alias is the key users write (PretrainSection.model_config_ is `model_config`).
    return {info.alias or key: section for section, model in SECTIONS.items() for key, info in model.model_fields.items()}


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
