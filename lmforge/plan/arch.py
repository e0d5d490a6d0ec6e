"""A model's shape from its config alone, no weights: a local folder's config.json, a GGUF header, or a Hub id.

Hub ids resolve offline: first the architecture-only configs shipped in ``archs/`` (the published
``config.json`` fields of common families, no weights), then the local Hugging Face cache. The
shape is enough to list every parameter (name, shape, kind), which is what the memory model counts.

Decoder families whose layer is the Llama layout (llama, mistral, qwen2/3, gemma/gemma2, smollm3,
olmo2, phi3's separate projections...) are listed in pure Python. Any other ``model_type`` is built
on torch's meta device (shapes only, no memory) and its parameters read from that model.
"""

from __future__ import annotations

import functools
import json
import os
import re
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

ARCHS_DIR = Path(__file__).with_name("archs")

# model_type → (q/k/v carry a bias, norms per layer). The layer layout is Llama's for all of them.
LLAMA_LIKE: dict[str, tuple[bool, int]] = {
    "llama": (False, 2),
    "mistral": (False, 2),
    "mixtral": (False, 2),  # experts are not listed: refused below
    "qwen2": (True, 2),
    "qwen3": (False, 2),
    "gemma": (False, 2),
    "gemma2": (False, 4),
    "smollm3": (False, 2),
    "olmo2": (False, 2),
}
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its name as transformers spells it, shape, and what it is."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "embed", "head", "linear" (a projection in a layer), "norm", "bias"
    module: str = ""  # leaf module name for linears (q_proj...): what lora_target_modules match

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that memory and FLOPs depend on."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    source: str
    qkv_bias: bool = False
    norms_per_layer: int = 2
    gated_mlp: bool = True
    final_logit_softcapping: float | None = None
    max_position_embeddings: int | None = None
    checkpoint_bytes: int = 2  # bytes per parameter of the stored weights (config.json's dtype; GGUF: converted to fp32)
    # Set for model types built on the meta device: their exact parameter list.
    meta_params: tuple[Param, ...] | None = field(default=None, compare=False, repr=False)
    # An image-text model's vision tower and projector (the language model is the shape above).
    vision: "VisionShape | None" = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def params(self) -> list[Param]:
        """Every parameter tensor of the model, in transformers' names."""
        return list(_params(self))

    def _build_params(self) -> list[Param]:
        if self.meta_params is not None:
            return list(self.meta_params)
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        out = [Param("model.embed_tokens.weight", (v, h), "embed")]
        shapes = {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h), "o_proj": (h, self.q_dim),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        norm_names = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for layer in range(self.num_layers):
            prefix = f"model.layers.{layer}"
            for name in ATTN_MODULES + MLP_MODULES:
                group = "self_attn" if name in ATTN_MODULES else "mlp"
                out.append(Param(f"{prefix}.{group}.{name}.weight", shapes[name], "linear", name))
                if self.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                    out.append(Param(f"{prefix}.{group}.{name}.bias", (shapes[name][0],), "bias", name))
            for norm in norm_names[: self.norms_per_layer]:
                out.append(Param(f"{prefix}.{norm}.weight", (h,), "norm"))
        out.append(Param("model.norm.weight", (h,), "norm"))
        if not self.tie_word_embeddings:
            out.append(Param("lm_head.weight", (v, h), "head"))
        return out

    def parameter_count(self) -> int:
        return sum(p.numel for p in self.params())

    def linear_names(self) -> list[str]:
        """Leaf names of the layers' linear modules: the lora_target_modules candidates."""
        return sorted({p.module for p in self.params() if p.kind == "linear"})

    def describe(self) -> str:
        return (f"{self.model_type}, {self.parameter_count() / 1e9:.2f}B parameters: {self.num_layers} layers, hidden "
                f"{self.hidden_size}, MLP {self.intermediate_size}, {self.num_heads} heads ({self.num_kv_heads} KV) of "
                f"{self.head_dim}, vocabulary {self.vocab_size:,}{', tied embeddings' if self.tie_word_embeddings else ''}"
                + (f"; {self.vision.describe()}" if self.vision else ""))


