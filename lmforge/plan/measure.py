"""`--measure`: this machine's matmul ceiling, and the MFU a few real training steps reach against it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# (M, K, N): a square GEMM and projection-like shapes; the best rate over them is the ceiling. Small enough
# that a CPU without native bf16 (emulated, ~10 GFLOP/s) still finishes each in a fraction of a second.
CEILING_SHAPES = ((1024, 1024, 1024), (1024, 1024, 4096), (1024, 4096, 1024))
# A GPU finishes those in microseconds, where launch overhead would hide its rate: shapes of a large model's layers.
GPU_CEILING_SHAPES = ((8192, 8192, 8192), (4096, 8192, 14336), (4096, 14336, 8192))


def matmul_ceiling(dtypes: tuple[str, ...] = ("bf16", "fp32"), seconds: float = 2.0, device: Any = "cpu") -> dict[str, float]:
    """Best GEMM GFLOP/s per dtype on `device` (the one the measured run trained on), best of short windows
    (the machine may be shared).

    Pass only the dtype training uses: on a CPU without native bf16 a bf16 GEMM is emulated and
    hundreds of times slower, so measuring it costs minutes for a number nobody uses.
    """
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    shapes = GPU_CEILING_SHAPES if cuda else CEILING_SHAPES
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # GPU work is asynchronous: time it done
    out: dict[str, float] = {}
    for name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        best = 0.0
        deadline = time.perf_counter() + 3 * seconds
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            c = torch.empty(m, n, dtype=dtype, device=device)
            torch.mm(a, b, out=c)
            sync()
            for _ in range(3):
                runs, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds / (3 * len(shapes)) or runs == 0:
                    torch.mm(a, b, out=c)
                    sync()
                    runs += 1
                best = max(best, 2.0 * m * k * n * runs / elapsed / 1e9)
            if time.perf_counter() > deadline:
                break
        out[name] = best
    return out


@dataclass
class Measurement:
    """A few real training steps on this machine: throughput, and the planner's memory prediction next to the measured peak."""

    steps: int
    real_tokens_per_s: float
    ceiling_gflops: float
    ceiling_dtype: str
    predicted_peak_mb: float | None
    measured_peak_mb: float | None
    flops_per_token: float = 0.0  # set by the report, which knows the data's row lengths
    mfu: float = 0.0
    device: str = "this CPU"  # where the steps and the ceiling ran

    def calibrate(self, flops_per_token: float) -> None:
        """MFU = model FLOPs of the real tokens per second over this machine's matmul ceiling."""
        self.flops_per_token = flops_per_token
        self.mfu = flops_per_token * self.real_tokens_per_s / (self.ceiling_gflops * 1e9) if self.ceiling_gflops else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "real_tokens_per_s": self.real_tokens_per_s, "mfu": self.mfu,
                "flops_per_token": self.flops_per_token, "peak_gflops": round(self.ceiling_gflops, 3),
                "peak_dtype": self.ceiling_dtype, "device": self.device, "predicted_peak_mb": self.predicted_peak_mb, "measured_peak_mb": self.measured_peak_mb}
