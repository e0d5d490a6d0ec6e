#!/usr/bin/env python
"""Peer side of ``bench/sft_vs_peers.py``: TRL's SFTTrainer (LoRA or full) or transformers' Trainer (pretraining,
``run_clm``-style) over the harness's fixed batch file.

Runs inside ``bench/.venv-trl`` and never imports lmforge. Every tool trains on the same examples in the
same batches: the batch file lists, per optimizer step, the examples (token ids and labels, already
tokenized and truncated by the harness) of that step's micro-batch. The dataset is those examples in
file order and the trainer's sampler is replaced by a sequential one, so the trainer's own collator
(padding to the longest in the batch, or TRL's ``padding_free`` flattening) sees exactly the harness's
batches. Loss only where the label is not -100 (TRL: ``completion_mask``; Trainer: ``labels``).

Times the window from the end of the last warm-up step to the end of the last step (a callback), as
lmforge's loop does, and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

IGNORE_INDEX = -100


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True, choices=["trl-lora", "trl-full", "hf-clm"])
    ap.add_argument("--model", required=True, help="HF model folder (converted GGUF, or the random-init model)")
    ap.add_argument("--batches", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16: autocast (Trainer bf16=True)")
    ap.add_argument("--padding-free", action="store_true", help="TRL padding_free: the batch flattened into one row")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--liger", action="store_true", help="use_liger_kernel=True (GPU; needs liger-kernel)")
    ap.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 double-quant base (bitsandbytes)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import datasets
    import transformers
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    spec = json.load(open(args.batches))
    micro_batch = spec["micro_batch"]
    steps = spec["batches"]
    if any(len(b) != micro_batch for b in steps):
        raise SystemExit("every batch in the file must hold micro_batch examples (the sampler is sequential)")
    rows = [e for b in steps for e in b]
    total_steps = len(steps)
    counter = {"real": 0, "slots": 0}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[int, float, dict]] = []

        def on_step_end(self, args_, state, control, **kw):  # noqa: ANN001
            self.marks.append((state.global_step, time.perf_counter(), dict(counter, cpu=time.process_time())))

    def count(inputs: dict) -> None:
        mask = inputs.get("attention_mask")
        counter["slots"] += int(inputs["input_ids"].numel())
        counter["real"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())

    common = dict(
        output_dir=args.output_dir, max_steps=total_steps, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, bf16=args.precision == "bf16", gradient_checkpointing=False,
        seed=args.seed, data_seed=args.seed, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        use_liger_kernel=args.liger,
    )
    timer = StepTimer()
    dtype = getattr(torch, args.model_dtype)
    if args.tool == "hf-clm":
        from transformers import default_data_collator

        class FixedOrderTrainer(Trainer):
            def _get_train_sampler(self, *a, **kw):  # noqa: ANN002, ANN003
                return SequentialSampler(self.train_dataset)

            def training_step(self, model, inputs, *a, **kw):  # noqa: ANN001
                count(inputs)
                return super().training_step(model, inputs, *a, **kw)

        ds = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"],
                                 "attention_mask": [1] * len(e["input_ids"])} for e in rows])
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
        trainer = FixedOrderTrainer(model=model, args=TrainingArguments(**common), train_dataset=ds,
                                    data_collator=default_data_collator, callbacks=[timer])
        trl_version = None
    else:
        import trl
        from trl import SFTConfig, SFTTrainer

        trl_version = trl.__version__

        class FixedOrderSFTTrainer(SFTTrainer):
            def _get_train_sampler(self, *a, **kw):  # noqa: ANN002, ANN003
                return SequentialSampler(self.train_dataset)

            def training_step(self, model, inputs, *a, **kw):  # noqa: ANN001
                count(inputs)
                return super().training_step(model, inputs, *a, **kw)

        # Pre-tokenized rows: TRL skips its own tokenization; completion_mask marks the trained tokens.
        ds = Dataset.from_list([{"input_ids": e["input_ids"],
                                 "completion_mask": [int(x != IGNORE_INDEX) for x in e["labels"]]} for e in rows])
        init_kwargs = {"dtype": dtype, "attn_implementation": args.attn}
        if args.load_in_4bit:
            from transformers import BitsAndBytesConfig

            init_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        # padding_free refuses max_length without packing; the harness's rows are already truncated to seq_len.
        cfg = SFTConfig(**common, max_length=None if args.padding_free else args.seq_len, packing=False,
                        padding_free=args.padding_free,
                        completion_only_loss=True, model_init_kwargs=init_kwargs)
        peft_config = None
        if args.tool == "trl-lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
        trainer = FixedOrderSFTTrainer(model=args.model, args=cfg, train_dataset=ds,
                                       processing_class=AutoTokenizer.from_pretrained(args.model),
                                       peft_config=peft_config, callbacks=[timer])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t_ready = time.perf_counter()
    trainer.train()
    marks = timer.marks
    if len(marks) < total_steps:
        raise SystemExit(f"only {len(marks)} steps ran, expected {total_steps}")
    _, t0, c0 = marks[args.warmup - 1] if args.warmup else (0, t_ready, dict({k: 0 for k in counter}, cpu=0.0))
    _, t1, c1 = marks[total_steps - 1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "tool": args.tool,
        "versions": {"trl": trl_version, "transformers": transformers.__version__, "torch": torch.__version__},
        "model_dtype": args.model_dtype,
        "padding_free": args.padding_free,
        "steps": total_steps - args.warmup,
        "warmup_steps_excluded": args.warmup,
        "counted_real_tokens": c1["real"] - c0["real"],
        "slots": c1["slots"] - c0["slots"],
        "train_seconds": t1 - t0,
        "train_cpu_seconds": c1["cpu"] - c0["cpu"],
        "trainable_params": trainable,
        "setup_seconds": t_ready - t_start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
    }
    with open(args.result, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