@dataclass(frozen=True)
class VisionShape:
    """An image-text model's parts beside its language model: the vision tower and projector (their parameters),
    what one image costs in the sequence (image tokens) and as input (its pixel tensor)."""

    parameters: int
    image_size: int  # pixels per side the vision tower takes
    image_tokens: int  # tokens one image puts in the sequence (as the processor expands its placeholder)

    def pixel_bytes(self, images: int = 1) -> int:
        """fp32 pixel_values of `images` images (3 channels)."""
        return images * 3 * self.image_size * self.image_size * 4

    def describe(self) -> str:
        return (f"vision tower and projector {self.parameters:,} parameters, {self.image_tokens} image tokens "
                f"per {self.image_size}x{self.image_size} image")


def vision_shape(config: dict[str, Any], source: str) -> VisionShape | None:
    """The VisionShape of an image-text config (one with a vision_config), from the model built on the meta device."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(config.get("model_type", ""), **fields))
    except (ValueError, KeyError, TypeError) as exc:
        raise LmforgeError(f"cannot build the image-text model '{config.get('model_type')}': {str(exc).splitlines()[0]}",
                           where=source, fix="plan needs an architecture transformers knows") from exc
    language = {id(p) for p in model.get_decoder().parameters()}
    head = model.get_output_embeddings()
    language |= {id(p) for p in head.parameters()} if head is not None else set()
    parameters = sum(p.numel() for p in model.parameters() if id(p) not in language)
    size = vision.get("image_size") or 224
    size = int(size if isinstance(size, int) else max(size) if isinstance(size, (list, tuple)) else size.get("height", 224))
    patch = int(vision.get("patch_size") or 14)
    # patches per image, merged by a pixel shuffle where the model has one (Idefics3, SmolVLM)
    tokens = config.get("mm_tokens_per_image") or (size // patch) ** 2 // int(config.get("scale_factor") or 1) ** 2
    return VisionShape(parameters, size, int(tokens))


@functools.lru_cache(maxsize=64)
def _params(shape: ModelShape) -> tuple[Param, ...]:
    return tuple(shape._build_params())


def checkpoint_bytes(config: dict[str, Any]) -> int:
    """Bytes per parameter of the stored weights, from config.json's dtype (bf16 when it does not say)."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").lower().removeprefix("torch.")
    return 4 if dtype in ("float32", "fp32", "float") else 2


def shape_from_config(config: dict[str, Any], source: str) -> ModelShape:
    """A ModelShape from config.json fields (text_config is used for multimodal wrappers, and an image-text model's
    vision tower is counted beside it: ModelShape.vision)."""
    vision = vision_shape(config, source)
    shape = _language_shape(config, source)
    return replace(shape, vision=vision) if vision is not None else shape


