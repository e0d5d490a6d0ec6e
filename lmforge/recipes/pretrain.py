"""`lmforge pretrain`: tokenizer → token shards → new (or pretrained) model → loop → eval vs baseline → output folder.

From scratch (``model_config``) the tokenizer is trained first when ``tokenizer_train`` is set
and its folder holds none yet; shards are written once and a rerun resumes or reuses them.
Continued pretraining (``base_model`` + raw text) runs the same steps with pretrained weights.
At the end the held-out loss is printed next to a baseline that needs no model (CLM: the
unigram entropy of the held-out tokens; MLM: always guessing the most frequent token), so a
user can tell at a glance whether the model learned anything beyond token frequencies.

The parts live where they belong: the tokenizer in recipes/tokenizer.py, the text readers in
data/sources.py, the objective (CLM or MLM, masking, metrics) in train/objectives.py, the samples in
infer/sample.py; this file wires them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_dir
from lmforge.config import LmforgeConfig
from lmforge.config.sections import PretrainingSource
from lmforge.data.batching import Batch
from lmforge.data.shards import TokenWindows, most_frequent_token, write_shards
from lmforge.data.sources import shard_inputs
from lmforge.errors import LmforgeError
from lmforge.infer.sample import clm_sample, fill_mask_sample, sample_text
from lmforge.models.build import build_config, build_model, count_parameters, flops_per_token, resolve_architecture
from lmforge.recipes.console import say
from lmforge.recipes.tokenizer import pretraining_tokenizer
from lmforge.recipes.run import TrainingRun
from lmforge.train.objectives import PretrainCollator, mlm_metrics, perplexity, unigram_entropy
from lmforge.train.stream import WindowStream

# Held-out windows evaluated at most (evenly spaced): a bigger val split only slows every eval.
EVAL_MAX_WINDOWS = 1024
# Tokens read to find the most frequent token (the MLM baseline); a prefix of the corpus suffices.
BASELINE_MAX_TOKENS = 20_000_000
DEFAULT_VAL_FRACTION = 0.005


def _sources(cfg: LmforgeConfig) -> list[PretrainingSource]:
    """pretraining_dataset, or `datasets` entries (of type completion: config.checks refuses others)."""
    if cfg.pretrain.pretraining_dataset:
        return list(cfg.pretrain.pretraining_dataset)
    return [PretrainingSource(path=spec.path, name=spec.name, split=spec.split, text_column=spec.field or "text",
                              data_files=spec.data_files) for spec in cfg.data.datasets or []]


def make_shards(cfg: LmforgeConfig, tokenizer: Any, tokenizer_dir: str | None, shards_dir: Path) -> dict[str, Any]:
    """Tokenize the pretraining text into shards_dir (resumes an interrupted run, reuses a finished one)."""
    if tokenizer_dir is None:  # a Hub tokenizer: write_shards reads a tokenizer.json from a folder
        tokenizer_dir = str(shards_dir / "tokenizer")
        atomic_dir(Path(tokenizer_dir), tokenizer.save_pretrained)
    report = write_shards(shard_inputs(_sources(cfg)), tokenizer_dir, str(shards_dir), processes=cfg.data.dataset_processes or 1,
                          add_bos=tokenizer.bos_token_id is not None, add_eos=tokenizer.eos_token_id is not None,
                          doc_per=cfg.pretrain.shard_doc_per)
    if report.new_tokens:
        say(f"shards: {report.total_tokens:,} tokens from {report.documents:,} documents in {report.shards} shard(s), "
            f"{report.tokens_per_second:,.0f} tokens/s{' (resumed)' if report.resumed else ''} → {shards_dir}")
    else:
        say(f"shards: reusing {report.total_tokens:,} tokens in {shards_dir}")
    return {"tokens": report.total_tokens, "documents": report.documents, "dir": str(shards_dir)}


def _check_model_config(cfg: LmforgeConfig) -> None:
    """Architecture and preset mistakes, before any minute is spent on a tokenizer or shards."""
    spec = cfg.pretrain.model_config_
    if spec is None:
        return
    resolve_architecture(spec.architecture, cfg.pretrain.objective)
    if spec.preset is None and not spec.overrides():
        raise LmforgeError("model_config gives no size", where="model_config",
                           fix="set preset: tiny|50M|125M|1B, or hidden_size, num_layers, num_heads")


def _new_model(cfg: LmforgeConfig, tokenizer: Any, context: int) -> Any:
    spec = cfg.pretrain.model_config_
    assert spec is not None
    objective = cfg.pretrain.objective
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "mask_token_id": tokenizer.mask_token_id}
    overrides = spec.overrides()
    config = build_config(spec.architecture, len(tokenizer), spec.preset, overrides, objective, **ids)
    # Windows must fit the position table (learned in gpt2/bert; rope models only record it).
    if "max_position_embeddings" not in overrides and getattr(config, "max_position_embeddings", context) < context:
        overrides["max_position_embeddings"] = context
        config = build_config(spec.architecture, len(tokenizer), spec.preset, overrides, objective, **ids)
    return build_model(config, objective, seed=cfg.training.seed)


def _collator(cfg: LmforgeConfig, tokenizer: Any, seed: int) -> PretrainCollator:
    if cfg.pretrain.pretrain_multipack_attn and tokenizer.eos_token_id is None:
        raise LmforgeError("pretrain_multipack_attn keeps documents apart at their end-of-text token, and this tokenizer "
                           "has none", where="pretrain_multipack_attn", fix="give the tokenizer an eos_token (special_tokens: "
                           "{eos_token: ...}), or remove pretrain_multipack_attn")
    return PretrainCollator(cfg.pretrain.objective, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                            special_ids=tokenizer.all_special_ids, mlm_probability=cfg.pretrain.mlm_probability,
                            seed=seed, seq_len=cfg.data.sequence_len,
                            document_end_id=tokenizer.eos_token_id if cfg.pretrain.pretrain_multipack_attn else None)


def _eval_batches(windows: Any, size: int, collate: PretrainCollator) -> list[Batch]:
    """Fixed held-out batches (fixed masks for MLM), so every evaluation compares like with like."""
    picks = np.linspace(0, len(windows) - 1, min(len(windows), EVAL_MAX_WINDOWS)).round().astype(int)
    picks = sorted(set(picks.tolist()))
    return [collate([windows[i] for i in picks[s:s + size]]) for s in range(0, len(picks), size)]


def run_pretrain(cfg: LmforgeConfig) -> dict[str, Any]:
    """Pretrain as configured; returns the summary (also written to output_dir/summary.json)."""
    t, p = cfg.training, cfg.pretrain
    _check_model_config(cfg)
    with TrainingRun(cfg, "pretrain") as run:
        output_dir = run.output_dir
        shards_dir = Path(p.shards_dir or (Path(cfg.data.dataset_prepared_path) / "shards" if cfg.data.dataset_prepared_path
                                           else output_dir / "shards"))
        say(f"pretraining ({p.objective}) on {run.device.type}, {'bf16' if run.bf16 else 'fp32'} compute, output in {output_dir}")
        with run.main_first():  # under several ranks rank 0 trains the tokenizer and writes the shards; the others reuse them
            tokenizer, tokenizer_dir = pretraining_tokenizer(cfg)
            if p.objective == "mlm" and tokenizer.mask_token_id is None:
                raise LmforgeError("objective mlm needs a tokenizer with a mask token", where="objective",
                                   fix="train one with tokenizer_train (it adds <mask>), or use objective: clm")
            shards = make_shards(cfg, tokenizer, tokenizer_dir, shards_dir)

        # The windows before the weights: a sequence_len longer than the data fails before any model loads.
        seq_len = cfg.data.sequence_len
        val_fraction = cfg.data.val_set_size or DEFAULT_VAL_FRACTION  # a share (config.checks refuses a row count)
        train = TokenWindows(str(shards_dir), seq_len, "train", val_fraction, seed=t.seed)
        val = TokenWindows(str(shards_dir), seq_len, "val", val_fraction, seed=t.seed)
        eval_batches = _eval_batches(val, t.eval_batch_size or t.micro_batch_size, _collator(cfg, tokenizer, t.seed + 1))
        plan = run.count_steps(len(train))
        run.predict_peak()  # full windows of sequence_len: the planner's assumed batch

        context = seq_len + 1 if p.objective == "clm" else seq_len
        model = run.model(tokenizer, new_model=_new_model(cfg, tokenizer, context) if p.model_config_ else None)
        params, non_embedding = count_parameters(model), count_parameters(model, exclude_embeddings=True)
        flops = flops_per_token(model, seq_len, p.objective)
        tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * seq_len
        total = plan.total_steps
        say(f"{non_embedding:,} non-embedding parameters, {flops / 1e6:,.1f} MFLOPs per token (6N + attention at {seq_len} tokens)")
        say(f"{len(train):,} train / {sum(len(b['input_ids']) for b in eval_batches):,} held-out windows of {seq_len} tokens; "
            f"{total} steps of {tokens_per_step:,} tokens ({total * tokens_per_step / max(len(train) * seq_len, 1):.2f} epochs, "
            f"{flops * total * tokens_per_step:.2e} FLOPs)")

        objective = run.objective()  # clm or mlm, with label smoothing and the output-head choice
        stream = WindowStream(train, t.micro_batch_size, _collator(cfg, tokenizer, t.seed), **run.data_shard)
        outcome = run.train(model, tokenizer, stream, plan, objective=objective,
                            eval_fn=lambda: run.evaluate(model, eval_batches, objective),
                            invariants={"shard_tokens": shards["tokens"]})
        result, eval_start = outcome.result, outcome.eval_start

        # Final numbers (and the sample) in the run's precision, like the step-0 eval they are compared with: a bf16
        # base under an fp32 LoRA adapter cannot run outside the training autocast (a dtype error after the whole run).
        summary: dict[str, Any] = {**run.summary(outcome, model), "objective": p.objective, "parameters": params,
                                   "non_embedding_parameters": non_embedding, "flops_per_token": flops,
                                   "tokens_seen": result.total_tokens, "shards": shards}
        text = p.sample_prompt or sample_text(tokenizer, val[0], p.objective)
        if p.objective == "clm":
            eval_loss = run.evaluate(model, eval_batches, objective)
            targets = np.concatenate([b["input_ids"][:, 1:].reshape(-1).numpy() for b in eval_batches])
            baseline = unigram_entropy(targets)
            summary.update(eval_loss=eval_loss, eval_perplexity=perplexity(eval_loss), unigram_entropy=baseline,
                           unigram_perplexity=perplexity(baseline), eval_tokens=int(len(targets)))
            say(f"held-out loss {eval_loss:.4f} nats/token (perplexity {perplexity(eval_loss):.1f}) vs unigram baseline "
                f"{baseline:.4f} (perplexity {perplexity(baseline):.1f}) on {len(targets):,} tokens; was {eval_start:.4f} at step 0")
            summary["sample"] = run.call(model, clm_sample, tokenizer, text, run.device)
            say(f"sample (greedy) from {text!r}:\n{summary['sample']}")
        else:
            majority_id = most_frequent_token(str(shards_dir), tokenizer.all_special_ids, BASELINE_MAX_TOKENS)
            metrics = run.call(model, mlm_metrics, eval_batches, run.device, majority_id)
            summary.update(eval_loss=metrics["loss"], masked_accuracy=metrics["accuracy"],
                           majority_accuracy=metrics["majority_accuracy"], majority_token=tokenizer.decode([majority_id]),
                           eval_masked_tokens=metrics["masked_tokens"])
            say(f"masked-token accuracy {metrics['accuracy']:.2%} vs most-frequent-token baseline "
                f"{metrics['majority_accuracy']:.2%} (always {summary['majority_token']!r}) on {metrics['masked_tokens']:,} "
                f"masked held-out tokens; loss {metrics['loss']:.4f} (was {eval_start:.4f} at step 0)")
            fills = run.call(model, fill_mask_sample, tokenizer, text, run.device)
            summary["sample"] = {"text": text, "top": fills}
            say(f"fill-mask sample {text!r}: " + ", ".join(f"{w!r} {q:.0%}" for w, q in fills))

        run.publish(model, tokenizer, outcome)
        run.write_summary(summary, outcome)
    say(f"done: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s, {summary['wall_seconds']:.0f}s of training; "
        f"model and tokenizer saved to {output_dir}")
    return summary
