"""`lmforge plan`: before the run, will it fit, on which GPUs, how long, what it costs, and what to change."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from typing import Any

from lmforge.config import LmforgeConfig
from lmforge.errors import LmforgeError
from lmforge.plan.measure import Measurement, matmul_ceiling
from lmforge.plan.render import PlanOptions, build_report, render_text

MEASURE_STEPS = 5  # the loop keeps its first 2 steps out of tokens/s, so 3 are timed


def measure_here(cfg: LmforgeConfig, steps: int = MEASURE_STEPS) -> tuple[Measurement, dict[str, float] | None]:
    """Run a few real training steps of this config on this machine (lmforge train's own code) and read the MFU
    against the matmul ceiling of the device the steps ran on; the second value is the CPU's ceiling (None on a GPU)."""
    from lmforge.config.sections import LoggingSection
    from lmforge.recipes.finetune import run_train
    from lmforge.device import pick_device, resolve_bf16

    device = pick_device()  # the device run_train trains on
    # the precision TrainingRun picks: fp16 (CUDA or CPU autocast) takes the place of bf16: auto
    bf16 = resolve_bf16(cfg.training.bf16, device) and not (cfg.speed.fp16 and cfg.training.bf16 == "auto")
    dtype = "bf16" if bf16 else "fp16" if cfg.speed.fp16 and device.type in ("cuda", "cpu") else "fp32"
    ceiling = matmul_ceiling((dtype,), device=device)
    with tempfile.TemporaryDirectory(prefix="lmforge-measure-") as tmp:
        training = cfg.training.model_copy(update={
            "max_steps": steps, "output_dir": tmp, "eval_steps": None, "evals_per_epoch": None, "save_steps": None,
            "saves_per_epoch": None, "early_stopping_patience": None, "load_best_model_at_end": False,
            "resume_from_checkpoint": None, "auto_resume_from_checkpoints": False, "logging_steps": 1})
        data = cfg.data.model_copy(update={"val_set_size": 0.0, "test_datasets": None})
        trial = cfg.model_copy(update={"training": training, "data": data, "logging": LoggingSection()})
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report (--json)
            summary = run_train(trial)
    measured = Measurement(summary["steps"], summary["tokens_per_s"], ceiling[dtype], dtype,
                           summary.get("predicted_peak_memory_mb"), summary.get("measured_peak_memory_mb"))
    if device.type == "cuda":
        import torch

        measured.device = torch.cuda.get_device_properties(device).name
        return measured, None  # the report's CPU row keeps no GPU ceiling
    return measured, ceiling


def run_plan(cfg: LmforgeConfig, options: PlanOptions, as_json: bool = False, measure: bool = False) -> dict[str, Any]:
    """Print the plan (text or JSON) and return it."""
    if cfg.is_pretraining and measure:
        raise LmforgeError("--measure runs fine-tuning steps; pretraining configs are planned without it", where="--measure",
                           fix="drop --measure")
    measurement, ceiling = measure_here(cfg) if measure else (None, None)
    report = build_report(cfg, options, measurement, ceiling)
    print(json.dumps(report, indent=2) if as_json else render_text(report))
    return report
