"""Build a tiny random-weight image-text model (LLaVA-shaped: a CLIP vision tower, a projector, a Llama) with its
processor, offline, saved like a Hub model: ``python scripts/build_tiny_vlm.py OUT_DIR``.

No pretrained image-text model can be downloaded on the machines lmforge is tested on, so its vision-language path
is tested on this one. It loads through ``AutoProcessor`` and ``AutoModelForImageTextToText`` like any Hub VLM, and
its chat template has ``{% generation %}`` blocks so transformers' own ``return_assistant_tokens_mask`` is the
independent reference lmforge's label mask is compared with.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def build_tokenizer():  # noqa: ANN201
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    words = sorted(set(WORDS) | {w.capitalize() for w in WORDS} | {"user", "assistant", "system"})
    vocab = {tok: i for i, tok in enumerate(specials + [str(d) for d in range(10)] + words + list("#:.,?!\n+-=()'"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", IMAGE_TOKEN])
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


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    build_tiny_vlm(Path(sys.argv[1]))
    print(f"wrote a tiny LLaVA and its processor to {sys.argv[1]}")
