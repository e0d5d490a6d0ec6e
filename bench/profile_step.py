#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over lmforge's own loop, ops grouped by kind.

Builds the model, data and optimizer exactly as `lmforge train` does (the shared setup's parts),
runs `--warmup` untimed steps, then profiles `--steps` steps of the real loop and prints:
- the top ops by self CPU time (torch.profiler's table);
- a roll-up by kind (GEMMs, attention, LoRA side path, elementwise, norms, loss, optimizer, ...)
  with each kind's share of the step, and the GEMMs' achieved GFLOP/s (from the op shapes).

    .venv/bin/python bench/profile_step.py bench/lora_gsm8k_bench.yml
    .venv/bin/python bench/profile_step.py bench/lora_gsm8k_bench.yml --set adapter= --steps 2   # full fine-tuning
    .venv/bin/python bench/profile_step.py bench/lora_gsm8k_bench.yml --first                   # the first step's one-off costs
    .venv/bin/python bench/profile_step.py bench/lora_gsm8k_bench.yml --set chunked_cross_entropy=true   # a lever, before/after

`--set key=value` overrides config keys (as `lmforge train --key=value`). Nothing is written.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Op name → kind. Order matters: the first matching fragment wins.
KINDS = [
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn", "onednn")),
    ("attention", ("scaled_dot_product", "_flash_attention", "attention")),
    ("dropout", ("random_", "bernoulli", "dropout", "masked_fill")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "_softmax")),
    ("norm/reduce", ("pow", "mean", "rsqrt", "norm", "sum")),
    ("copy/cast", ("copy_", "to_copy", "_to_copy", "contiguous", "clone", "cat", "index", "fill_", "zero_", "empty")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("elementwise", ("add", "mul", "silu", "neg", "sub", "div", "where", "exp", "sigmoid")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def gemm_flops(name: str, shapes: list) -> float:
    """FLOPs of a matmul op from its recorded input shapes (0 when they do not say)."""
    try:
        if name in ("aten::mm",) and len(shapes) >= 2:
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::addmm" and len(shapes) >= 3:
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "aten::bmm" and len(shapes) >= 2:
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
    except (TypeError, ValueError):
        return 0.0
    return 0.0


def build(config: str, overrides: list[str]):
    import torch

    from lmforge.config import load_config
    from lmforge.data.prepare import prepare
    from lmforge.models.setup import training_model
    from lmforge.models.load import config_tokenizer
    from lmforge.recipes.run import count_steps
    from lmforge.train.optimizers import build_optimizer
    from lmforge.train.schedules import build_scheduler
    from lmforge.train.stream import EpochStream
    from lmforge.device import pick_device, resolve_bf16

    cfg = load_config(config, overrides)
    t, d = cfg.training, cfg.data
    torch.manual_seed(t.seed)
    device = pick_device()
    bf16 = resolve_bf16(t.bf16, device)
    tokenizer = config_tokenizer(cfg)
    data = prepare(d, tokenizer, t.seed, save=False)
    model = training_model(cfg, tokenizer, device, bf16)
    plan = count_steps(t, len(data.train))
    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    scheduler = build_scheduler(optimizer, t.lr_scheduler, plan.total_steps, plan.warmup_steps, 0.0)
    stream = EpochStream(data.train, t.micro_batch_size, tokenizer.pad_token_id, t.seed, t.group_by_length,
                         sequence_len=d.sequence_len if d.sample_packing else None)
    return cfg, model, optimizer, scheduler, stream, device, bf16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--first", action="store_true", help="profile the very first step (no warm-up)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from lmforge.data.prepare import IGNORE_INDEX
    from lmforge.train.loop import LoopSettings, train_loop

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"--{kv}" if not kv.startswith("--") else kv for kv in args.set]
    cfg, model, optimizer, scheduler, stream, device, bf16 = build(args.config, overrides)
    warmup = 0 if args.first else args.warmup
    batches = iter(stream)
    settings = LoopSettings(total_steps=warmup, grad_accum=cfg.training.gradient_accumulation_steps,
                            max_grad_norm=cfg.training.max_grad_norm, device=device,
                            autocast_dtype=torch.bfloat16 if bf16 else None, logging_steps=10**9)
    from functools import partial

    from lmforge.train.loss import causal_lm_loss

    t = cfg.training  # the loss as recipes/finetune.py builds it, so loss switches show in the profile
    loss_fn = partial(causal_lm_loss, label_smoothing=t.label_smoothing_factor,
                      loss_chunks=t.chunked_cross_entropy_num_chunks if t.chunked_cross_entropy else 1)
    if warmup:
        started = time.perf_counter()
        train_loop(model, optimizer, scheduler, batches, settings, loss_fn=loss_fn)
        print(f"warm-up: {warmup} steps in {time.perf_counter() - started:.1f} s", flush=True)
    taken = list(itertools.islice(batches, args.steps * settings.grad_accum))
    tokens = sum(int(b["attention_mask"].sum()) for b in taken)
    labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in taken)
    shapes = [tuple(b["input_ids"].shape) for b in taken]
    settings.total_steps = warmup + args.steps
    settings.timing_warmup_steps = 0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        started = time.perf_counter()
        from lmforge.train.loop import LoopResult

        train_loop(model, optimizer, scheduler, iter(taken), settings, loss_fn=loss_fn, result=LoopResult(steps=warmup))
        wall = time.perf_counter() - started
    print(f"profiled {args.steps} steps: {wall:.2f} s wall, {tokens} real tokens ({tokens / wall:.0f} tokens/s under the "
          f"profiler), {labels} labelled; batch shapes {shapes}; load average {os.getloadavg()[0]:.2f}; "
          f"torch threads {torch.get_num_threads()}")
    events = prof.key_averages(group_by_input_shape=True)
    by_kind: dict[str, float] = defaultdict(float)
    gemm_time, gemm_flop = 0.0, 0.0
    total = 0.0
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
        total += e.self_cpu_time_total
        f = gemm_flops(e.key, e.input_shapes or [])
        if f:
            gemm_flop += f * e.count
            gemm_time += e.self_cpu_time_total
    print("\n| kind | self CPU s | share |\n|---|---|---|")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e6:.2f} | {us / total:.1%} |")
    if gemm_time:
        print(f"\nmatmuls with known shapes: {gemm_flop / 1e9:.1f} GFLOP in {gemm_time / 1e6:.2f} s = "
              f"{gemm_flop / gemm_time / 1e3:.0f} GFLOP/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    if os.environ.get("PROFILE_SHAPES"):
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=30, max_shapes_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
