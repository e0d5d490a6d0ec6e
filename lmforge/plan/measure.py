"""`--measure`: this machine's matmul ceiling, and the MFU a few real training steps reach against it."""

from __future__ import annotations

import time
from dataclasses import dataclass

# (M, K, N): a square GEMM and projection-like shapes; the best rate over them is the ceiling. Small enough
# that a CPU without native bf16 (emulated, ~10 GFLOP/s) still finishes each in a fraction of a second.
CEILING_SHAPES = ((1024, 1024, 1024), (1024, 1024, 4096), (1024, 4096, 1024))


def matmul_ceiling(dtypes: tuple[str, ...] = ("bf16", "fp32"), seconds: float = 2.0) -> dict[str, float]:
    """Best GEMM GFLOP/s per dtype on this CPU, best of short windows (the machine may be shared).

    Pass only the dtype training uses: on a CPU without native bf16 a bf16 GEMM is emulated and
    hundreds of times slower, so measuring it costs minutes for a number nobody uses.
    """
    import torch

    out: dict[str, float] = {}
    for name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        best = 0.0
        deadline = time.perf_counter() + 3 * seconds
        for m, k, n in CEILING_SHAPES:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            c = torch.empty(m, n, dtype=dtype)
            torch.mm(a, b, out=c)
            for _ in range(3):
                runs, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds / (3 * len(CEILING_SHAPES)) or runs == 0:
                    torch.mm(a, b, out=c)
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

    def calibrate(self, flops_per_token: float) -> None:
        """MFU = model FLOPs of the real tokens per second over this machine's matmul ceiling."""
        self.flops_per_token = flops_per_token
        self.mfu = flops_per_token * self.real_tokens_per_s / (self.ceiling_gflops * 1e9) if self.ceiling_gflops else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "real_tokens_per_s": self.real_tokens_per_s, "mfu": self.mfu,
                "flops_per_token": self.flops_per_token, "peak_gflops": round(self.ceiling_gflops, 3),
                "peak_dtype": self.ceiling_dtype, "predicted_peak_mb": self.predicted_peak_mb, "measured_peak_mb": self.measured_peak_mb}
