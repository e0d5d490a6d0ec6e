"""Export a Llama-architecture model to a single GGUF file (llama.cpp, Ollama, LM Studio...).

Written with the ``gguf`` package's ``GGUFWriter``, following llama.cpp's
``convert_hf_to_gguf.py`` for the ``llama`` architecture: hyper-parameters under
``llama.*`` keys, the tokenizer as a GPT-2 style byte-level BPE vocabulary with merges,
and tensors under llama.cpp names. llama.cpp's rotary embedding pairs neighbouring
dimensions while Hugging Face pairs the two halves of each head, so q_proj and k_proj
rows are permuted on the way out (readers, transformers' included, undo it).

llama.cpp splits text before BPE with a regex it picks by the file's
``tokenizer.ggml.pre`` name and refuses names it does not know. The name is carried over
from a GGUF base model, or identified the way llama.cpp's converter does it (the hash of
the token ids of its check text, see :mod:`lmforge.export.llama_cpp_tables`); an
unknown tokenizer is refused rather than written with a guess.

After writing, :func:`check_fidelity` reads the file back with the gguf package and
compares its next-token distributions with the unquantized model's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.atomic import atomic_file
from lmforge.errors import LmforgeError
from lmforge.export.kquants import KQUANT_PRESETS
from lmforge.export.llama_cpp_tables import CHECK_TEXT, KNOWN_PRE_TOKENIZERS, LLAMA_CPP_COMMIT, PRE_TOKENIZER_HASHES

# The gguf package's own types, then llama.cpp's K-quant presets (lmforge.export.kquants).
LEGACY_QUANTS = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
QUANTS = (*LEGACY_QUANTS, *KQUANT_PRESETS)
_SUPPORTED = ("llama",)
_BLOCK_QUANTS = {"q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1", "q4_0": "Q4_0"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q5_1": "MOSTLY_Q5_1",
               "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0",
               **{name: ftype for name, (ftype, _) in KQUANT_PRESETS.items()}}


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout (halves) → llama.cpp layout (interleaved pairs), per head."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise LmforgeError(f"unknown GGUF quantization '{quant}'", where="--quant", fix=f"use one of {', '.join(QUANTS)}")


def _quantized(data: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``data`` in GGML type ``kind`` as the file's raw bytes (K-quants by lmforge's port of ggml's);
    ``importance``: the tensor's imatrix entry, used as ggml's quantizers use it (Q8_0 ignores it, as in ggml)."""
    import gguf

    from lmforge.export.kquants import quantize_k, quantize_legacy_weighted

    if kind.endswith("_K"):
        return quantize_k(data, kind, importance)
    if importance is not None and kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return quantize_legacy_weighted(data, kind, importance)
    return gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, kind))


def check_llama_config(config: Any, where: str) -> None:
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


