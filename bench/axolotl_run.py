#!/usr/bin/env python
"""axolotl side of ``bench/sft_vs_peers.py`` (runs in axolotl's own venv, ``$AXOLOTL_VENV`` or ``bench/.venv-axolotl``,
made by ``bench/setup_axolotl_venv.sh``; never imports lmforge).

Feeds axolotl the harness's fixed batch file: the examples, in file order, as a pre-tokenized dataset
(``input_ids``, ``attention_mask``, ``labels``: axolotl takes a dataset entry without ``type`` as already
tokenized), with axolotl's own ``curriculum_sampling`` (a sequential sampler; the trainer's sampler is also
checked to be one) so its collator pads exactly the harness's batches, to their longest row
(``pad_to_sequence_len: false``; axolotl's default pads each batch to a multiple of 64, for GPU tensor cores). fp32 (axolotl refuses bf16 on CPU), sdpa
attention, no sample packing, no length grouping, LoRA r 16 / alpha 32 / dropout 0.05 on every linear layer (lora)
or none (full), AdamW (torch) constant lr 2e-4, clip 1.0. axolotl's LoRA triton kernels (auto-enabled for LoRA)
are turned off: they need a GPU. A callback takes the time at each step end and the logged losses; the window is
from the end of the last warm-up step to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, choices=["lora", "full"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    t_start = time.perf_counter()
    # No telemetry, no experiment tracker, no Hub: the bench machine is offline.
    for k, v in {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                 "TRL_EXPERIMENTAL_SILENCE": "1"}.items():
        os.environ.setdefault(k, v)
    import torch
    import yaml

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(Path(args.batches).read_text())
    if any(len(b) != spec["micro_batch"] for b in spec["batches"]):
        raise SystemExit("every batch in the file must hold micro_batch examples (the sampler is sequential)")
    rows = [e for b in spec["batches"] for e in b]
    total_steps = len(spec["batches"])
    data = out / "pretokenized.jsonl"
    with open(data, "w") as f:
        for e in rows:
            f.write(json.dumps({"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                                "labels": e["labels"]}) + "\n")
    cfg = {
        "base_model": args.model, "datasets": [{"path": str(data), "ds_type": "json"}],
        "sequence_len": spec["seq_len"], "pad_to_sequence_len": False, "sample_packing": False, "group_by_length": False,
        "curriculum_sampling": True, "shuffle_merged_datasets": False, "shuffle_before_merging_datasets": False,
        "val_set_size": 0, "micro_batch_size": spec["micro_batch"], "dataset_num_proc": 1,
        "gradient_accumulation_steps": 1, "max_steps": total_steps, "num_epochs": 1, "optimizer": "adamw_torch",
        "lr_scheduler": "constant", "learning_rate": 2e-4, "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False,
        "attn_implementation": "sdpa", "logging_steps": 1, "save_strategy": "no", "output_dir": str(out / "run"),
        "seed": 42, "dataset_prepared_path": str(out / "prepared"), "dataloader_num_workers": 0,
    }
    if args.workload == "lora":
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_linear=True,
                   lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, lora_embedding_kernel=False)
    config = out / "axolotl.yml"
    config.write_text(yaml.safe_dump(cfg))

    import transformers
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    import axolotl
    from axolotl.core.trainers.base import AxolotlTrainer

    counter = {"real": 0, "slots": 0}
    marks: list[tuple[float, dict]] = []
    seen: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):  # noqa: ANN001
            marks.append((time.perf_counter(), dict(counter, cpu=time.process_time())))

        def on_train_begin(self, args_, state, control, **kw):  # noqa: ANN001
            seen["t_ready"] = time.perf_counter()

    original_init = AxolotlTrainer.__init__
    original_step = AxolotlTrainer.training_step

    def init(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        original_init(self, *a, **kw)
        self.add_callback(StepTimer())
        seen["trainer"] = self

    def training_step(self, model, inputs, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        mask = inputs.get("attention_mask")
        counter["slots"] += int(inputs["input_ids"].numel())
        counter["real"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return original_step(self, model, inputs, *a, **kw)

    AxolotlTrainer.__init__ = init
    AxolotlTrainer.training_step = training_step

    from axolotl.cli.train import do_cli

    do_cli(config=str(config))
    trainer = seen.get("trainer")
    if trainer is None:
        raise SystemExit("axolotl built no AxolotlTrainer")
    sampler = trainer._get_train_sampler(trainer.train_dataset)
    if not isinstance(sampler, SequentialSampler):
        raise SystemExit(f"axolotl's train sampler is {type(sampler).__name__}, not sequential: batches would differ")
    if len(marks) < total_steps:
        raise SystemExit(f"only {len(marks)} steps ran, expected {total_steps}")
    t_ready = seen.get("t_ready", t_start)
    t0, c0 = marks[args.warmup - 1] if args.warmup else (t_ready, dict({k: 0 for k in counter}, cpu=0.0))
    t1, c1 = marks[total_steps - 1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    import peft
    import trl

    result = {
        "tool": "axolotl",
        "versions": {"axolotl": axolotl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "torch": torch.__version__},
        "workload": args.workload,
        "steps": total_steps - args.warmup,
        "warmup_steps_excluded": args.warmup,
        "counted_real_tokens": c1["real"] - c0["real"],
        "slots": c1["slots"] - c0["slots"],
        "train_seconds": t1 - t0,
        "train_cpu_seconds": c1["cpu"] - c0["cpu"],
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "setup_seconds": t_ready - t_start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
