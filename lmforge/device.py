"""Device and memory facts training, inference and the planner share: which device, whether bf16 runs fast there,
peak memory, TF32, handing freed memory back. Below train and plan, so both read the same answers."""

from __future__ import annotations

import resource

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 dot products (AVX512-BF16 or AMX): there bf16 matmuls are ~4x fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_supports_bf16(device: torch.device | int | None = None) -> bool:
    """True where the GPU has bf16 tensor cores: compute capability 8.0 or newer (A100, RTX 30xx, H100, ...).

    torch.cuda.is_bf16_supported() also says True where bf16 is only emulated (V100 is 7.0, T4 7.5):
    there it runs far slower than fp32, so `bf16: auto` must not pick it. ROCm GPUs that run torch
    support bf16 (torch says so for all of them).
    """
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """`bf16: auto` → on where the hardware runs it fast."""
    if setting == "auto":
        if device.type == "cuda":
            return cuda_supports_bf16(device)
        return cpu_supports_bf16()
    return bool(setting)


def set_tf32(enabled: bool) -> None:
    """CUDA matmuls and cuDNN convolutions in TF32 (tf32: true) or full fp32 (tf32: false)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def release_free_memory() -> None:
    """Hand memory freed after loading (fp32 weights cast to bf16, tokenizer buffers) back to the OS.

    glibc keeps freed heap pages; without a trim they count in the process's resident size
    for the whole run. No-op where glibc is not the allocator.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
