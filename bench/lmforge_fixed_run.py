#!/usr/bin/env python
"""lmforge side of ``bench/sft_vs_peers.py``: lmforge's model setup, optimizer, objective and loop over a fixed batch file.

Every tool in the comparison trains on the same examples in the same batches: the harness writes
them once (``batches.json``: token ids and labels, one list of examples per optimizer step) and
each tool's runner reads that file. Here the batches go through lmforge's own collators
(``collate``: padded to the longest in the batch; ``--packed``: the batch's examples concatenated
into one row with restarting position ids, lmforge's sample packing) and lmforge's ``train_loop``;
the model comes from ``models.setup.training_model`` as ``lmforge train`` builds it (``--init-dir``:
a saved random-init model, for pretraining).

Writes a JSON result: the timed window (``train_seconds``: steps after the warm-up, batch fetch
included), the real tokens the loop counted, the losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="lmforge YAML (model, adapter, optimizer settings)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--batches", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--init-dir", default=None, help="HF folder of a random-init model to train (pretraining)")
    ap.add_argument("--packed", action="store_true", help="each micro-batch as one packed row (padding-free)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from lmforge.config import load_config
    from lmforge.data.batching import collate, collate_packed
    from lmforge.data.prepare import Example
    from lmforge.models.setup import training_model
    from lmforge.models.load import config_tokenizer
    from lmforge.train.loop import LoopSettings, train_loop
    from lmforge.train.objectives import objective_from_config
    from lmforge.train.optimizers import build_optimizer
    from lmforge.train.schedules import build_scheduler
    from lmforge.device import pick_device, resolve_bf16

    overrides = [kv if kv.startswith("--") else f"--{kv}" for kv in args.set]
    cfg = load_config(args.config, overrides)
    t = cfg.training
    torch.manual_seed(t.seed)
    device = pick_device()
    bf16 = resolve_bf16(t.bf16, device)
    tokenizer = config_tokenizer(cfg)
    spec = json.loads(Path(args.batches).read_text())
    steps = [[Example(e["input_ids"], e["labels"]) for e in batch] for batch in spec["batches"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate_packed([b], pad) if args.packed else collate(b, pad) for b in steps]
    new_model = None
    if args.init_dir:
        from transformers import AutoModelForCausalLM

        new_model = AutoModelForCausalLM.from_pretrained(args.init_dir, dtype=torch.float32)
    model = training_model(cfg, tokenizer, device, bf16, new_model=new_model)
    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                                t.adam_epsilon)
    scheduler = build_scheduler(optimizer, "constant", len(batches), 0, 0.0)
    settings = LoopSettings(total_steps=len(batches), grad_accum=1, max_grad_norm=t.max_grad_norm, device=device,
                            autocast_dtype=torch.bfloat16 if bf16 else None, logging_steps=10**9,
                            timing_warmup_steps=args.warmup)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    objective = objective_from_config(cfg)  # what TrainingRun trains (the causal LM, with the config's loss options)
    t_ready = time.perf_counter()
    # Warm-up steps in one call, timed steps in another, so the timed window's CPU time can be read too
    # (on a loaded machine CPU-seconds per token move far less than wall-clock seconds).
    from lmforge.train.loop import LoopResult

    stream = iter(batches)
    settings.total_steps, settings.timing_warmup_steps = args.warmup, args.warmup
    result = train_loop(model, optimizer, scheduler, stream, settings, loss_fn=objective, result=LoopResult())
    settings.total_steps, settings.timing_warmup_steps = len(batches), 0
    cpu0 = time.process_time()
    result = train_loop(model, optimizer, scheduler, stream, settings, loss_fn=objective, result=result)
    cpu_seconds = time.process_time() - cpu0
    losses = [loss for _, loss in result.train_history]
    out = {
        "tool": "lmforge",
        "steps": len(batches) - args.warmup,
        "warmup_steps_excluded": args.warmup,
        "counted_real_tokens": result.real_tokens,
        "train_seconds": result.train_seconds,
        "train_cpu_seconds": cpu_seconds,
        "trainable_params": trainable,
        "setup_seconds": t_ready - t_start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "packed": args.packed,
    }
    Path(args.result).write_text(json.dumps(out, indent=2))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