def read_gguf_metadata(path: str | os.PathLike[str], key: str) -> Any:
    """One metadata value of a GGUF file (``None`` when absent), read with the gguf package."""
    import gguf

    field = gguf.GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """llama.cpp converter's fingerprint of a tokenizer: sha256 of the ids of its check text."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_for(tokenizer: Any, *, base_model: str | None = None, override: str | None = None) -> str:
    """The ``tokenizer.ggml.pre`` name to write: ``override``, the base GGUF's, or identified by hash.

    Raises LmforgeError when ``override`` is not a name llama.cpp knows, or when the
    tokenizer's hash is not one llama.cpp's converter knows (llama.cpp would refuse the
    file, or split text differently from training).
    """
    from lmforge.models.load import resolve_model_path

    listed = "lmforge/export/llama_cpp_tables.py lists them"
    # the only kind of tokenizer lmforge writes, and the one that needs a pre-tokenizer name
    _byte_level_bpe(tokenizer, f"base_model: {base_model}" if base_model else "tokenizer")
    if override:
        if override not in KNOWN_PRE_TOKENIZERS:
            raise LmforgeError(
                f"'{override}' is not a pre-tokenizer llama.cpp knows (as of llama.cpp {LLAMA_CPP_COMMIT})",
                where="--tokenizer_pre",
                fix=f"use one of llama.cpp's names, e.g. llama-bpe, qwen2, smollm, gpt-2 ({listed})",
            )
        return override
    if base_model:
        path = resolve_model_path(base_model)
        if path.endswith(".gguf") and os.path.isfile(path):
            carried = read_gguf_metadata(path, "tokenizer.ggml.pre")
            if carried:
                return str(carried)
    digest = pre_tokenizer_hash(tokenizer)
    name = PRE_TOKENIZER_HASHES.get(digest)
    if name in KNOWN_PRE_TOKENIZERS:
        return name
    raise LmforgeError(
        f"llama.cpp does not know this tokenizer's pre-tokenizer (its check-text hash is {digest},"
        f" not in llama.cpp {LLAMA_CPP_COMMIT}'s convert_hf_to_gguf.py); llama.cpp would split text"
        " differently from training or refuse the file",
        where=f"base_model: {base_model}" if base_model else "tokenizer",
        fix="if the tokenizer comes from a known model family, pass --tokenizer_pre NAME with llama.cpp's name"
        f" for it (e.g. llama-bpe for Llama 3, qwen2, smollm, gpt-2; {listed}); otherwise convert the merged"
        " model (export --keep_merged) with llama.cpp's convert_hf_to_gguf.py after adding the tokenizer there",
    )


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``...)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    marker = "lmforge end-of-turn probe"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates may reject this conversation (a required system turn...): no EOT then
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    ids = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False).input_ids
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    return int(ids[0]) if ids and ids[0] in special else None


def _byte_level_bpe(tokenizer: Any, where: str) -> dict[str, Any]:
    """The tokenizer.json of a byte-level BPE tokenizer (the kind lmforge writes); refuses others."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmforgeError("GGUF export needs a fast (tokenizer.json) tokenizer", where=where)
    data = json.loads(backend.to_str())
    pre = data.get("pre_tokenizer") or {}
    byte_level = any(p.get("type") == "ByteLevel" for p in [pre, *(pre.get("pretokenizers") or [])])
    if data["model"].get("type") != "BPE" or not byte_level:
        raise LmforgeError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style), not {data['model'].get('type')}",
            where=where,
            fix="use llama.cpp's convert_hf_to_gguf.py for sentencepiece tokenizers",
        )
    return data


@dataclass
class ChatFormat:
    """The prompt format the model was trained with, as llama.cpp reads it from the file."""

    template: str  # Jinja, rendered by llama.cpp's chat completion when the caller passes none
    end_of_turn_id: int | None  # where an answer stops, when that is not EOS


def instruction_template(prompt_for: Any, bos_token: str | None = None) -> str:
    """A Jinja chat template equivalent to an instruction format (alpaca, a user-defined one).

    ``prompt_for(text)`` is the prompt lmforge's inference builds for one user message; such
    formats train single exchanges, so the template wraps the latest user message alone, as
    lmforge's chat does.
    """
    marker = "\x00lmforge-message\x00"
    prompt = prompt_for(marker)
    prefix, suffix = prompt.split(marker)
    head = ""
    if bos_token and prefix.startswith(bos_token):
        prefix, head = prefix[len(bos_token):], "{{ bos_token }}"
    return (
        "{%- set ns = namespace(last='') -%}"
        "{%- for message in messages if message['role'] == 'user' -%}{%- set ns.last = message['content'] -%}{%- endfor -%}"
        f"{head}{{{{ {json.dumps(prefix)} }}}}{{{{ ns.last }}}}{{{{ {json.dumps(suffix)} }}}}"
    )


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str, where: str,
                   chat: ChatFormat | None = None) -> None:
    import gguf

    backend = tokenizer.backend_tokenizer
    model = _byte_level_bpe(tokenizer, where)["model"]
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
    writer.add_tokenizer_pre(pre)
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
    eot = chat.end_of_turn_id if chat is not None else _end_of_turn_id(tokenizer)
    if eot is not None and eot != tokenizer.eos_token_id:
        # llama.cpp stops at EOS or this; without it a chat answer runs on past the turn
        writer.add_eot_token_id(eot)
    # what the tokenizer does to plain text, so that llama.cpp tokenizes prompts the same way
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    template = chat.template if chat is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)




