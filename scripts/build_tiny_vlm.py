"""Build a tiny random-weight image-text model (LLaVA-shaped: a CLIP vision tower, a projector, a Llama) with its
processor, offline, saved like a Hub model: ``python scripts/build_tiny_vlm.py OUT_DIR``. With a family,
``python scripts/build_tiny_vlm.py OUT_DIR gemma3`` builds a tiny model of that transformers family instead
(``build_tiny_family``: gemma3, mllama, paddleocr_vl; the families whose processors need torchvision are refused
with that reason where it is not installed, and have no recipe yet: they were never built here).

No pretrained image-text model can be downloaded on the machines lmforge is tested on, so its vision-language path
is tested on this one. It loads through ``AutoProcessor`` and ``AutoModelForImageTextToText`` like any Hub VLM, and
its chat template has ``{% generation %}`` blocks so transformers' own ``return_assistant_tokens_mask`` is the
independent reference lmforge's label mask is compared with.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

WORDS = ("which digit is this what number do you see the image shows a it one two three four five six seven "
         "eight nine zero describe answer yes no and of in").split()
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32  # pixels; CLIP patches of 8 make 16 image tokens per image
PATCH = 8

# chatml with content parts; the assistant's content (and its end of turn) inside {% generation %}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(named: dict[str, str] | None = None, extra: tuple[str, ...] = ()):  # noqa: ANN201
    """A word-level tokenizer of WORDS; `named` special tokens become attributes its processor reads (image_token,
    boi_token ...: transformers' extra_special_tokens), `extra` are other special tokens its processor writes."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = named or {}
    family_tokens = list(dict.fromkeys([*named.values(), *extra]))
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    specials += [t for t in family_tokens if t not in specials]
    words = sorted(set(WORDS) | {w.capitalize() for w in WORDS} | {"user", "assistant", "system"})
    vocab = {tok: i for i, tok in enumerate(specials + [str(d) for d in range(10)] + words + list("#:.,?!\n+-=()'"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        **({"extra_special_tokens": named} if named else
                                           {"additional_special_tokens": ["<|im_start|>", IMAGE_TOKEN]}))
    if named or extra:  # extra_special_tokens replaces the additional ones: every family token is matched whole in
        # text (they are in the vocabulary already: the ids do not move)
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[4:]], special_tokens=True)
    return tokenizer


def build_processor(tokenizer):  # noqa: ANN001, ANN201
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         do_center_crop=True, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def build_tiny_vlm(folder: Path, seed: int = 0, text_layers: int = 2, hidden: int = 64):  # noqa: ANN201
    """Write a tiny LLaVA (random weights) with its processor to `folder`; returns (model, processor)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model, processor


# -- one tiny model per image-text family transformers has (bench/vision_examples.py's census) ----------------------

# Sizes every family's sub-configs are shrunk to, where the key exists (text model, vision tower).
TEXT_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
              "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
              "intermediate_size_mlp": 128, "max_position_embeddings": 2048, "linear_num_key_heads": 2,
              "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "head_dim": 8, "depth": 2, "embed_dim": 32, "num_heads": 4,
                "projection_dim": 32, "vision_output_dim": 32, "out_hidden_size": 64}


class Family(NamedTuple):
    """What a tiny model of one transformers image-text family needs beyond the shrunk default config: the text its
    chat template writes for an image, the special tokens its processor reads from the tokenizer (`named`: attribute
    -> token) or writes (`extra`), its image processor's and processor's settings, and config fields (`config`; a
    value naming a special token is replaced by that token's id)."""

    placeholder: str
    named: dict[str, str] = {}
    extra: tuple[str, ...] = ()
    image_processor: dict[str, Any] = {}
    processor: dict[str, Any] = {}
    config: dict[str, Any] = {}
    text: dict[str, Any] = {}
    vision: dict[str, Any] = {}


# M-RoPE splits a text head's 16 dimensions' 8 frequencies over (time, height, width)
MROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}

FAMILIES: dict[str, Family] = {
    "llava": Family("<image>"),  # build_tiny_vlm above
    # SigLIP patches of 8 on 32x32 pooled to 2x2: 4 soft tokens between <start_of_image> and <end_of_image>
    "gemma3": Family("<start_of_image>", {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                          "image_token": "<image_soft_token>"}, (),
                     {"size": {"height": 32, "width": 32}}, {"image_seq_length": 4},
                     {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                      "image_token_index": "<image_soft_token>", "mm_tokens_per_image": 4},
                     {"query_pre_attn_scalar": 16, "sliding_window": 64}, {"image_size": 32, "patch_size": 8}),
    "mllama": Family("<|image|>", {"image_token": "<|image|>"}, ("<|python_tag|>",),
                     {"size": {"height": 32, "width": 32}, "max_image_tiles": 1}, {},
                     {"image_token_index": "<|image|>"}, {"cross_attention_layers": [1]},
                     {"image_size": 32, "patch_size": 8, "max_num_tiles": 1, "num_global_layers": 1,
                      "attention_heads": 4, "intermediate_layers_indices": [0], "vision_output_dim": 64,
                      "supported_aspect_ratios": [[1, 1]]}),
    "paddleocr_vl": Family("<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
                           {"image_token": "<|IMAGE_PLACEHOLDER|>"}, ("<|IMAGE_START|>", "<|IMAGE_END|>"),
                           {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 1, "min_pixels": 32 * 32,
                            "max_pixels": 32 * 32}, {},
                           {"image_token_id": "<|IMAGE_PLACEHOLDER|>", "vision_start_token_id": "<|IMAGE_START|>",
                            "vision_end_token_id": "<|IMAGE_END|>"}, MROPE,
                           {"image_size": 32, "patch_size": 8, "spatial_merge_size": 2}),
}


def _shrunk(sub: Any, sizes: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    values = sub.to_dict()
    values.update({k: v for k, v in sizes.items() if k in values})
    layers = values.get("num_hidden_layers") or values.get("depth")
    if isinstance(values.get("layer_types"), list) and layers:
        values["layer_types"] = values["layer_types"][:layers]
    values.update(extra)
    return values


def build_tiny_family(model_type: str, folder: Path, seed: int = 0):  # noqa: ANN201
    """Write a tiny random-weight image-text model of `model_type`'s family with its own processor class to `folder`
    (a word-level tokenizer with the family's special tokens, a chatml template writing its image placeholder);
    returns (model, processor). Raises ImportError where the family's processor needs a package that is missing
    (transformers' video processors and some image processors need torchvision), KeyError for a family with no
    tiny recipe in FAMILIES, and what transformers raises otherwise."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    if model_type == "llava":
        return build_tiny_vlm(folder, seed)
    if model_type not in PROCESSOR_MAPPING_NAMES:
        raise KeyError(f"transformers has no processor for {model_type}")
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    attributes = processor_class.get_attributes()  # raises ImportError where the class itself needs torchvision
    image_names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    if "image_processor" not in attributes or not image_names:
        raise KeyError(f"{processor_class.__name__} takes no images")
    if not is_torchvision_available() and ("video_processor" in attributes or not image_names.get("pil")):
        part = "video processor" if "video_processor" in attributes else f"image processor {image_names.get('torchvision')}"
        raise ImportError(f"{processor_class.__name__}'s {part} needs torchvision")
    if model_type not in FAMILIES:
        raise KeyError(f"no tiny recipe for {model_type} in scripts/build_tiny_vlm.py FAMILIES")
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    family = FAMILIES[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family.named, family.extra)
    template = CHAT_TEMPLATE.replace("{{ '<image>' }}", "{{ '" + family.placeholder + "' }}")
    image_class = getattr(transformers, image_names.get("pil") or image_names["torchvision"])
    parts: dict[str, Any] = {"image_processor": image_class(**family.image_processor)}
    if "video_processor" in attributes:
        video_class = getattr(transformers, VIDEO_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"])
        parts["video_processor"] = video_class(**family.image_processor)
    processor = processor_class(tokenizer=tokenizer, chat_template=template, **parts, **family.processor)
    default = AutoConfig.for_model(model_type)
    ids = {k: tokenizer.convert_tokens_to_ids(v) if isinstance(v, str) and v in tokenizer.get_vocab() else v
           for k, v in family.config.items()}
    text = _shrunk(default.text_config, TEXT_SIZES, {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                                       "eos_token_id": tokenizer.eos_token_id,
                                                       "pad_token_id": tokenizer.pad_token_id, **family.text})
    vision = _shrunk(default.vision_config, VISION_SIZES, family.vision)
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model, processor


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    kind = sys.argv[2] if len(sys.argv) == 3 else "llava"
    build_tiny_family(kind, Path(sys.argv[1]))
    print(f"wrote a tiny {kind} and its processor to {sys.argv[1]}")
