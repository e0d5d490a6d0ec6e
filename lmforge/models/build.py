"""Build a randomly initialised model for pretraining from scratch.

``build_model(build_config("llama", vocab_size=32000, preset="125M"))`` gives a transformers model
(``AutoModelForCausalLM`` for ``clm``, ``AutoModelForMaskedLM`` for ``mlm``) whose config
is a normal transformers config, so everything downstream (saving, generation, export)
treats it like any pretrained checkpoint.

Size fields have one lmforge spelling for every architecture (``hidden_size``,
``num_layers``, ``num_heads``, ``num_kv_heads``, ``intermediate_size``,
``max_position_embeddings``, ``head_dim``) mapped to each config's own names (``n_embd``,
``n_layer``… for gpt2); any native attribute of the config class is accepted as well.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from lmforge.errors import LmforgeError

try:  # transformers 5 configs are strict dataclasses that validate themselves
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover
    StrictDataclassError = ValueError  # type: ignore[misc,assignment]

Objective = Literal["clm", "mlm"]

# lmforge name -> the canonical transformers name. Configs translate canonical names to their
# own through ``attribute_map`` (gpt2: num_hidden_layers -> n_layer); EXTRA_NAMES covers the
# fields attribute_map does not.
GENERIC_FIELDS: dict[str, str] = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "head_dim": "head_dim",
}
EXTRA_NAMES: dict[str, dict[str, str]] = {
    "gpt2": {"intermediate_size": "n_inner"},
    "gpt_neo": {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"},
}

# Shapes, not exact counts: the parameter count also depends on vocab_size and on the
# architecture (gated MLPs, tied embeddings). Roughly the named size at a 32k vocab.
PRESETS: dict[str, dict[str, int]] = {
    # For tests and smoke runs: trains on a CPU in seconds.
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 256},
    "50M": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "max_position_embeddings": 1024},
    # GPT-2 small / BERT-base shape.
    "125M": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "max_position_embeddings": 2048},
    # Llama-3.2-1B shape (grouped-query attention: 8 kv heads).
    "1B": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8,
           "intermediate_size": 8192, "max_position_embeddings": 2048},
}

# Architectures with a gated (SwiGLU/GeGLU) MLP: three matrices instead of two, so the
# default intermediate size is 8/3·d rather than 4·d to keep the parameter count comparable.
GATED_MLP = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
             "granite", "phi3", "smollm3", "cohere", "stablelm", "mixtral", "qwen2_moe"}
# Encoder-only architectures: they can't be trained as causal LMs.
ENCODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "modernbert",
            "xlm-roberta", "camembert", "mpnet", "megatron-bert", "roformer", "ernie"}
COMMON_CLM = ["llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "gpt_neox", "phi3"]
COMMON_MLM = ["bert", "roberta", "modernbert", "distilbert", "deberta-v2", "electra"]


def _names() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return dict(CONFIG_MAPPING_NAMES), dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), dict(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def resolve_architecture(architecture: str, objective: Objective = "clm") -> str:
    """Turn ``llama`` / ``LlamaConfig`` / ``LlamaForCausalLM`` into a model type (``llama``)."""
    configs, clm, mlm = _names()
    if objective not in ("clm", "mlm"):
        raise LmforgeError(f"unknown objective '{objective}'", where="objective", fix="use clm or mlm")
    key = architecture.strip()
    model_type: str | None = None
    if key.lower() in configs:
        model_type = key.lower()
    else:
        by_class = {name.lower(): mt for mt, name in configs.items()}
        for names in (clm, mlm):
            by_class.update({name.lower(): mt for mt, name in names.items()})
        model_type = by_class.get(key.lower()) or by_class.get(key.lower() + "config")
    table = clm if objective == "clm" else mlm
    common = COMMON_CLM if objective == "clm" else COMMON_MLM
    if model_type is None:
        raise LmforgeError(
            f"unknown architecture '{architecture}'",
            where="model_config.architecture",
            fix=f"use one of {', '.join(common)} (or any transformers model type / config class name "
            f"with a {'causal' if objective == 'clm' else 'masked'} LM head: {len(table)} available)",
        )
    if model_type not in table or (objective == "clm" and model_type in ENCODERS):
        other = "mlm" if objective == "clm" else "clm"
        raise LmforgeError(
            f"architecture '{model_type}' has no {'causal' if objective == 'clm' else 'masked'} LM head",
            where="model_config.architecture",
            fix=f"for objective {objective} use one of {', '.join(common)}; or set objective: {other}",
        )
    return model_type


def _native_name(config_cls: type, model_type: str, canonical: str) -> str:
    extra = EXTRA_NAMES.get(model_type, {})
    if canonical in extra:
        return extra[canonical]
    return getattr(config_cls, "attribute_map", {}).get(canonical, canonical)


def build_config(
    architecture: str,
    vocab_size: int,
    preset: str | None = "tiny",
    overrides: dict[str, Any] | None = None,
    objective: Objective = "clm",
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    mask_token_id: int | None = None,
):
    """The transformers config of a new model: ``architecture`` at ``preset`` size plus ``overrides``.

    ``architecture`` is ``llama``/``gpt2``/``bert`` or any transformers model type or config class name;
    the special ids must lie inside ``vocab_size``. :func:`build_model` instantiates it.
    """
    from transformers import AutoConfig

    model_type = resolve_architecture(architecture, objective)
    if preset is not None and preset not in PRESETS:
        raise LmforgeError(f"unknown preset '{preset}'", where="model_config.preset",
                           fix=f"use one of {', '.join(PRESETS)} or leave it empty and give sizes")
    base = AutoConfig.for_model(model_type)
    native_fields = set(base.to_dict()) - {"model_type", "transformers_version", "architectures", "_name_or_path"}
    config_cls = type(base)

    sizes: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    native_overrides: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key in GENERIC_FIELDS:
            sizes[key] = value
        elif key in native_fields or key in getattr(config_cls, "attribute_map", {}):
            native_overrides[key] = value
        else:
            raise LmforgeError(
                f"unknown size field '{key}' for {model_type}",
                where=f"model_config.{key}",
                fix=f"use one of {', '.join(GENERIC_FIELDS)} or a {config_cls.__name__} field",
            )
    if "hidden_size" in sizes and "intermediate_size" not in sizes:
        factor = 8 / 3 if model_type in GATED_MLP else 4
        # Round up to a multiple of 64: matmul kernels like aligned shapes.
        sizes["intermediate_size"] = int(math.ceil(sizes["hidden_size"] * factor / 64) * 64)
    # Defaults of the config class (mistral: 8 kv heads, qwen3: head_dim 128) assume its own
    # sizes; once heads are given, derive these from them unless they were given too.
    if "num_heads" in sizes:
        if "hidden_size" in sizes and "head_dim" not in sizes and sizes["hidden_size"] % sizes["num_heads"]:
            raise LmforgeError(f"hidden_size {sizes['hidden_size']} is not divisible by num_heads {sizes['num_heads']}",
                               where="model_config.num_heads", fix="pick num_heads that divides hidden_size")
        sizes.setdefault("num_kv_heads", sizes["num_heads"])
        if "hidden_size" in sizes:
            sizes.setdefault("head_dim", sizes["hidden_size"] // sizes["num_heads"])

    kwargs: dict[str, Any] = {}
    for key, value in sizes.items():
        canonical = GENERIC_FIELDS[key]
        native = _native_name(config_cls, model_type, canonical)
        if native not in native_fields and canonical not in native_fields:
            if key in ("num_kv_heads", "head_dim"):
                continue  # a preset detail the architecture does not have (gpt2 has no GQA)
            raise LmforgeError(
                f"size field '{key}' does not apply to {model_type}",
                where=f"model_config.{key}",
                fix=f"remove it; {config_cls.__name__} has no '{native}'",
            )
        kwargs[native] = value
    kwargs.update(native_overrides)
    kwargs["vocab_size"] = vocab_size
    # Special ids must point inside the new vocabulary (gpt2's default bos 50256 would not).
    kwargs["bos_token_id"] = bos_token_id
    kwargs["eos_token_id"] = eos_token_id
    kwargs["pad_token_id"] = pad_token_id
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:  # transformers' own validation of the sizes
        raise LmforgeError(f"invalid {model_type} config: {e}", where="model_config",
                           fix="adjust the size fields named in the message") from e
    if mask_token_id is not None:
        config.mask_token_id = mask_token_id  # read by lmforge's MLM collator, harmless to transformers

    hidden = getattr(config, "hidden_size")
    heads = getattr(config, "num_attention_heads")
    if getattr(config, "head_dim", None) is None and hidden % heads:
        raise LmforgeError(f"hidden_size {hidden} is not divisible by num_heads {heads}",
                           where="model_config.num_heads", fix="pick num_heads that divides hidden_size")
    kv = getattr(config, "num_key_value_heads", None)
    if kv and heads % kv:
        raise LmforgeError(f"num_heads {heads} is not divisible by num_kv_heads {kv}",
                           where="model_config.num_kv_heads", fix="pick num_kv_heads that divides num_heads")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not 0 <= value < vocab_size:
            raise LmforgeError(f"{name} {value} is outside the vocabulary (size {vocab_size})",
                               where=f"model_config.{name}", fix="use the ids of the trained tokenizer")
    return config


def _model_class(objective: Objective):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM


def build_model(config: Any, objective: Objective = "clm", seed: int = 0, *, dtype: torch.dtype = torch.float32,
                attn_implementation: str | None = None) -> torch.nn.Module:
    """A randomly initialised model of a :func:`build_config` config (built for the same ``objective``).

    The same ``seed`` gives the same weights; the global RNG is left untouched.
    """
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # fork_rng: seeding for the init must not change the data order of the caller's run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(objective).from_config(config, **kwargs)
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of (unique) parameters; tied weights count once.

    ``exclude_embeddings`` drops input token/position embedding tables (the "non-embedding"
    N of the scaling-law papers), keeping the output head when it is tied to them.
    """
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = 0
    for p in model.parameters():  # parameters() already deduplicates tied tensors
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in skip:
            continue
        total += p.numel()
    return total


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but embedding lookups.

    An embedding lookup costs no FLOPs, but a tied output head is a full ``d × vocab`` matmul,
    so a tied table is counted once (as the head).
    """
    n = count_parameters(model, exclude_embeddings=True)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if out is not None and id(out.weight) in emb_ids:
        n += out.weight.numel()
    return n


def flops_per_token(model_config: Any, seq_len: int, objective: Objective = "clm") -> int:
    """Training FLOPs per token (forward + backward) of a model with ``model_config``.

    ``6·N + 12·L·H·Q·T`` (Kaplan et al. 2020; PaLM appendix B; nanoGPT's MFU):
    - ``6·N``: every matmul parameter costs 2 FLOPs forward (multiply + add) and 4 backward
      (grads for inputs and weights); N = :func:`matmul_parameters` (non-embedding parameters
      plus the output head);
    - ``12·L·H·Q·T``: attention scores ``QKᵀ`` and the weighted sum ``AV``, each
      ``2·T·H·Q`` FLOPs per token per layer forward, ×3 with backward; L layers, H heads of
      size Q, context T = ``seq_len``. It counts the full T×T matrix, the usual convention,
      though a causal kernel skips about half of it.
    ``model_config`` is a transformers config (or a model, whose ``.config`` is used).
    """
    import torch.nn as nn

    if isinstance(model_config, nn.Module):
        model = model_config
        config = model.config
    else:
        config = model_config
        model_type = getattr(config, "model_type", "")
        if objective == "clm" and model_type in ENCODERS:
            objective = "mlm"
        # The meta device builds shapes without memory or init cost, so a 70B config is free.
        with torch.device("meta"):
            model = _model_class(objective).from_config(config)
    n = matmul_parameters(model)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(6 * n + 12 * layers * heads * head_dim * seq_len)
