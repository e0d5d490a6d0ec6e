"""Export a Llama-architecture model folder to a single GGUF file (llama.cpp, Ollama...).

Written with the ``gguf`` package's ``GGUFWriter``, following llama.cpp's
``convert_hf_to_gguf.py`` for the ``llama`` architecture: hyper-parameters under
``llama.*`` keys, the tokenizer as a GPT-2 style byte-level BPE vocabulary with merges,
and tensors under llama.cpp names. llama.cpp's rotary embedding pairs neighbouring
dimensions while Hugging Face pairs the two halves of each head, so q_proj and k_proj
rows are permuted on the way out (readers, transformers' included, undo it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError

QUANTS = ("f16", "q8_0", "f32")
_SUPPORTED = ("llama",)


def _permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout (halves) → llama.cpp layout (interleaved pairs), per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_config(config: Any, where: str) -> None:
    if config.model_type not in _SUPPORTED:
        raise LmforgeError(
            f"GGUF export supports Llama-architecture models, not '{config.model_type}'",
            where=where,
            fix="use llama.cpp's convert_hf_to_gguf.py on the merged model folder",
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise LmforgeError(
            f"rope scaling '{rope_type}' is not supported by lmforge's GGUF export yet",
            where=where,
            fix="use llama.cpp's convert_hf_to_gguf.py on the model folder",
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LmforgeError(
            "models with attention/MLP biases are not supported by lmforge's GGUF export",
            where=where,
            fix="use llama.cpp's convert_hf_to_gguf.py on the model folder",
        )


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer.

    llama.cpp picks its split regex by this name; these are the byte-level cases whose
    split is fully described by the tokenizer.json, everything else gets ``default``.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types[:1] == ["Split"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"):
            return "qwen2"
    return "default"


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None, where: str) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmforgeError("GGUF export needs a fast (tokenizer.json) tokenizer", where=where)
    data = json.loads(backend.to_str())
    model = data["model"]
    byte_level = any(
        p.get("type") == "ByteLevel"
        for p in [data.get("pre_tokenizer") or {}, *((data.get("pre_tokenizer") or {}).get("pretokenizers") or [])]
    )
    if model.get("type") != "BPE" or not byte_level:
        raise LmforgeError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style), not {model.get('type')}",
            where=where,
            fix="use llama.cpp's convert_hf_to_gguf.py for sentencepiece tokenizers",
        )
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(id_to_token) >= vocab_size:
        raise LmforgeError(
            f"the tokenizer has ids up to {max(id_to_token)} but the model only {vocab_size} embeddings",
            where=where,
            fix="resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)))",
        )
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:  # embeddings padded past the tokenizer (e.g. to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    # what the tokenizer does to plain text, so that llama.cpp tokenizes prompts the same way
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def export_gguf(
    model_dir: str,
    out_file: str | os.PathLike[str],
    quant: str = "f16",
    *,
    tokenizer_dir: str | None = None,
    tokenizer_pre: str | None = None,
) -> Path:
    """Write ``model_dir`` (a folder, ``.gguf`` or ``pkg://`` path) as one GGUF file.

    ``quant``: ``f16`` (weights in half precision, norms in f32), ``q8_0`` (8-bit blocks
    of 32 for every matrix whose rows divide into blocks, f16 otherwise) or ``f32``.
    ``tokenizer_pre`` overrides the llama.cpp pre-tokenizer name guessed from
    tokenizer.json (e.g. ``smollm``, ``llama-bpe``).
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmforge.models.load import local_model_dir

    if quant not in QUANTS:
        raise LmforgeError(f"unknown GGUF quantization '{quant}'", where="quant", fix=f"use one of {', '.join(QUANTS)}")
    source = local_model_dir(model_dir)
    config = AutoConfig.from_pretrained(source)
    _check_config(config, model_dir)
    try:
        # a tokenizer-only folder has no config.json, so local_model_dir would refuse it
        tok_source = source if tokenizer_dir is None else (
            tokenizer_dir if os.path.isdir(tokenizer_dir) else local_model_dir(tokenizer_dir)
        )
        tokenizer = AutoTokenizer.from_pretrained(tok_source)
    except (OSError, ValueError) as exc:
        raise LmforgeError(
            f"could not load the tokenizer: {str(exc).splitlines()[0]}", where=tokenizer_dir or model_dir,
            fix="save the tokenizer into the model folder or pass tokenizer_dir",
        ) from exc
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    state = model.state_dict()

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    vocab = model.get_input_embeddings().weight.shape[0]
    tied = bool(getattr(config, "tie_word_embeddings", False))

    tmp = out_file.with_name(out_file.name + ".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(str(getattr(config, "_name_or_path", "") or Path(source).name))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(n_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(vocab))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, vocab, tokenizer_pre, tokenizer_dir or model_dir)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by readers / shared with token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LmforgeError(f"no llama.cpp name for tensor '{hf_name}'", where=model_dir,
                               fix="this Llama variant is not supported by lmforge's GGUF export")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_qk(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_qk(data, n_kv)
        if data.ndim == 1 or quant == "f32":
            # norms stay f32: tiny, and llama.cpp expects them so
            writer.add_tensor(name, data.astype(np.float32))
        elif quant == "q8_0" and data.shape[-1] % block == 0:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_file)
    return out_file
