"""The devices the planner knows: memory, bf16 support and dense peak FLOP/s.

Memory is what the device reports as its total (nvidia-smi / rocm-smi), in GiB; FLOP/s are the
vendors' dense (no sparsity) tensor-core figures for bf16 (fp16 where bf16 is missing) and plain
fp32. This CPU's entry is measured (its best bf16/fp32 matmul rate), not looked up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from lmforge.errors import LmforgeError

GiB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    bf16: bool  # runs bf16 natively (bf16: auto turns on)
    peak_tflops_16: float  # dense bf16 (or fp16) tensor FLOP/s, in TFLOP/s
    peak_tflops_32: float  # dense fp32 FLOP/s (no TF32), in TFLOP/s
    kind: str = "cuda"  # "cuda", "rocm" or "cpu"
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def peak_flops(self, bf16: bool) -> float:
        return (self.peak_tflops_16 if bf16 else self.peak_tflops_32) * 1e12


GPUS: tuple[Device, ...] = (
    # Turing: no bf16, so `bf16: auto` trains in fp32 there (lmforge does not use fp16).
    Device("T4 16GB", 15.0, False, 65.0, 8.1, aliases=("t4",)),
    Device("RTX 3090 24GB", 24.0, True, 71.0, 35.6, aliases=("3090", "rtx3090")),
    Device("RTX 4090 24GB", 24.0, True, 165.2, 82.6, aliases=("4090", "rtx4090")),
    Device("A10 24GB", 22.5, True, 125.0, 31.2, aliases=("a10", "a10g")),
    Device("L4 24GB", 22.5, True, 121.0, 30.3, aliases=("l4",)),
    Device("RTX A6000 48GB", 48.0, True, 154.8, 38.7, aliases=("a6000", "rtxa6000")),
    Device("A100 40GB", 40.0, True, 312.0, 19.5, aliases=("a100-40gb", "a100_40gb", "a100-40")),
    Device("A100 80GB", 80.0, True, 312.0, 19.5, aliases=("a100", "a100-80gb", "a100_80gb", "a100-80")),
    Device("H100 80GB", 79.6, True, 989.0, 67.0, aliases=("h100", "h100-sxm", "h100-80gb")),
    Device("H200 141GB", 140.4, True, 989.0, 67.0, aliases=("h200",)),
    Device("MI300X 192GB", 192.0, True, 1307.4, 163.4, kind="rocm", aliases=("mi300x", "mi300")),
)


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def find_gpu(name: str) -> Device:
    """A GPU by name or alias (case and punctuation ignored): 'a100', 'A100 80GB', 'h100'..."""
    wanted = _key(name)
    for gpu in GPUS:
        if wanted in {_key(gpu.name), *(_key(a) for a in gpu.aliases)}:
            return gpu
    raise LmforgeError(f"unknown GPU '{name}'", where="--gpu", fix="one of: " + ", ".join(g.name for g in GPUS))


def cpu_device(ceiling_gflops: dict[str, float] | None = None) -> Device:
    """This machine's CPU: its RAM, bf16 support, and (when measured) its matmul ceiling."""
    from lmforge.device import cpu_supports_bf16

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError):
        memory = 0.0
    ceiling = ceiling_gflops or {}
    return Device(f"this CPU ({os.cpu_count()} cores)", round(memory, 1), cpu_supports_bf16(),
                  ceiling.get("bf16", 0.0) / 1000, ceiling.get("fp32", 0.0) / 1000, kind="cpu")


def with_memory(device: Device, memory_gib: float) -> Device:
    return replace(device, memory_gib=memory_gib)
