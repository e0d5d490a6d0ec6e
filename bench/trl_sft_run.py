"""The ``trl-peer`` row of ``bench/gpu_check.py``: one LoRA SFT run with TRL's SFTTrainer.

Never imports lmforge. The GPU check starts it as a child process (in its own environment, with
the carried TRL wheel) and reads the JSON it writes.

What it times: the wall-clock window from the end of the last warm-up step to the end
of the last step (data loading, forward, backward, clipping, optimizer step: everything
the training loop does). "Real tokens" = non-pad input tokens = sum of the attention
mask of every batch trained on inside that window.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF model folder (lmforge's converted GGUF cache)")
    ap.add_argument("--data", required=True, help="GSM8K train.jsonl")
    ap.add_argument("--steps", type=int, required=True, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, required=True, help="untimed warm-up steps before them")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype the frozen base weights are loaded in (bf16 autocast is on either way)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--result", required=True, help="where to write the result JSON")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import datasets
    import peft
    import transformers
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()

    prompt_tmpl = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def to_prompt_completion(ex):
        return {"prompt": prompt_tmpl.format(question=ex["question"]), "completion": ex["answer"] + "<|im_end|>"}

    ds = load_dataset("json", data_files=args.data, split="train")
    ds = ds.map(to_prompt_completion, remove_columns=ds.column_names)

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    total_steps = args.warmup + args.steps
    cfg = SFTConfig(
        output_dir=args.output_dir,
        max_steps=total_steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=True,
        max_length=args.seq_len,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        # SFTConfig defaults to True; axolotl-style configs (and lmforge's) default to False.
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": getattr(torch, args.model_dtype)},
        seed=args.seed,
        data_seed=args.seed,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )

    counter = {"real": 0, "padded": 0, "seqs": 0, "sumsq": 0}

    class CountingSFTTrainer(SFTTrainer):
        """Counts the non-pad tokens of every batch the loop actually trains on."""

        def training_step(self, model, inputs, *a, **kw):
            mask = inputs["attention_mask"]
            lens = mask.sum(dim=1)
            counter["real"] += int(lens.sum())
            counter["padded"] += int(mask.numel())
            counter["seqs"] += int(mask.shape[0])
            counter["sumsq"] += int((lens * lens).sum())
            return super().training_step(model, inputs, *a, **kw)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []  # (global_step, perf_counter, counters snapshot) at each step end

        def on_step_end(self, args_, state, control, **kw):
            self.marks.append((state.global_step, time.perf_counter(), dict(counter)))

    timer = StepTimer()
    trainer = CountingSFTTrainer(
        model=args.model,
        args=cfg,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    t_ready = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()

    marks = timer.marks
    if len(marks) < total_steps:
        raise SystemExit(f"only {len(marks)} steps ran, expected {total_steps}")
    if args.warmup > 0:
        _, t0, c0 = marks[args.warmup - 1]
    else:  # no warm-up: the window starts when the first step starts (approximated by train() start)
        t0, c0 = t_ready, {k: 0 for k in counter}
    _, t1, c1 = marks[total_steps - 1]
    seconds = t1 - t0
    real = c1["real"] - c0["real"]
    step_times = [marks[i][1] - marks[i - 1][1] for i in range(max(args.warmup, 1), total_steps)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    result = {
        "tool": "trl",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "datasets": datasets.__version__,
            "torch": torch.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "model_dtype": args.model_dtype,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup,
        "real_tokens": real,
        "padded_tokens": c1["padded"] - c0["padded"],
        "sequences": c1["seqs"] - c0["seqs"],
        "sum_sq_seq_len": c1["sumsq"] - c0["sumsq"],
        "train_seconds": seconds,
        "tokens_per_s": real / seconds if seconds > 0 else None,
        "step_seconds_median": sorted(step_times)[len(step_times) // 2] if step_times else None,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "setup_seconds": t_ready - t_start,
        "train_call_seconds": t_end - t_ready,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
