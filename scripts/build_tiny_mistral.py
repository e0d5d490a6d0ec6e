"""Build a tiny random-weight Mistral with a Mistral tokenizer file (``tekken.json``), offline, saved like a Hub model
(Devstral, Magistral, Ministral ship tekken.json beside their weights): ``python scripts/build_tiny_mistral.py OUT_DIR``;
``... OUT_DIR vision`` builds the image-text Mistral 3 instead.

No Mistral model can be downloaded on the machines lmforge is tested on, so ``tokenizer_use_mistral_common`` is tested
on this one. The tokenizer is mistral-common's Tekken format (``mistral_common/tokens/tokenizers/tekken.py``): a
byte-level BPE read by tiktoken, with the control tokens below the vocabulary. Here the vocabulary is the 256 bytes and
a few merges of common English pairs, under the control tokens of a v13 tokenizer ([INST], [/INST], [SYSTEM_PROMPT],
[THINK], ...), so mistral-common encodes conversations with it exactly as it does with a real one. The file is ~20 KB.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

# The control tokens of a v13 Tekken file, in their ranks (the rest up to NUM_SPECIAL are <SPECIAL_n> fillers).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                  "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]", "[THINK]",
                  "[/THINK]")
NUM_SPECIAL = 32
# Tekken's pre-tokenizer pattern (the one Mistral's files carry).
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Merges, in rank order after the 256 bytes: each is two tokens already in the vocabulary.
MERGES = ("th", "he", "in", "er", "an", " t", " a", "re", "on", "at", "en", "nd", "is", "ou", " s", " w", "or", "it",
          " th", " the", "ed", "es", "ing", " i", " o", " b", "ar", "le", "st", " c", " f", " m", " p", " d")


def tekken_data(version: str = "v13") -> dict[str, Any]:
    """The JSON of a tiny Tekken tokenizer file."""
    pieces = [bytes([b]) for b in range(256)]
    for merge in MERGES:
        piece = merge.encode()
        if piece not in pieces:
            pieces.append(piece)
    vocab = [{"rank": rank, "token_bytes": base64.b64encode(piece).decode(), "token_str": piece.decode("utf-8", "replace")}
             for rank, piece in enumerate(pieces)]
    return {
        "config": {"pattern": PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": len(vocab) + NUM_SPECIAL,
                   "default_num_special_tokens": NUM_SPECIAL, "version": version},
        "vocab": vocab,
        "special_tokens": [{"rank": rank, "token_str": token, "is_control": True} for rank, token in enumerate(SPECIAL_TOKENS)],
        "version": 1,
        "type": "Tekken",
    }


# mistral-common's image settings for the image-text model below: 8-pixel patches merged 2x2 (Pixtral's layout),
# images scaled to at most 32 pixels a side, so an image is at most 2x2 [IMG] tokens with [IMG_BREAK]/[IMG_END].
IMAGE = {"image_patch_size": 8, "max_image_size": 32, "spatial_merge_size": 2}
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("[IMG]")


def write_tekken(folder: Path, version: str = "v13", image: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = tekken_data(version)
    if image is not None:
        data["image"] = image
    path = folder / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def build_tiny_mistral3(folder: Path, seed: int = 0) -> Any:
    """tekken.json with image settings and a tiny random Mistral3ForConditionalGeneration (a 1-layer Pixtral vision
    tower, the patch-merging projector, a 2-layer Mistral): Mistral Small 3.1 / Magistral Small 2509 / Ministral 3's
    architecture. Its images are encoded by mistral-common's image encoder (which needs opencv), no HF processor."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    folder = Path(folder)
    data = json.loads(write_tekken(folder, image=IMAGE).read_text(encoding="utf-8"))
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=8,
                                 patch_size=IMAGE["image_patch_size"], image_size=IMAGE["max_image_size"])
    text = MistralConfig(vocab_size=data["config"]["default_vocab_size"], hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=11)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                            spatial_merge_size=IMAGE["spatial_merge_size"], vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def build_tiny_mistral(folder: Path, seed: int = 0, **overrides: Any) -> Any:
    """tekken.json and a 2-layer random MistralForCausalLM whose embeddings cover its vocabulary, in `folder`."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder = Path(folder)
    data = json.loads(write_tekken(folder).read_text(encoding="utf-8"))
    fields: dict[str, Any] = dict(vocab_size=data["config"]["default_vocab_size"], hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=11, sliding_window=None)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**fields))
    model.save_pretrained(folder, safe_serialization=True)
    return model


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["vision"]):
        raise SystemExit("usage: python scripts/build_tiny_mistral.py OUT_DIR [vision]")
    if sys.argv[2:] == ["vision"]:
        build_tiny_mistral3(Path(sys.argv[1]))
    else:
        build_tiny_mistral(Path(sys.argv[1]))
    print(f"wrote a tiny {'Mistral 3 (image-text)' if sys.argv[2:] else 'Mistral'} with tekken.json to {sys.argv[1]}")
