#!/usr/bin/env python
"""axolotl side of ``bench/sft_vs_peers.py`` (runs in ``bench/.venv-axolotl``; never imports lmforge). NOT YET RUN:
axolotl did not install next to torch==2.13.0 on the bench machine (see bench/README.md).

Feeds axolotl the harness's fixed batch file: the examples, in file order, as a pre-tokenized dataset
(``input_ids``, ``attention_mask``, ``labels``: axolotl takes a dataset entry without ``type`` as already
tokenized), with axolotl's trainer's sampler replaced by a sequential one so its collator pads exactly the
harness's batches. fp32 (axolotl refuses bf16 on CPU), no sample packing, no length grouping, LoRA r 16 /
alpha 32 / dropout 0.05 on every linear layer (lora) or none (full), AdamW (torch) constant lr 2e-4, clip 1.0.
A callback takes the time at each step end; the window is from the end of the last warm-up step to the end.
"""

from __future__ import annotations

import argparse
import json
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

    import torch
    import yaml

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(Path(args.batches).read_text())
    rows = [e for b in spec["batches"] for e in b]
    total_steps = len(spec["batches"])
    data = out / "pretokenized.jsonl"
    with open(data, "w") as f:
        for e in rows:
            f.write(json.dumps({"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                                "labels": e["labels"]}) + "\n")
    cfg = {
        "base_model": args.model, "datasets": [{"path": str(data), "ds_type": "json"}],
        "sequence_len": spec["seq_len"], "sample_packing": False, "group_by_length": False,
        "shuffle_merged_datasets": False, "val_set_size": 0, "micro_batch_size": spec["micro_batch"],
        "gradient_accumulation_steps": 1, "max_steps": total_steps, "num_epochs": 1, "optimizer": "adamw_torch",
        "lr_scheduler": "constant", "learning_rate": 2e-4, "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False,
        "logging_steps": 1, "save_strategy": "no", "output_dir": str(out / "run"), "seed": 42,
        "dataset_prepared_path": str(out / "prepared"), "dataloader_num_workers": 0,
    }
    if args.workload == "lora":
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_linear=True)
    config = out / "axolotl.yml"
    config.write_text(yaml.safe_dump(cfg))

    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from axolotl.core.trainers.base import AxolotlTrainer

    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):  # noqa: ANN001
            marks.append(time.perf_counter())

    original_init = AxolotlTrainer.__init__

    def init(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        original_init(self, *a, **kw)
        self.add_callback(StepTimer())

    AxolotlTrainer.__init__ = init
    AxolotlTrainer._get_train_sampler = lambda self, *a, **kw: SequentialSampler(self.train_dataset)

    from axolotl.cli.train import do_cli

    do_cli(config=str(config))
    if len(marks) < total_steps:
        raise SystemExit(f"only {len(marks)} steps ran, expected {total_steps}")
    result = {"tool": "axolotl", "steps": total_steps - args.warmup, "warmup_steps_excluded": args.warmup,
              "train_seconds": marks[total_steps - 1] - marks[args.warmup - 1], "first_loss": None, "last_loss": None}
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
