"""Every training run checks the planner: predicted peak at the start, predicted and measured in summary.json.

The recipe calls :func:`start_peak_check` before it loads anything, :meth:`PeakCheck.predict` once
its data is prepared, and :meth:`PeakCheck.finish` when it writes its summary. Measured peak:
- GPU: ``torch.cuda.max_memory_allocated`` (live tensors), compared with the predicted live peak;
- CPU: the process's peak resident set (``ru_maxrss``) minus its baseline. The baseline is the
  resident set right after importing the training stack (torch, transformers' model classes,
  peft, bitsandbytes when quantizing, lmforge's training modules) and before any tokenizer,
  data or weights: what every training run pays whatever it trains. The kernel's peak count
  restarts there (reset_peak_rss). bench/plan_memory.py measures the same from outside (``wait4``).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from lmforge.plan.hardware import GiB

MiB = 2**20


def import_training_stack(quantized: bool) -> None:
    """Import what every training run imports before it reads a byte of data or weights."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import lmforge.data.prepare  # noqa: F401
    import lmforge.train.loop  # noqa: F401

    if quantized:
        import bitsandbytes  # noqa: F401


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class PeakCheck:
    device_type: str
    baseline_bytes: int
    predicted: dict[str, Any] | None
    error: str | None = None

    def predict(self, cfg: Any, prepared: Any, say: Any = print) -> None:
        """Predict this run's peak from its config and prepared data, and say it. Never stops the run."""
        try:
            from lmforge.plan.predict import predict_run

            est = predict_run(cfg, device_type=self.device_type, prepared=prepared).memory
            say(f"planner: predicted peak {est.peak_bytes / GiB:.2f} GiB on {est.device} ({est.phase}: "
                + ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in est.breakdown.items() if v) + ")")
            self.predicted = {"peak_bytes": est.peak_bytes, "live_peak_bytes": est.live_peak_bytes, "breakdown": est.breakdown}
        except Exception as exc:  # noqa: BLE001 (the planner must never stop a training run)
            say(f"planner: no prediction ({type(exc).__name__}: {exc})")
            self.error = f"{type(exc).__name__}: {exc}"

    def finish(self) -> dict[str, Any]:
        """Fields for summary.json: predicted and measured peak, in MiB, and their ratio."""
        import torch

        if self.device_type == "cuda":
            measured = torch.cuda.max_memory_allocated()
            basis = "torch.cuda.max_memory_allocated (live tensors; predicted: live peak, no context/fragmentation)"
            predicted = self.predicted and self.predicted["live_peak_bytes"]
        else:
            measured = max(0, peak_rss_bytes() - self.baseline_bytes)
            basis = "peak RSS above the process's baseline after importing the training stack"
            predicted = self.predicted and self.predicted["peak_bytes"]
        out: dict[str, Any] = {
            "predicted_peak_memory_mb": round(predicted / MiB, 1) if predicted else None,
            "measured_peak_memory_mb": round(measured / MiB, 1),
            "peak_memory_basis": basis,
            "baseline_rss_mb": round(self.baseline_bytes / MiB, 1) if self.device_type == "cpu" else None,
        }
        if predicted:
            out["predicted_over_measured"] = round(predicted / max(measured, 1), 3)
            out["predicted_breakdown_mb"] = {k: round(v / MiB, 1) for k, v in self.predicted["breakdown"].items()}
        if self.error:
            out["prediction_error"] = self.error
        return out


def start_peak_check(cfg: Any) -> PeakCheck:
    """Import the training stack and record the baseline; call before the tokenizer, data or model load."""
    import torch

    from lmforge.device import pick_device

    device = pick_device()
    import_training_stack(cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    return PeakCheck(device.type, current_rss_bytes() if device.type == "cpu" else 0, None)


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count from now (Linux >= 4.0), so a process that ran something bigger
    before this run (a test session, `lmforge plan --measure`) measures this run's peak, not its own history."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass
