"""`lmforge pretrain`: tokenizer → token shards → new (or pretrained) model → loop → eval vs baseline → output folder.

From scratch (``model_config``) the tokenizer is trained first when ``tokenizer_train`` is set
and its folder holds none yet; shards are written once and a rerun resumes or reuses them.
Continued pretraining (``base_model`` + raw text) runs the same steps with pretrained weights.
At the end the held-out loss is printed next to a baseline that needs no model (CLM: the
unigram entropy of the held-out tokens; MLM: always guessing the most frequent token), so a
user can tell at a glance whether the model learned anything beyond token frequencies.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import LmforgeConfig
from lmforge.recipes.console import say
from lmforge.config.sections import PretrainingSource, TokenizerTrainSpec
from lmforge.data.batching import Batch
from lmforge.data.shards import TokenWindows, iter_shard_tokens, write_shards
from lmforge.data.sources import local_files, read_local
from lmforge.data.tokenizer_train import TokenizerReport, train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.build import build_config, build_model, count_parameters, flops_per_token, resolve_architecture
from lmforge.models.load import fit_embeddings_to_tokenizer, load_model, load_tokenizer, local_model_dir
from lmforge.train.checkpoint import assert_finite, publish_into, save_model_files, write_json
from lmforge.train.loggers import build_loggers
from lmforge.train.loop import Callbacks, LoopSettings, evaluate, train_loop
from lmforge.train.loss import causal_lm_loss
from lmforge.train.objectives import IGNORE_INDEX, PretrainCollator, masked_token_counts, perplexity
from lmforge.train.optimizers import build_optimizer
from lmforge.models.params import set_dropout
from lmforge.train.schedules import build_scheduler, warmup_steps_for
from lmforge.train.signals import stop_on_signals
from lmforge.train.telemetry import peak_memory_mb, pick_device, resolve_bf16

# Held-out windows evaluated at most (evenly spaced): a bigger val split only slows every eval.
EVAL_MAX_WINDOWS = 1024
# Tokens read to find the most frequent token (the MLM baseline); a prefix of the corpus suffices.
BASELINE_MAX_TOKENS = 20_000_000
DEFAULT_VAL_FRACTION = 0.005
TEXT_SUFFIXES = {"", ".txt", ".text", ".md"}


# ----------------------------------------------------------------------------- tokenizer


def format_tokenizer_report(report: TokenizerReport) -> str:
    return (f"tokenizer ({report.backend} {report.model_type}) trained in {report.seconds:.1f}s on "
            f"{report.train_bytes / 1e6:.2f} MB: vocab {report.vocab_size}, {report.tokens_per_word:.3f} tokens/word and "
            f"{report.chars_per_token:.2f} chars/token on {report.heldout_words:,} held-out words, "
            f"round trip {'exact' if report.roundtrip_exact else 'NOT exact'}; saved to {report.out_dir}")


def _local_text_files(sources: list[PretrainingSource]) -> list[str]:
    files: list[str] = []
    for source in sources:
        found = local_files(source.path, None, source.data_files)
        files += [str(f) for f in found or [] if f.suffix.lower() in TEXT_SUFFIXES]
    return files


def tokenizer_spec(cfg: LmforgeConfig | None, flags: dict[str, Any] | None = None) -> tuple[TokenizerTrainSpec, str]:
    """The tokenizer_train settings of a config (if any) with command-line `flags` on top, and its output folder."""
    spec = (cfg.pretrain.tokenizer_train if cfg and cfg.pretrain.tokenizer_train else TokenizerTrainSpec())
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    spec = spec.model_copy(update=given)
    TokenizerTrainSpec.model_validate(spec.model_dump())  # flags get the same checks as config keys
    if not spec.files and cfg and cfg.pretrain.pretraining_dataset:
        spec = spec.model_copy(update={"files": _local_text_files(cfg.pretrain.pretraining_dataset)})
    if not spec.files:
        raise LmforgeError("no text to train the tokenizer on", where="tokenizer_train.files",
                           fix="set tokenizer_train: {files: [...]} (or --files), or local text files in pretraining_dataset")
    out = spec.output_dir or (str(Path(cfg.training.output_dir) / "tokenizer") if cfg else "./tokenizer")
    return spec, out


def run_tokenizer_train(cfg: LmforgeConfig | None, flags: dict[str, Any] | None = None) -> TokenizerReport:
    """`lmforge tokenizer train`: train (or retrain) the tokenizer and print its report."""
    spec, out = tokenizer_spec(cfg, flags)
    say(f"training a {spec.vocab_size}-token {spec.model_type} tokenizer ({spec.backend}) on {len(spec.files or [])} file(s)")
    report = train_tokenizer(spec.files or [], out, spec.vocab_size, spec.model_type, spec.backend,
                             held_out_fraction=spec.held_out_fraction)
    say(format_tokenizer_report(report))
    return report


def _tokenizer(cfg: LmforgeConfig) -> tuple[Any, str | None]:
    """The tokenizer, and its folder when that folder holds a tokenizer.json (what shards need)."""
    from transformers import AutoTokenizer

    if cfg.pretrain.tokenizer_train is not None:
        spec, out = tokenizer_spec(cfg)
        if (Path(out) / "tokenizer.json").is_file():
            say(f"tokenizer: reusing {out} (delete it to train a new one)")
        else:
            run_tokenizer_train(cfg)
        return AutoTokenizer.from_pretrained(out), out
    source = cfg.model.tokenizer_config or cfg.model.base_model
    if source is None:
        raise LmforgeError("model_config needs a tokenizer", where="model_config",
                           fix="set tokenizer_train: {files: [...], vocab_size: N} to train one, or tokenizer_config: FOLDER_OR_HUB_ID")
    tokenizer = load_tokenizer(source, cfg.model.tokenizer_config, cfg.model.trust_remote_code)
    folder = local_model_dir(source, marker="tokenizer_config.json")
    return tokenizer, folder if (Path(folder) / "tokenizer.json").is_file() else None


# ----------------------------------------------------------------------------- data


def _sources(cfg: LmforgeConfig) -> list[PretrainingSource]:
    """pretraining_dataset, or `datasets` entries of type completion (continued pretraining)."""
    if cfg.pretrain.pretraining_dataset:
        return list(cfg.pretrain.pretraining_dataset)
    out = []
    for index, spec in enumerate(cfg.data.datasets or []):
        if spec.type != "completion":
            raise LmforgeError(f"pretraining reads raw text, but this dataset has type {spec.type!r}",
                               where=f"datasets[{index}].type", fix="use type: completion, or list the text under pretraining_dataset")
        out.append(PretrainingSource(path=spec.path, name=spec.name, split=spec.split, text_column=spec.field or "text",
                                     data_files=spec.data_files))
    return out


def _documents(sources: list[PretrainingSource]) -> Iterator[str]:
    """Documents of any mix of sources: a text file is one document, a JSONL/Parquet row or Hub row is one."""
    for source in sources:
        files = local_files(source.path, None, source.data_files)
        texts: Iterable[str]
        if files is None:
            texts = _hub_texts(source)
        else:
            texts = itertools.chain.from_iterable(_file_texts(f, source.text_column) for f in files)
        yield from itertools.islice(texts, source.max_documents)


def _file_texts(path: Path, column: str) -> Iterator[str]:
    if path.suffix.lower() in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    for row in read_local(path):
        values = row.check()
        if column not in values:
            raise LmforgeError(f"column '{column}' is missing", where=row.where,
                               fix=f"set text_column to one of: {', '.join(values)}")
        yield str(values[column])


def _hub_texts(source: PretrainingSource) -> Iterator[str]:
    from datasets import load_dataset

    try:  # streamed: a pretraining corpus need not fit on disk twice, only its shards
        stream = load_dataset(source.path, name=source.name, split=source.split, data_files=source.data_files, streaming=True)
    except Exception as exc:  # datasets raises many types for network and lookup failures
        raise LmforgeError(f"could not open Hub dataset '{source.path}' ({type(exc).__name__}: {exc})",
                           where="pretraining_dataset", fix="check the id, or download it and give local files") from exc
    for row in stream:
        yield str(row[source.text_column])


def make_shards(cfg: LmforgeConfig, tokenizer: Any, tokenizer_dir: str | None, shards_dir: Path) -> dict[str, Any]:
    """Tokenize the pretraining text into shards_dir (resumes an interrupted run, reuses a finished one)."""
    if tokenizer_dir is None:  # a Hub tokenizer: write_shards reads a tokenizer.json from a folder
        tokenizer_dir = str(shards_dir / "tokenizer")
        tokenizer.save_pretrained(tokenizer_dir)
    sources = _sources(cfg)
    all_text_files = all((files := local_files(s.path, None, s.data_files)) is not None
                         and all(f.suffix.lower() in TEXT_SUFFIXES for f in files) and s.max_documents is None
                         for s in sources)
    # Text files resume by byte offset; other sources by the number of documents consumed.
    inputs: Any = [str(f) for s in sources for f in local_files(s.path, None, s.data_files) or []] if all_text_files else _documents(sources)
    report = write_shards(inputs, tokenizer_dir, str(shards_dir), processes=cfg.data.dataset_processes or 1,
                          add_bos=tokenizer.bos_token_id is not None, add_eos=tokenizer.eos_token_id is not None,
                          doc_per=cfg.pretrain.shard_doc_per)
    if report.new_tokens:
        say(f"shards: {report.total_tokens:,} tokens from {report.documents:,} documents in {report.shards} shard(s), "
            f"{report.tokens_per_second:,.0f} tokens/s{' (resumed)' if report.resumed else ''} → {shards_dir}")
    else:
        say(f"shards: reusing {report.total_tokens:,} tokens in {shards_dir}")
    return {"tokens": report.total_tokens, "documents": report.documents, "dir": str(shards_dir)}


def _val_fraction(cfg: LmforgeConfig) -> float:
    v = cfg.data.val_set_size
    if v >= 1:
        raise LmforgeError(f"val_set_size {v} is a row count; pretraining holds out a share of the tokens",
                           where="val_set_size", fix="use a share below 1, e.g. 0.01")
    return v or DEFAULT_VAL_FRACTION


# ----------------------------------------------------------------------------- model


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
    if "max_position_embeddings" not in overrides:
        # Windows must fit the position table (learned in gpt2/bert; rope models only record it).
        config = build_config(spec.architecture, len(tokenizer), spec.preset, overrides, objective, **ids)
        if getattr(config, "max_position_embeddings", context) < context:
            overrides["max_position_embeddings"] = context
    return build_model(spec.architecture, len(tokenizer), spec.preset, overrides, objective, seed=cfg.training.seed, **ids)


def _pretrained_model(cfg: LmforgeConfig, tokenizer: Any) -> Any:
    base = cfg.model.base_model
    assert base is not None
    if cfg.pretrain.objective == "clm":
        model = load_model(base, trust_remote_code=cfg.model.trust_remote_code)
    else:
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_pretrained(local_model_dir(base), trust_remote_code=cfg.model.trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)
    return model


# ----------------------------------------------------------------------------- objectives


def mlm_loss(model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the masked positions only, and how many there were."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    chosen = labels != IGNORE_INDEX
    return F.cross_entropy(logits[chosen].float(), labels[chosen], reduction="sum"), int(chosen.sum())


class _Collate:
    """Windows → batches. MLM uses the first seq_len tokens of a window and never labels position 0:
    the loop counts labels from position 1 (the causal shift), so both objectives divide by the same count."""

    def __init__(self, cfg: LmforgeConfig, tokenizer: Any, seed: int) -> None:
        self.objective = cfg.pretrain.objective
        self.seq_len = cfg.data.sequence_len
        self.inner = PretrainCollator(self.objective, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                      special_ids=tokenizer.all_special_ids, mlm_probability=cfg.pretrain.mlm_probability,
                                      seed=seed)

    def __call__(self, windows: list[torch.Tensor]) -> Batch:
        if self.objective == "clm":
            return self.inner(windows)
        batch = self.inner([w[: self.seq_len] for w in windows])
        batch["labels"][:, 0] = IGNORE_INDEX
        return batch


def _train_batches(windows: Any, size: int, collate: _Collate) -> Iterator[Batch]:
    """Batches over epochs (re-cut and re-shuffled each epoch); the loop stops at total_steps."""
    for epoch in itertools.count():
        windows.set_epoch(epoch)
        for start in range(0, len(windows), size):
            yield collate([windows[i] for i in range(start, min(start + size, len(windows)))])


def _eval_batches(windows: Any, size: int, collate: _Collate) -> list[Batch]:
    """Fixed held-out batches (fixed masks for MLM), so every evaluation compares like with like."""
    picks = np.linspace(0, len(windows) - 1, min(len(windows), EVAL_MAX_WINDOWS)).round().astype(int)
    picks = sorted(set(picks.tolist()))
    return [collate([windows[i] for i in picks[s:s + size]]) for s in range(0, len(picks), size)]


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the tokens' own frequency distribution: the best loss any model
    that ignores context could reach on them, even one fitted to these very tokens."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def _most_frequent_token(shards_dir: Path, special_ids: list[int]) -> int:
    counts = np.zeros(1, dtype=np.int64)
    seen = 0
    for shard in iter_shard_tokens(str(shards_dir)):
        part = np.asarray(shard[: BASELINE_MAX_TOKENS - seen]).astype(np.int64)
        c = np.bincount(part)
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
        seen += len(part)
        if seen >= BASELINE_MAX_TOKENS:
            break
    counts[[i for i in special_ids if i < len(counts)]] = 0  # never a masked target
    return int(counts.argmax())


@torch.no_grad()
def mlm_metrics(model: Any, batches: list[Batch], device: torch.device, majority_id: int) -> dict[str, float]:
    """Masked-token loss and accuracy, and the accuracy of always guessing `majority_id`."""
    model.eval()
    loss_sum, correct, total, majority = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        loss_sum += float(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
        c, n = masked_token_counts(logits, labels)
        correct, total = correct + c, total + n
        majority += int((labels[keep] == majority_id).sum())
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1),
            "majority_accuracy": majority / max(total, 1), "masked_tokens": total}


# ----------------------------------------------------------------------------- samples


@torch.no_grad()
def clm_sample(model: Any, tokenizer: Any, prompt: str, device: torch.device, max_new_tokens: int = 60) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.no_grad()
def fill_mask_sample(model: Any, tokenizer: Any, text: str, device: torch.device, top_k: int = 5) -> list[tuple[str, float]]:
    """The top_k fillers of the first mask token in `text`, with their probabilities."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=device)
    where = (ids[0] == tokenizer.mask_token_id).nonzero()
    if not len(where):
        raise LmforgeError(f"the sample has no {tokenizer.mask_token}", where="sample_prompt",
                           fix=f"write {tokenizer.mask_token} where a word should be filled in")
    probs = model(input_ids=ids).logits[0, int(where[0])].softmax(-1)
    top = probs.topk(top_k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def _default_sample(cfg: LmforgeConfig, tokenizer: Any, val: Any) -> str:
    """A held-out passage: its start to continue (clm), or with one word masked (mlm)."""
    if cfg.pretrain.sample_prompt:
        return cfg.pretrain.sample_prompt
    ids = [int(i) for i in val[0][:24] if int(i) not in tokenizer.all_special_ids]
    if cfg.pretrain.objective == "clm":
        return tokenizer.decode(ids[:12])
    middle = len(ids) // 2
    return tokenizer.decode(ids[:middle]) + tokenizer.mask_token + tokenizer.decode(ids[middle + 1:])


# ----------------------------------------------------------------------------- the recipe


class _Log(Callbacks):
    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)


