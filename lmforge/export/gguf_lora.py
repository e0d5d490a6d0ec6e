"""Write a LoRA adapter as a llama.cpp LoRA-adapter GGUF (``--lora`` / ``lora_path`` at run time).

The layout is what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp``
checks: ``general.architecture`` of the base, ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and for every adapted matrix two tensors
named after the base GGUF's tensor plus ``.lora_a`` (r x in) and ``.lora_b`` (out x r).
llama.cpp scales ``B @ A`` by ``alpha / r`` (r read from the tensor), as PEFT does; for
rsLoRA (``alpha / sqrt(r)``) the alpha written is ``alpha * sqrt(r)``. The rotary row
permutation lmforge applies to q/k matrices applies to ``lora_b``'s rows too, so the adapter
fits lmforge's own GGUF export and llama.cpp's converter's alike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.export.gguf import check_llama_config, permute_qk, write_gguf_file

_PREFIX = "base_model.model."


def write_gguf_lora(base_model: str, adapter_dir: str, out_file: str | os.PathLike[str], quant: str = "f16") -> Path:
    """Write ``adapter_dir`` (a PEFT LoRA trained on ``base_model``) as a llama.cpp adapter GGUF.

    ``quant``: ``f16`` (as llama.cpp's converter) or ``f32``. Refuses, before writing, an
    adapter trained on another base and what llama.cpp's LoRA format cannot hold (DoRA,
    per-module alpha, full copies of modules, embedding or tied-head adapters).
    """
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from lmforge.models.load import local_model_dir
    from lmforge.models.adapters import check_adapter, read_adapter_config

    where = str(adapter_dir)
    if quant not in ("f16", "f32"):
        raise LmforgeError(f"a GGUF LoRA adapter is written in f16 or f32, not {quant}", where="--quant",
                           fix="use --quant f16 (llama.cpp applies the adapter to a quantized base as well)")
    check_adapter(base_model, adapter_dir)  # the one-line refusal of an adapter on a base it was not trained on
    config = AutoConfig.from_pretrained(local_model_dir(base_model))
    check_llama_config(config, f"base_model: {base_model}")
    lora = read_adapter_config(adapter_dir)
    unsupported = [key for key in ("use_dora", "modules_to_save", "alpha_pattern", "rank_pattern") if lora.get(key)]
    if unsupported:
        raise LmforgeError(f"llama.cpp's LoRA GGUF cannot hold this adapter's {', '.join(unsupported)}", where=where,
                           fix="export the merged model instead: lmforge export CONFIG --format gguf")
    r, alpha = int(lora["r"]), float(lora["lora_alpha"])
    if lora.get("use_rslora"):
        alpha *= math.sqrt(r)  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)

    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        key = key.removeprefix(_PREFIX)
        for marker, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if key.endswith(marker):
                module = key[: -len(marker)]
                break
        else:
            raise LmforgeError(f"llama.cpp's LoRA GGUF cannot hold the adapter weight '{key}'", where=where,
                               fix="export the merged model instead: lmforge export CONFIG --format gguf")
        if tied and module == "lm_head":
            raise LmforgeError("the adapter changes lm_head, which this base shares with its embeddings; llama.cpp"
                               " ignores such an adapter", where=where,
                               fix="export the merged model instead: lmforge export CONFIG --format gguf")
        pairs.setdefault(module, {})[part] = value.astype(np.float32)

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if quant == "f16" else np.float32

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.ALL_F32)
        for module, part in pairs.items():
            gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if gguf_name is None or set(part) != {"a", "b"}:
                raise LmforgeError(f"no llama.cpp tensor for the adapted module '{module}'", where=where,
                                   fix="export the merged model instead: lmforge export CONFIG --format gguf")
            lora_b = part["b"]
            if module.endswith("q_proj"):
                lora_b = permute_qk(lora_b, n_head)  # the base's rows are permuted so, hence B @ A's
            elif module.endswith("k_proj"):
                lora_b = permute_qk(lora_b, n_kv)
            writer.add_tensor(gguf_name + ".lora_a", part["a"].astype(dtype))
            writer.add_tensor(gguf_name + ".lora_b", np.ascontiguousarray(lora_b).astype(dtype))

    return write_gguf_file(out_file, fill)


def read_gguf_lora(path: str | os.PathLike[str]) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {base GGUF tensor name: (lora_a, lora_b)}) of a LoRA-adapter GGUF, read with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(path)
    alpha = float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
    found: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        base, part = tensor.name.rsplit(".", 1)
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        found.setdefault(base, {})[part] = data.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    return alpha, {k: (v["lora_a"], v["lora_b"]) for k, v in found.items()}
