#!/usr/bin/env python
"""TRL side of ``bench/preference_vs_trl.py``: TRL 1.16's DPOTrainer or GRPOTrainer (LoRA) over the harness's batch file.

Runs inside ``bench/.venv-trl`` and never imports lmforge. Both tools read the same file:
- dpo: per optimizer step, the micro-batch's pairs as token ids (prompt, chosen, rejected), tokenized and
  truncated once by the harness. The dataset is those rows in file order (TRL's own tokenization is skipped:
  the rows are already ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``), the sampler sequential, and TRL's
  own collator and ``_compute_loss`` (policy forward, then the reference: the adapter disabled) do the rest.
- grpo: per optimizer step, the prompts (chat-templated token ids) of its generation. The dataset is those
  prompts in file order (``shuffle_dataset=False``); TRL's tokenization of a prompt is replaced by a lookup of
  the file's ids, so the model sees the same prompt tokens. Completions are sampled with
  ``min_new_tokens = max_new_tokens`` on both sides, so every completion is exactly max_completion_length tokens
  and the work per step is identical (the sampled tokens differ; their count does not).

Times the window from the end of the last warm-up step to the end of the last step (a callback); for GRPO also
the sampling (``_generate``) and the reference log-probabilities, by wrapping TRL's methods.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["dpo", "grpo"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--precompute-ref", action="store_true", help="DPO: precompute_ref_log_probs (timed apart)")
    ap.add_argument("--rewards", default=None, help="GRPO: the rewards.py both sides load")
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
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    spec = json.load(open(args.batches))
    s = spec["settings"]
    steps = spec["batches"]
    total_steps = len(steps)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float, dict]] = []

        def on_step_end(self, args_, state, control, **kw):  # noqa: ANN001
            self.marks.append((time.perf_counter(), time.process_time(), dict(phases)))

    phases = {"generation": 0.0, "reference": 0.0, "precompute": 0.0, "generation_cpu": 0.0, "reference_cpu": 0.0}
    timer = StepTimer()
    common = dict(
        output_dir=args.output_dir, max_steps=total_steps, per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=s["grad_accum"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, bf16=args.precision == "bf16", gradient_checkpointing=False,
        seed=s["seed"], data_seed=s["seed"], eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    dtype = getattr(torch, args.model_dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")

    def timed(obj, name: str, phase: str) -> None:  # noqa: ANN001
        original = getattr(obj, name)

        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*a, **kw)
            finally:
                phases[phase] += time.perf_counter() - t0
                if phase + "_cpu" in phases:
                    phases[phase + "_cpu"] += time.process_time() - c0

        setattr(obj, name, wrapper)

    if args.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = [pair for batch in steps for pair in batch]

        class FixedBatchDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **kw):  # noqa: ANN001, ANN002, ANN003
                return dataset  # already prompt_ids / chosen_ids / rejected_ids, truncated by the harness

            def _get_train_sampler(self, *a, **kw):  # noqa: ANN002, ANN003
                return SequentialSampler(self.train_dataset)

        ds = Dataset.from_list([{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                                for r in rows])
        cfg = DPOConfig(**common, beta=s["beta"], loss_type=["sigmoid"], max_length=s["seq_len"],
                        precompute_ref_log_probs=args.precompute_ref, precompute_ref_batch_size=s["micro_batch"])
        if args.precompute_ref:
            timed(FixedBatchDPOTrainer, "_precompute_ref_logps", "precompute")
        trainer = FixedBatchDPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tokenizer,
                                       peft_config=peft_config, callbacks=[timer])
    else:
        from trl import GRPOConfig, GRPOTrainer

        spec_rewards = importlib.util.spec_from_file_location("bench_rewards", args.rewards)
        rewards = importlib.util.module_from_spec(spec_rewards)
        spec_rewards.loader.exec_module(rewards)
        group = s["num_generations"]
        # One row per prompt, in file order; the prompt text is only a key for the file's token ids.
        prompts = [p for batch in steps for p in batch]
        ids_of = {f"prompt-{i}": p["prompt_ids"] for i, p in enumerate(prompts)}
        ds = Dataset.from_list([{"prompt": f"prompt-{i}", "answer": p["answer"]} for i, p in enumerate(prompts)])

        class FixedPromptGRPOTrainer(GRPOTrainer):
            def _tokenize_prompts(self, prompts):  # noqa: ANN001, ANN202
                return [list(ids_of[p]) for p in prompts], None, {}

        cfg = GRPOConfig(**common, beta=s["beta"], num_generations=group, max_completion_length=s["max_completion_length"],
                         temperature=s["temperature"], top_p=1.0, top_k=0, epsilon=0.2, loss_type="dapo",
                         shuffle_dataset=False, reward_weights=s["reward_weights"],
                         generation_kwargs={"min_new_tokens": s["max_completion_length"]})
        timed(FixedPromptGRPOTrainer, "_generate", "generation")
        trainer = FixedPromptGRPOTrainer(model=model, reward_funcs=[rewards.gsm8k_correct, rewards.gsm8k_format], args=cfg,
                                         train_dataset=ds, processing_class=tokenizer, peft_config=peft_config,
                                         callbacks=[timer])
        # The reference log-probabilities: the adapter disabled around _get_per_token_logps_and_entropies. TRL calls that
        # for the reference under no_grad in _generate_and_score_completions and with grad in _compute_loss; time the
        # no-grad calls as the reference phase.
        original = trainer._get_per_token_logps_and_entropies

        def logps(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            if torch.is_grad_enabled():
                return original(*a, **kw)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*a, **kw)
            finally:
                phases["reference"] += time.perf_counter() - t0
                phases["reference_cpu"] += time.process_time() - c0

        trainer._get_per_token_logps_and_entropies = logps
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t_ready = time.perf_counter()
    trainer.train()
    marks = timer.marks
    if len(marks) < total_steps:
        raise SystemExit(f"only {len(marks)} steps ran, expected {total_steps}")
    t0, c0, p0 = marks[args.warmup - 1] if args.warmup else (t_ready, 0.0, {k: 0.0 for k in phases})
    t1, c1, p1 = marks[total_steps - 1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "tool": f"trl-{args.method}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "model_dtype": args.model_dtype,
        "steps": total_steps - args.warmup,
        "train_seconds": t1 - t0,
        "train_cpu_seconds": c1 - c0,
        "generation_seconds": p1["generation"] - p0["generation"],
        "reference_seconds": p1["reference"] - p0["reference"],
        "generation_cpu_seconds": p1["generation_cpu"] - p0["generation_cpu"],
        "reference_cpu_seconds": p1["reference_cpu"] - p0["reference_cpu"],
        "precompute_seconds": phases["precompute"],
        "trainable_params": trainable,
        "setup_seconds": t_ready - t_start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "rewards": [h.get("reward") for h in trainer.state.log_history if "reward" in h],
        "torch_threads": torch.get_num_threads(),
    }
    with open(args.result, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