def _tensor_type(quant: str, name: str, data: np.ndarray, output_role: bool) -> str:
    """The GGML type one tensor is written in for file type ``quant``."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        return "F32"  # norms stay f32: tiny, and llama.cpp expects them so
    if quant == "f16":
        return "F16"
    wanted = _BLOCK_QUANTS[quant]
    if quant != "q8_0" and output_role:
        # The matrix that produces the logits is the most sensitive to rounding: llama.cpp's
        # quantizer keeps it at q6_K for q4/q5 files; the gguf package cannot write k-quants,
        # q8_0 is the nearest it can.
        wanted = "Q8_0"
    block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, wanted)][0]
    return wanted if data.shape[-1] % block == 0 else "F16"



def write_gguf_file(out_file: Path, fill: Callable[[Any], None], arch: str = "llama") -> Path:
    """A GGUF file written whole or not at all (through lmforge.atomic): `fill(writer)` adds the metadata and
    tensors to a gguf.GGUFWriter; a failure, a full disk included, leaves no file behind."""
    import gguf

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return atomic_file(out_file, write)


def write_gguf(
    model: Any,
    tokenizer: Any,
    out_file: str | os.PathLike[str],
    quant: str = "f16",
    *,
    tokenizer_pre: str,
    name: str | None = None,
    where: str = "model",
    chat: ChatFormat | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write an in-memory Llama model and its tokenizer as one GGUF file (atomically).

    ``quant``: ``f32``; ``f16`` (matrices in half precision, norms in f32); ``q8_0``,
    ``q5_1``, ``q5_0``, ``q4_1`` or ``q4_0`` (llama.cpp's blocks of 32 for every matrix whose
    rows divide into blocks, f16 otherwise; under q4/q5 the logits matrix is q8_0); or a
    K-quant preset (``q4_k_m``...: each matrix in the type llama.cpp's quantizer picks for
    it, see :func:`lmforge.export.kquants.tensor_types`).
    ``tokenizer_pre``: llama.cpp's pre-tokenizer name (see :func:`pre_tokenizer_for`).
    ``chat``: the trained prompt format to write (default: the tokenizer's chat template).
    ``imatrix``: GGUF tensor name -> per-column importance (:mod:`lmforge.export.imatrix`), K-quant presets only.
    """
    import gguf

    check_quant(quant)
    if imatrix is not None and quant not in KQUANT_PRESETS:
        raise LmforgeError(f"--imatrix applies to the K-quant presets, not {quant}", where="--imatrix",
                           fix=f"use it with one of {', '.join(KQUANT_PRESETS)}, or drop --imatrix")
    config = model.config
    check_llama_config(config, where)
    state = model.state_dict()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    vocab = model.get_input_embeddings().weight.shape[0]
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or out_file.stem))
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
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quant]))
        if quant in _BLOCK_QUANTS or quant in KQUANT_PRESETS:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, vocab, tokenizer_pre, where, chat)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
        tensors: list[tuple[str, str, Any]] = []
        for hf_name, tensor in state.items():
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue  # recomputed by readers / shared with token_embd
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise LmforgeError(f"no llama.cpp name for tensor '{hf_name}'", where=where,
                                   fix="this Llama variant is not supported by lmforge's GGUF export")
            tensors.append((hf_name, gguf_name, tensor))
        mix: dict[str, str] = {}
        if quant in KQUANT_PRESETS:
            from lmforge.export.kquants import tensor_types

            # llama.cpp counts attn_v / ffn_down tensors in file order: the order written below
            mix = tensor_types(quant, [(g, tuple(t.shape)) for _, g, t in tensors], n_layers, n_head // n_kv)
        for hf_name, gguf_name, tensor in tensors:
            data = tensor.detach().float().numpy()
            if hf_name.endswith("q_proj.weight"):
                data = permute_qk(data, n_head)
            elif hf_name.endswith("k_proj.weight"):
                data = permute_qk(data, n_kv)
            output_role = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
            kind = mix.get(gguf_name, "F32") if quant in KQUANT_PRESETS else _tensor_type(quant, gguf_name, data, output_role)
            if kind == "F32":
                writer.add_tensor(gguf_name, data.astype(np.float32))
            elif kind == "F16":
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                qtype = getattr(gguf.GGMLQuantizationType, kind)
                importance = None if imatrix is None else imatrix.get(gguf_name)
                if importance is not None and importance.size != data.shape[-1]:
                    raise LmforgeError(f"the importance matrix has {importance.size} values for {gguf_name},"
                                       f" whose rows are {data.shape[-1]} wide", where="--imatrix",
                                       fix="use an imatrix computed for this model (e.g. let lmforge compute one)")
                writer.add_tensor(gguf_name, _quantized(data, kind, importance), raw_dtype=qtype)

    return write_gguf_file(out_file, fill)


# Largest mean KL(unquantized || file) per token and smallest top-1 agreement that still
# pass: they tell a file that is broken (wrong layout or tensor: KL of several nats, top-1
# near chance) from one that is only as lossy as its type. Measured on SmolLM2-135M-Instruct,
# whose weights are themselves de-quantized q4_1 (so q4_1 comes back exactly): f16 KL 3e-6,
# top-1 100%; q8_0 0.003, 99%; q5_0 0.16, 86%; q5_1 0.23, 77%; q4_0 0.66, 62%; K-quant presets
# (most of its 576-wide rows take llama.cpp's 32-wide fallbacks): q6_k 0.016, 94%; q5_k_m 0.13, 85%;
# q5_k_s 0.17, 78%; q4_k_m 0.097, 87%; q4_k_s 0.12, 89%; q3_k_l 0.27, 73%; q3_k_m 0.25, 73%;
# q2_k 0.66, 64%. Small models lose much more to 4- and 5-bit types than large ones; the
# printed numbers say how much.
FIDELITY_LIMITS: dict[str, tuple[float, float]] = {
    "f32": (1e-4, 0.99), "f16": (1e-3, 0.97), "q8_0": (0.05, 0.85),
    "q5_1": (0.5, 0.6), "q5_0": (0.5, 0.6), "q4_1": (1.0, 0.5), "q4_0": (1.0, 0.5),
    "q6_k": (0.1, 0.85), "q5_k_m": (0.5, 0.6), "q5_k_s": (0.5, 0.6), "q4_k_m": (1.0, 0.5), "q4_k_s": (1.0, 0.5),
    "q3_k_l": (1.5, 0.45), "q3_k_m": (1.5, 0.45), "q3_k_s": (2.0, 0.4), "q2_k": (3.0, 0.3),
}
FIDELITY_PROMPTS = (
    "The capital of France is Paris. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
)


@dataclass
class Fidelity:
    """How closely the written file's next-token distributions follow the unquantized model's."""

    quant: str
    prompts: int
    positions: int
    mean_kl: float  # KL(unquantized || file) per position, averaged
    max_kl: float
    top1: float  # share of positions where both pick the same next token
    max_mean_kl: float
    min_top1: float

    @property
    def ok(self) -> bool:
        return self.mean_kl <= self.max_mean_kl and self.top1 >= self.min_top1

    def summary(self) -> str:
        return (
            f"fidelity vs the unquantized model on {self.prompts} prompts ({self.positions} tokens):"
            f" mean KL {self.mean_kl:.2g} (max {self.max_kl:.2g}), top-1 agreement {self.top1:.1%}"
            f" (limits for {self.quant}: mean KL <= {self.max_mean_kl:g}, top-1 >= {self.min_top1:.0%})"
        )


def _fidelity_prompts(tokenizer: Any) -> list[list[int]]:
    texts = list(FIDELITY_PROMPTS)
    prompts = [tokenizer(t).input_ids for t in texts]
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        try:
            chat = tokenizer.apply_chat_template(
                [{"role": "user", "content": "What is 7 times 8?"}, {"role": "assistant", "content": "7 times 8 is 56."}],
                tokenize=False,
            )
            prompts.append(tokenizer(chat, add_special_tokens=False).input_ids)
        except Exception:  # a template that rejects this conversation: the plain prompts suffice
            pass
    return [p for p in prompts if p]


def _unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_weights(gguf_file: str | os.PathLike[str], like: Any) -> Any:
    """A copy of ``like`` (the model the file was written from) holding the file's de-quantized weights.

    Reads with the gguf package; the hyper-parameters that shape the weights are checked
    against ``like``'s config, every tensor must map to one of ``like``'s weights and every
    weight must come from the file. (transformers' own GGUF reader, used by the tests,
    checks the rest of the metadata, but it parses the file twice and takes minutes on a
    busy 2-core machine.)
    """
    import copy

    import gguf

    config, where = like.config, str(gguf_file)
    reader = gguf.GGUFReader(gguf_file)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    expected = {"general.architecture": "llama", "llama.block_count": n_layers,
                "llama.embedding_length": config.hidden_size, "llama.attention.head_count": n_head,
                "llama.attention.head_count_kv": n_kv}
    for key, want in expected.items():
        field = reader.get_field(key)
        got = None if field is None else field.contents()
        if got != want:
            raise LmforgeError(f"the written GGUF file says {key} = {got}, the model has {want}", where=where,
                               fix="this is an lmforge bug; please report it with the model's config.json")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    model = copy.deepcopy(like)
    params = dict(model.named_parameters())
    to_hf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in params}
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            raise LmforgeError(f"the written GGUF file has an unexpected tensor '{tensor.name}'", where=where,
                               fix="this is an lmforge bug; please report it with the model's config.json")
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        data = data.reshape(params[hf_name].shape)
        if hf_name.endswith("q_proj.weight"):
            data = _unpermute_qk(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _unpermute_qk(data, n_kv)
        state[hf_name] = torch.from_numpy(data)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in params if k not in state and not (tied and k == "lm_head.weight")]
    if missing:
        raise LmforgeError(f"the written GGUF file lacks {len(missing)} weights, e.g. {missing[0]}", where=where,
                           fix="this is an lmforge bug; please report it with the model's config.json")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return model.float().eval()


def check_fidelity(reference: Any, tokenizer: Any, gguf_file: str | os.PathLike[str], quant: str) -> Fidelity:
    """Read ``gguf_file`` back and compare its next-token distributions with ``reference`` on a few prompts."""
    readback = read_gguf_weights(gguf_file, reference)
    was_training = reference.training
    reference.eval()
    kls, agree = [], []
    with torch.no_grad():
        for ids in _fidelity_prompts(tokenizer):
            x = torch.tensor([ids])
            ref = reference(input_ids=x).logits.float().log_softmax(-1)[0]
            got = readback(input_ids=x).logits.float().log_softmax(-1)[0]
            kls.append((ref.exp() * (ref - got)).sum(-1))
            agree.append(ref.argmax(-1) == got.argmax(-1))
    reference.train(was_training)
    del readback
    kl, top1 = torch.cat(kls), torch.cat(agree).float()
    max_mean_kl, min_top1 = FIDELITY_LIMITS[quant]
    return Fidelity(quant=quant, prompts=len(kls), positions=int(kl.numel()), mean_kl=float(kl.mean()),
                    max_kl=float(kl.max()), top1=float(top1.mean()), max_mean_kl=max_mean_kl, min_top1=min_top1)