def run_pretrain(cfg: LmforgeConfig) -> dict[str, Any]:
    """Pretrain as configured; returns the summary (also written to output_dir/summary.json)."""
    started = time.perf_counter()
    t, p = cfg.training, cfg.pretrain
    _check_model_config(cfg)
    torch.manual_seed(t.seed)
    device = pick_device()
    bf16 = resolve_bf16(t.bf16, device)
    output_dir = Path(t.output_dir)
    shards_dir = Path(p.shards_dir or (Path(cfg.data.dataset_prepared_path) / "shards" if cfg.data.dataset_prepared_path
                                       else output_dir / "shards"))
    say(f"pretraining ({p.objective}) on {device.type}, {'bf16' if bf16 else 'fp32'} compute, output in {output_dir}")

    tokenizer, tokenizer_dir = _tokenizer(cfg)
    if p.objective == "mlm" and tokenizer.mask_token_id is None:
        raise LmforgeError("objective mlm needs a tokenizer with a mask token", where="objective",
                           fix="train one with tokenizer_train (it adds <mask>), or use objective: clm")
    shards = make_shards(cfg, tokenizer, tokenizer_dir, shards_dir)

    seq_len = cfg.data.sequence_len
    context = seq_len + 1 if p.objective == "clm" else seq_len
    model = _new_model(cfg, tokenizer, context) if p.model_config_ else _pretrained_model(cfg, tokenizer)
    if t.dropout is not None:
        say(f"dropout {t.dropout} set on {', '.join(set_dropout(model, t.dropout))}")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    params, non_embedding = count_parameters(model), count_parameters(model, exclude_embeddings=True)
    flops = flops_per_token(model, seq_len, p.objective)
    source = f"new {model.config.model_type}" if p.model_config_ else cfg.model.base_model
    say(f"model {source}: {params:,} parameters ({non_embedding:,} non-embedding), {flops / 1e6:,.1f} MFLOPs per "
        f"token (6N + attention at {seq_len} tokens)")

    val_fraction = _val_fraction(cfg)
    train = TokenWindows(str(shards_dir), seq_len, "train", val_fraction, seed=t.seed)
    val = TokenWindows(str(shards_dir), seq_len, "val", val_fraction, seed=t.seed)
    collate = _Collate(cfg, tokenizer, t.seed)
    eval_batches = _eval_batches(val, t.eval_batch_size or t.micro_batch_size, _Collate(cfg, tokenizer, t.seed + 1))
    per_epoch = max(1, math.ceil(len(train) / t.micro_batch_size / t.gradient_accumulation_steps))
    total = t.max_steps or max(1, math.ceil(per_epoch * t.num_epochs))
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * seq_len
    say(f"{len(train):,} train / {sum(len(b['input_ids']) for b in eval_batches):,} held-out windows of {seq_len} tokens; "
        f"{total} steps of {tokens_per_step:,} tokens ({total * tokens_per_step / max(len(train) * seq_len, 1):.2f} epochs, "
        f"{flops * total * tokens_per_step:.2e} FLOPs)")

    loss_fn = causal_lm_loss if p.objective == "clm" else mlm_loss
    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                                t.adam_epsilon, t.sgd_momentum, t.sgd_nesterov)
    warmup = warmup_steps_for(total, t.warmup_steps, t.warmup_ratio)
    scheduler = build_scheduler(optimizer, t.lr_scheduler, total, warmup, t.cosine_min_lr_ratio or 0.0)
    settings = LoopSettings(
        total_steps=total, grad_accum=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_every=t.eval_steps or (max(1, per_epoch // t.evals_per_epoch) if t.evals_per_epoch else None),
        nan_policy=t.nan_policy, device=device, autocast_dtype=torch.bfloat16 if bf16 else None,
    )

    def eval_fn() -> float:
        return evaluate(model, iter(eval_batches), settings, loss_fn)

    resolved = cfg.flat()
    loggers = build_loggers(cfg.logging, str(output_dir), resolved)
    callbacks = _Log(loggers)
    eval_start = eval_fn()
    say(f"held-out loss at step 0: {eval_start:.4f}")
    try:
        with stop_on_signals(callbacks):
            result = train_loop(model, optimizer, scheduler, _train_batches(train, t.micro_batch_size, collate),
                                settings, eval_fn, callbacks, loss_fn)
    finally:
        for logger in loggers:
            logger.close()
    if result.stop_reason == "interrupted":
        say(f"stopped at step {result.steps}; saving the weights as they are")

    # Final numbers in fp32, whatever the training compute was.
    summary: dict[str, Any] = {"objective": p.objective, "steps": result.steps, "stop_reason": result.stop_reason,
                               "parameters": params, "non_embedding_parameters": non_embedding,
                               "flops_per_token": flops, "tokens_per_s": result.tokens_per_s,
                               "train_seconds": result.train_seconds, "tokens_seen": result.total_tokens,
                               "shards": shards, "eval_loss_start": eval_start,
                               "final_train_loss": result.train_history[-1][1] if result.train_history else None}
    if p.objective == "clm":
        eval_loss = evaluate(model, iter(eval_batches), LoopSettings(total_steps=0, device=device), causal_lm_loss)
        targets = np.concatenate([b["input_ids"][:, 1:].reshape(-1).numpy() for b in eval_batches])
        baseline = unigram_entropy(targets)
        summary.update(eval_loss=eval_loss, eval_perplexity=perplexity(eval_loss), unigram_entropy=baseline,
                       unigram_perplexity=perplexity(baseline), eval_tokens=int(len(targets)))
        say(f"held-out loss {eval_loss:.4f} nats/token (perplexity {perplexity(eval_loss):.1f}) vs unigram baseline "
            f"{baseline:.4f} (perplexity {perplexity(baseline):.1f}) on {len(targets):,} tokens; was {eval_start:.4f} at step 0")
        prompt = _default_sample(cfg, tokenizer, val)
        summary["sample"] = clm_sample(model, tokenizer, prompt, device)
        say(f"sample (greedy) from {prompt!r}:\n{summary['sample']}")
    else:
        majority_id = _most_frequent_token(shards_dir, tokenizer.all_special_ids)
        metrics = mlm_metrics(model, eval_batches, device, majority_id)
        summary.update(eval_loss=metrics["loss"], masked_accuracy=metrics["accuracy"],
                       majority_accuracy=metrics["majority_accuracy"], majority_token=tokenizer.decode([majority_id]),
                       eval_masked_tokens=metrics["masked_tokens"])
        say(f"masked-token accuracy {metrics['accuracy']:.2%} vs most-frequent-token baseline "
            f"{metrics['majority_accuracy']:.2%} (always {summary['majority_token']!r}) on {metrics['masked_tokens']:,} "
            f"masked held-out tokens; loss {metrics['loss']:.4f} (was {eval_start:.4f} at step 0)")
        text = _default_sample(cfg, tokenizer, val)
        fills = fill_mask_sample(model, tokenizer, text, device)
        summary["sample"] = {"text": text, "top": fills}
        say(f"fill-mask sample {text!r}: " + ", ".join(f"{w!r} {q:.0%}" for w, q in fills))

    assert_finite(model, result.steps)
    model.to("cpu")
    publish_into(output_dir, lambda tmp: save_model_files(model, tokenizer, resolved, tmp))
    summary["wall_seconds"] = time.perf_counter() - started
    summary["peak_memory_mb"] = peak_memory_mb(device)
    write_json(output_dir / "summary.json", summary)
    say(f"done: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s, {summary['wall_seconds']:.0f}s in all; "
        f"model and tokenizer saved to {output_dir}")
    return summary

