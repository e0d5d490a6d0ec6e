"""Build a tiny random-weight Mistral with a Mistral tokenizer file (``tekken.json``), offline, saved like a Hub model
(Devstral, Magistral, Ministral ship tekken.json beside their weights): ``python scripts/build_tiny_mistral.py OUT_DIR``.

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


def write_tekken(folder: Path, version: str = "v13") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tekken.json"
    path.write_text(json.dumps(tekken_data(version)), encoding="utf-8")
    return path


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
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/build_tiny_mistral.py OUT_DIR")
    build_tiny_mistral(Path(sys.argv[1]))
    print(f"wrote a tiny Mistral with tekken.json to {sys.argv[1]}")