def _language_shape(config: dict[str, Any], source: str) -> ModelShape:
    if "text_config" in config and "hidden_size" not in config:
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", True)}
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in LLAMA_LIKE:
        return _shape_from_meta(config, source)
    if model_type == "mixtral" or config.get("num_local_experts"):
        raise LmforgeError("mixture-of-experts models are not modelled by the planner yet", where=source,
                           fix="plan a dense model of similar size, or measure with a short `lmforge train --max_steps=3`")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        shape = ModelShape(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            # transformers' default is to tie; Llama-family configs say so explicitly.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            source=source,
            qkv_bias=LLAMA_LIKE[model_type][0] or bool(config.get("attention_bias", False)),
            norms_per_layer=LLAMA_LIKE[model_type][1],
            final_logit_softcapping=config.get("final_logit_softcapping"),
            max_position_embeddings=config.get("max_position_embeddings"),
            checkpoint_bytes=checkpoint_bytes(config),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LmforgeError(f"the model config lacks or mangles {exc}", where=source, fix="check its config.json") from exc
    return shape


def _shape_from_meta(config: dict[str, Any], source: str) -> ModelShape:
    """Any other architecture: build it on the meta device (no memory) and read its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(config.get("model_type", ""), **fields)
    except (ValueError, KeyError, TypeError) as exc:
        reason = textwrap.shorten(str(exc), 200, placeholder=" ...")  # at a word boundary, never mid-word
        raise LmforgeError(f"cannot read model_type '{config.get('model_type')}': {reason}", where=source,
                           fix="plan needs an architecture transformers knows") from exc
    model = None
    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):  # decoders, then encoders (masked-LM pretraining)
        try:
            with torch.device("meta"):
                model = auto.from_config(hf_config)
            break
        except ValueError:
            continue
    if model is None:
        raise LmforgeError(f"model_type '{config.get('model_type')}' is neither a causal nor a masked LM transformers can build",
                           where=source, fix="plan a causal-LM (or masked-LM) architecture")
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    kinds: dict[int, str] = {id(p): "embed" for p in embed.parameters()}
    if head is not None:
        kinds.update({id(p): "head" for p in head.parameters() if id(p) not in kinds})
    module_of: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            for p in module.parameters(recurse=False):
                module_of.setdefault(id(p), name.rsplit(".", 1)[-1])
    params = []
    for name, p in model.named_parameters():
        kind = kinds.get(id(p)) or ("linear" if id(p) in module_of and p.ndim == 2 else "bias" if id(p) in module_of else "norm")
        params.append(Param(name, tuple(p.shape), kind, module_of.get(id(p), "")))
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 1)
    inter = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden)
    gated = any(p.module in ("gate_proj", "gate_up_proj", "w1") for p in params)
    return ModelShape(
        model_type=str(config.get("model_type")), hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=int(getattr(text, "num_key_value_heads", 0) or heads),
        head_dim=int(getattr(text, "head_dim", 0) or hidden // heads), vocab_size=int(text.vocab_size),
        tie_word_embeddings=not any(p.kind == "head" for p in params),
        source=source, gated_mlp=gated, meta_params=tuple(params),
        max_position_embeddings=getattr(text, "max_position_embeddings", None), checkpoint_bytes=checkpoint_bytes(config),
    )


def shipped_hub_ids() -> list[str]:
    """Hub ids whose architecture ships with lmforge (found offline)."""
    canonical = [json.loads(p.read_text())["_name_or_path"] for p in sorted(ARCHS_DIR.glob("*--*.json"))]
    return sorted(canonical + list(_aliases()))


def _aliases() -> dict[str, str]:
    return json.loads((ARCHS_DIR / "aliases.json").read_text(encoding="utf-8"))


def _shipped_config(hub_id: str) -> dict[str, Any] | None:
    lookup = {k.lower(): v for k, v in _aliases().items()}
    canonical = lookup.get(hub_id.lower(), hub_id)
    for path in ARCHS_DIR.glob("*--*.json"):
        if path.stem.lower() == canonical.replace("/", "--").lower():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def _cached_hub_config(hub_id: str) -> str | None:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(hub_id, "config.json", local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: the caller says what to do
        return None


def read_json(path: Path | str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"cannot read {path}: {exc}", where=where, fix="point it at a valid config.json") from exc
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} is not a JSON object", where=where)
    return data


def _gguf_config(path: Path, where: str) -> dict[str, Any]:
    from lmforge.models.load import gguf_cache_dir  # the converted folder, when a run made it already

    cached = gguf_cache_dir(path) / "config.json"
    if cached.is_file():
        return read_json(cached, where)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        # lmforge de-quantizes a GGUF into an fp32 safetensors folder (models/load.py): that is what training reads
        return {**load_gguf_checkpoint(str(path), return_tensors=False)["config"], "dtype": "float32"}
    except Exception as exc:  # the GGUF reader raises many types for a bad file
        raise LmforgeError(f"cannot read the GGUF header: {exc}", where=where, fix="check the file is a complete .gguf model") from exc


def read_shape(base_model: str, config_path: str | None = None) -> ModelShape:
    """The shape of ``base_model`` (or of ``base_model_config`` when set), without loading weights."""
    from lmforge.models.load import resolve_model_path

    spec = config_path or base_model
    where = f"base_model: {spec}"
    path = resolve_model_path(spec)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise LmforgeError("GGUF file does not exist", where=where, fix="fix the path")
        return shape_from_config(_gguf_config(Path(path), where), spec)
    if os.path.isdir(path):
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise LmforgeError("no config.json in this folder", where=where, fix="point base_model at a saved model folder")
        return shape_from_config(read_json(config_file, where), spec)
    if path.endswith(".json") and os.path.isfile(path):
        return shape_from_config(read_json(path, where), spec)
    if os.path.exists(path) or path.startswith(("/", ".", "~")):
        raise LmforgeError("model path does not exist", where=where, fix="fix the path or use a Hub id")
    shipped = _shipped_config(path)
    if shipped is not None:
        return shape_from_config(shipped, f"{spec} (architecture shipped with lmforge)")
    cached = _cached_hub_config(path)
    if cached is not None:
        return shape_from_config(read_json(cached, where), f"{spec} (Hugging Face cache)")
    known = ", ".join(i for i in shipped_hub_ids() if not re.search(r"(Instruct|chat|-it)", i))
    raise LmforgeError(
        f"no architecture known offline for '{spec}'", where=where,
        fix=f"point base_model at a folder holding its config.json (plan reads no weights), or use one of: {known}",
    )
