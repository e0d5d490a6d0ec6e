"""Bench: are lmforge's quantized GGUF tensors byte-identical to ggml's own C quantizers?

Links ggml's ``ggml-quants.c.o`` (as compiled by the llama-cpp-python build in
``bench/llama_cpp_check.py --build-only``; pass its path) into a small shared library, then for
each tensor of an lmforge GGUF export re-quantizes the same fp32 weights (from an lmforge f32
export of the same model) with ggml's ``quantize_row_<type>_ref`` and compares the bytes. This
checks every kernel lmforge uses (its numpy K-quant port and the gguf package's legacy types),
not llama.cpp's per-tensor type choice (``llama_cpp_check.py --identity`` checks that, through
``llama_model_quantize``, once llama.cpp is built).

    python bench/ggml_kernel_identity.py OBJ.o F32.gguf QUANTIZED.gguf [...]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

import numpy as np

STUBS = r"""
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char*f,int l,const char*fmt,...){abort();}
size_t ggml_row_size(int t,long n){abort();}
const char* ggml_type_name(int t){return "?";}
size_t ggml_type_size(int t){abort();}
"""


def load_ggml(obj: Path) -> ctypes.CDLL:
    """ggml-quants.c.o as a shared library; the few ggml symbols it needs outside quantizing are stubs."""
    folder = Path(tempfile.mkdtemp())
    (folder / "stubs.c").write_text(STUBS)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", folder / "libq.so", obj, folder / "stubs.c", "-lgomp", "-lm"],
                   check=True)
    return ctypes.CDLL(str(folder / "libq.so"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("obj", type=Path, help="ggml-quants.c.o from a llama-cpp-python build tree")
    ap.add_argument("f32", type=Path, help="lmforge's f32 GGUF export of the model (the source weights)")
    ap.add_argument("quantized", type=Path, nargs="+", help="lmforge GGUF exports of the same model to compare")
    args = ap.parse_args()
    for path in (args.obj, args.f32, *args.quantized):
        if not path.is_file():
            ap.error(f"{path} is not a file")
    import gguf

    lib = load_ggml(args.obj)
    source = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(args.f32).tensors}
    print("| file | tensors byte-identical to ggml's quantize_row_*_ref, per type |\n|---|---|")
    for path in args.quantized:
        per_type: dict[str, list[int]] = {}
        for tensor in gguf.GGUFReader(path).tensors:
            kind = tensor.tensor_type.name
            counts = per_type.setdefault(kind, [0, 0])
            counts[1] += 1
            if kind in ("F32", "F16"):
                counts[0] += int(np.array_equal(np.asarray(tensor.data), source[tensor.name].astype(
                    np.float32 if kind == "F32" else np.float16)))
                continue
            x = np.ascontiguousarray(source[tensor.name])
            block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
            out = np.zeros(x.size // block * size, np.uint8)
            getattr(lib, f"quantize_row_{kind.lower().replace('_k', '_K')}_ref")(
                x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
            counts[0] += int(np.array_equal(np.asarray(tensor.data).view(np.uint8).reshape(-1), out))
        same, total = sum(c[0] for c in per_type.values()), sum(c[1] for c in per_type.values())
        kinds = ", ".join(f"{k} {c[0]}/{c[1]}" for k, c in sorted(per_type.items()))
        print(f"| {Path(path).name} | {same}/{total} ({kinds}) |", flush=True)


if __name__ == "__main__":
    main()
