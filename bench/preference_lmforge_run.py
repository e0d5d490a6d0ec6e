#!/usr/bin/env python
"""lmforge side of ``bench/preference_vs_trl.py``: LoRA DPO or GRPO with lmforge's model setup, objective and loop
over the harness's batch file.

- dpo: each step's pairs go through lmforge's preference collator (``collate_pairs``: chosen rows then rejected
  rows, labels on the answers) and the DPO objective of the example config (reference: the adapter disabled).
- grpo: lmforge's RolloutStream (transformers' generate with a KV cache, the rewards of
  examples/smollm2-135m/rewards.py, group advantages, the reference's log-probabilities) over the file's prompts
  in file order, and the GRPO objective. Completions are sampled with ``min_new_tokens = max_new_tokens``
  (as on TRL's side), so every completion is max_completion_length tokens and both tools do the same work.

Writes a JSON result: the timed window (steps after the warm-up), its CPU seconds, for GRPO the sampling and
reference phases inside it, and the losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["dpo", "grpo"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--batches", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from lmforge.config import load_config
    from lmforge.device import pick_device, resolve_bf16
    from lmforge.models.load import config_tokenizer
    from lmforge.models.setup import training_model
    from lmforge.train.loop import LoopResult, LoopSettings, train_loop
    from lmforge.train.optimizers import build_optimizer
    from lmforge.train.schedules import build_scheduler

    spec = json.loads(Path(args.batches).read_text())
    s = spec["settings"]
    overrides = [f"--{kv}" for kv in args.set] + [
        f"--micro_batch_size={s['micro_batch']}", f"--gradient_accumulation_steps={s['grad_accum']}",
        f"--learning_rate={s['lr']}", "--warmup_steps=0", "--lr_scheduler=constant", f"--seed={s['seed']}",
        f"--lora_r={s['lora_r']}", f"--lora_alpha={s['lora_alpha']}", "--lora_dropout=0.0"]
    cfg = load_config(args.config, overrides)
    t = cfg.training
    torch.manual_seed(t.seed)
    device = pick_device()
    bf16 = resolve_bf16(t.bf16, device)
    tokenizer = config_tokenizer(cfg)
    model = training_model(cfg, tokenizer, device, bf16)
    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    total = len(spec["batches"])
    scheduler = build_scheduler(optimizer, "constant", total, 0, 0.0)
    settings = LoopSettings(total_steps=total, grad_accum=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
                            device=device, autocast_dtype=torch.bfloat16 if bf16 else None, logging_steps=10**9,
                            timing_warmup_steps=args.warmup, show_progress=False)
    phases = {"generation": 0.0, "reference": 0.0, "generation_cpu": 0.0, "reference_cpu": 0.0}
    if args.method == "dpo":
        from lmforge.data.preference import PreferencePair, collate_pairs
        from lmforge.train.objectives import objective_from_config

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = [collate_pairs([PreferencePair(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in step], pad)
                   for step in spec["batches"]]
        objective = objective_from_config(cfg)  # LoRA: the reference is the policy with its adapter off
        stream: Any = iter(batches)
    else:
        import contextlib

        from lmforge.data.prompt_sets import Prompt
        from lmforge.infer.generate import Sampling
        from lmforge.train.grpo import GRPO
        from lmforge.train.rewards import load_reward_functions
        from lmforge.train.rollouts import RolloutStream, reference_model

        @dataclass(frozen=True)
        class FixedLength(Sampling):
            def generate_kwargs(self) -> dict[str, Any]:
                return {**super().generate_kwargs(), "min_new_tokens": self.max_new_tokens}

        trl = cfg.rl.trl
        prompts = [Prompt(tuple(p["prompt_ids"]), p["value"], {"answer": p["answer"]}) for step in spec["batches"] for p in step]

        class FixedOrderStream(RolloutStream):
            def _order(self, epoch: int) -> Any:
                import numpy as np

                return np.arange(len(self.prompts))  # the file's order

            def _sample(self, *a: Any, **kw: Any) -> torch.Tensor:
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return super()._sample(*a, **kw)
                finally:
                    phases["generation"] += time.perf_counter() - t0
                    phases["generation_cpu"] += time.process_time() - c0

            def _logps(self, *a: Any, **kw: Any) -> torch.Tensor:
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return super()._logps(*a, **kw)
                finally:
                    phases["reference"] += time.perf_counter() - t0
                    phases["reference_cpu"] += time.process_time() - c0

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()

        rollouts = FixedOrderStream(model, tokenizer, prompts, load_reward_functions(trl.reward_funcs or []), trl,
                                    micro_batch_size=t.micro_batch_size, grad_accum=t.gradient_accumulation_steps,
                                    seed=t.seed, reference=reference_model(model) if trl.beta else None, autocast=autocast,
                                    say=lambda _: None, share_prompts=True)  # as `lmforge train` on one process
        rollouts.sampling = FixedLength(**{k: getattr(rollouts.sampling, k) for k in rollouts.sampling.__dataclass_fields__})
        objective = GRPO.from_settings(trl, skip_zero_advantage=False, share_prompts=True)
        stream = iter(rollouts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t_ready = time.perf_counter()
    # Warm-up steps in one call, timed steps in another (the timed window's CPU time and phases read apart).
    settings.total_steps, settings.timing_warmup_steps = args.warmup, args.warmup
    result = train_loop(model, optimizer, scheduler, stream, settings, loss_fn=objective, result=LoopResult())
    settings.total_steps, settings.timing_warmup_steps = total, 0
    cpu0, phases0 = time.process_time(), dict(phases)
    result = train_loop(model, optimizer, scheduler, stream, settings, loss_fn=objective, result=result)
    cpu_seconds = time.process_time() - cpu0
    losses = [loss for _, loss in result.train_history]
    out = {
        "tool": f"lmforge-{args.method}",
        "steps": total - args.warmup,
        "train_seconds": result.train_seconds,
        "train_cpu_seconds": cpu_seconds,
        "generation_seconds": phases["generation"] - phases0["generation"],
        "reference_seconds": phases["reference"] - phases0["reference"],
        "generation_cpu_seconds": phases["generation_cpu"] - phases0["generation_cpu"],
        "reference_cpu_seconds": phases["reference_cpu"] - phases0["reference_cpu"],
        "trainable_params": trainable,
        "setup_seconds": t_ready - t_start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "bf16": bf16,
    }
    Path(args.result).write_text(json.dumps(out, indent=2))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
