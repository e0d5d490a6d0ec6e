"""Importance matrices in llama.cpp's format: read one, or compute one from the training data in torch.

An importance matrix ("imatrix") holds, for every weight matrix, the mean square of each input
column's activation over some text: how much an error in that column of the weight moves the
output. llama.cpp's ``llama-imatrix`` computes it by running the GGUF model over a text file,
and ``llama-quantize --imatrix`` hands it to ggml's quantizers as ``quant_weights`` (see
:mod:`lmforge.export.kquants`). lmforge computes the same sums with forward hooks on the
(merged) model in torch, over the config's own training examples, and writes them in
llama.cpp's GGUF imatrix layout (``<tensor>.in_sum2`` / ``<tensor>.counts``, ``imatrix.*``
keys, as ``tools/imatrix/imatrix.cpp`` of llama.cpp 0c1e57098 writes them), so the file also
works with ``llama-quantize --imatrix``. Reading takes that layout or the older ``.dat`` one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError


def read_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> per-column importance (mean squared activation), as llama-quantize loads it."""
    path = Path(path)
    where = f"--imatrix {path}"
    try:
        head = path.open("rb").read(4)
    except OSError as exc:
        raise LmforgeError(f"cannot read the importance matrix: {exc.strerror}", where=where,
                           fix="pass an imatrix file written by llama-imatrix or lmforge") from None
    try:
        entries = _read_gguf(path) if head == b"GGUF" else _read_legacy(path)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
        reason = str(exc) if type(exc) is ValueError else "it ends before its entries do"
        raise LmforgeError(f"not an importance matrix in llama.cpp's format ({reason})", where=where,
                           fix="pass a file written by llama-imatrix (.gguf or .dat) or by lmforge export --imatrix")
    if not entries:
        raise LmforgeError("the importance matrix has no entries", where=where, fix="compute it again on more text")
    for name, values in entries.items():
        if not np.all(np.isfinite(values)):
            raise LmforgeError(f"the importance matrix has non-finite values for {name}", where=where,
                               fix="compute it again (llama.cpp refuses such a file too)")
    return entries


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name[: -len(".in_sum2")]] = values
        elif tensor.name.endswith(".counts"):
            counts[tensor.name[: -len(".counts")]] = values
    if set(sums) != set(counts):
        raise ValueError(f"sums without counts for {sorted(set(sums) ^ set(counts))[:3]}")
    if not reader.get_field("imatrix.chunk_count") or not reader.get_field("imatrix.chunk_size"):
        raise ValueError("the imatrix.chunk_count / imatrix.chunk_size keys are missing")
    out = {}
    for name, total in sums.items():
        # per expert (one row of counts each): sum / count, or 1 where nothing was seen, as llama-quantize does
        count = np.rint(counts[name]).astype(np.float32)
        rows = total.reshape(len(count), -1)
        mean = np.where(count[:, None] > 0, rows / np.where(count > 0, count, 1)[:, None], np.float32(1))
        out[name] = mean.astype(np.float32).reshape(-1)
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    """llama.cpp's original .dat layout: int32 entries; per entry: name, ncall, nval, nval float32 (sum / count * ncall)."""
    data = path.read_bytes()
    (n_entries,), pos = struct.unpack_from("<i", data), 4
    if n_entries < 1:
        raise ValueError("no entries")
    out = {}
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4: pos + 4 + length].decode()
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"bad value count for {name}")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = values / np.float32(ncall) if ncall > 0 else values
    return out


def write_imatrix(path: str | os.PathLike[str], sums: dict[str, np.ndarray], counts: dict[str, int],
                  datasets: list[str], chunk_count: int, chunk_size: int) -> Path:
    """Write sums of squared activations and token counts in llama.cpp's GGUF imatrix layout (atomically)."""
    from lmforge.export.gguf import write_gguf_file

    def fill(writer: Any) -> None:
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", list(datasets))
        writer.add_uint32("imatrix.chunk_count", int(chunk_count))
        writer.add_uint32("imatrix.chunk_size", int(chunk_size))
        for name in sorted(sums):  # llama-imatrix sorts too
            writer.add_tensor(f"{name}.in_sum2", np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
            writer.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))

    return write_gguf_file(Path(path), fill, arch="imatrix")


def compute_imatrix(model: Any, chunks: Iterable[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sums of squared inputs per column (float64) and token counts for every linear layer of the
    transformer blocks, under llama.cpp's tensor names, from running ``model`` over ``chunks`` of token ids.

    Like llama-imatrix's defaults: the blocks' matrices only (not the output layer), every token of
    every chunk counted.
    """
    import gguf
    import torch

    n_layers = model.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def collect(name: str) -> Any:
        def hook(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if gguf_name and gguf_name.startswith("blk."):
            hooks.append(module.register_forward_pre_hook(collect(gguf_name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in chunks:
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return {name: total.numpy() for name, total in sums.items()}, counts


def training_chunks(cfg: Any, tokenizer: Any, n_chunks: int) -> tuple[list[list[int]], int]:
    """Up to ``n_chunks`` windows of ``sequence_len`` tokens from the config's training examples, in order
    (the text the model was trained on, as llama-imatrix reads a text file in n_ctx windows); and the window size."""
    from lmforge.data.prepare import prepare

    prepared = prepare(cfg.data, tokenizer, cfg.training.seed, save=False)
    size = int(cfg.data.sequence_len)
    stream: list[int] = []
    for example in prepared.train:
        stream.extend(example.input_ids)
        if len(stream) >= size * n_chunks:
            break
    windows = [stream[i:i + size] for i in range(0, min(len(stream), size * n_chunks), size)]
    return [w for w in windows if len(w) >= 16], size  # llama-imatrix skips batches under 16 tokens
