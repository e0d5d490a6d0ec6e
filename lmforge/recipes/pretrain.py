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
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import LmforgeConfig
from lmforge.config.sections import PretrainingSource, TokenizerTrainSpec
from lmforge.data.batching import Batch
from lmforge.data.prepare import IGNORE_INDEX
from lmforge.data.shards import TokenWindows, iter_shard_tokens, write_shards
from lmforge.data.compressed import data_suffix, guard, open_text
from lmforge.data.sources import local_files, read_local
from lmforge.data.tokenizer_train import TokenizerReport, train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.build import build_config, build_model, count_parameters, flops_per_token, resolve_architecture
from lmforge.models.load import local_model_dir
from lmforge.recipes.console import say
from lmforge.recipes.training import TrainingRun
from lmforge.train.loss import causal_lm_loss
from lmforge.train.objectives import PretrainCollator, masked_token_counts, perplexity
from lmforge.train.stream import WindowStream

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
        files += [str(f) for f in found or [] if data_suffix(f) in TEXT_SUFFIXES]
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


def _tokenizer(cfg: LmforgeConfig, run: TrainingRun) -> tuple[Any, str | None]:
    """The tokenizer, and its folder when that folder holds a tokenizer.json the shards can use as is."""
    if cfg.pretrain.tokenizer_train is not None:
        spec, out = tokenizer_spec(cfg)
        if (Path(out) / "tokenizer.json").is_file():
            say(f"tokenizer: reusing {out} (delete it to train a new one)")
        else:
            run_tokenizer_train(cfg)
        source: str | None = out
    else:
        source = None
    tokenizer = run.tokenizer(source)
    if cfg.model.special_tokens:  # tokens added on top of the folder's: the shards need this very tokenizer
        return tokenizer, None
    folder = source or local_model_dir(cfg.model.tokenizer_config or cfg.model.base_model or "", marker="tokenizer_config.json")
    return tokenizer, folder if (Path(folder) / "tokenizer.json").is_file() else None


# ----------------------------------------------------------------------------- data


def _sources(cfg: LmforgeConfig) -> list[PretrainingSource]:
    """pretraining_dataset, or `datasets` entries (of type completion: config.checks refuses others)."""
    if cfg.pretrain.pretraining_dataset:
        return list(cfg.pretrain.pretraining_dataset)
    return [PretrainingSource(path=spec.path, name=spec.name, split=spec.split, text_column=spec.field or "text",
                              data_files=spec.data_files) for spec in cfg.data.datasets or []]


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
    if data_suffix(path) in TEXT_SUFFIXES:
        with guard(path), open_text(path, errors="replace") as handle:
            yield handle.read()
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
                         and all(data_suffix(f) in TEXT_SUFFIXES for f in files) and s.max_documents is None
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
    return cfg.data.val_set_size or DEFAULT_VAL_FRACTION  # a share (config.checks refuses a row count)


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


# ----------------------------------------------------------------------------- objectives


def mlm_loss(model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the masked positions only, and how many there were."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    chosen = labels != IGNORE_INDEX
    return F.cross_entropy(logits[chosen].float(), labels[chosen], reduction="sum"), int(chosen.sum())


def _batch_seed(seed: int, epoch: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, start]).generate_state(1)[0])


class _Collate:
    """Windows → batches. MLM uses the first seq_len tokens of a window and never labels position 0:
    the loop counts labels from position 1 (the causal shift), so both objectives divide by the same count.

    Given a `key` (epoch, first window), MLM masks are drawn from a generator seeded by it, so the
    masks of a batch are a pure function of the seed and the data position, and a resumed run
    draws the same ones. Without a key (the fixed eval batches) the generator runs on.
    """

    def __init__(self, cfg: LmforgeConfig, tokenizer: Any, seed: int) -> None:
        self.objective = cfg.pretrain.objective
        self.seq_len = cfg.data.sequence_len
        self.seed = seed
        self.inner = PretrainCollator(self.objective, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                      special_ids=tokenizer.all_special_ids, mlm_probability=cfg.pretrain.mlm_probability,
                                      seed=seed)

    def __call__(self, windows: list[torch.Tensor], key: tuple[int, int] | None = None) -> Batch:
        if self.objective == "clm":
            return self.inner(windows)
        if key is not None:
            self.inner.generator.manual_seed(_batch_seed(self.seed, *key))
        batch = self.inner([w[: self.seq_len] for w in windows])
        batch["labels"][:, 0] = IGNORE_INDEX
        return batch


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


# A checkpoint's data position means the same windows and masks only under the same settings.
RESUME_INVARIANTS = ("seed", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "objective",
                     "mlm_probability", "val_set_size")


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
            tokenizer, tokenizer_dir = _tokenizer(cfg, run)
            if p.objective == "mlm" and tokenizer.mask_token_id is None:
                raise LmforgeError("objective mlm needs a tokenizer with a mask token", where="objective",
                                   fix="train one with tokenizer_train (it adds <mask>), or use objective: clm")
            shards = make_shards(cfg, tokenizer, tokenizer_dir, shards_dir)

        # The windows before the weights: a sequence_len longer than the data fails before any model loads.
        seq_len = cfg.data.sequence_len
        val_fraction = _val_fraction(cfg)
        train = TokenWindows(str(shards_dir), seq_len, "train", val_fraction, seed=t.seed)
        val = TokenWindows(str(shards_dir), seq_len, "val", val_fraction, seed=t.seed)
        eval_batches = _eval_batches(val, t.eval_batch_size or t.micro_batch_size, _Collate(cfg, tokenizer, t.seed + 1))
        plan = run.plan(len(train))
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

        chunks = cfg.training.chunked_cross_entropy_num_chunks if cfg.training.chunked_cross_entropy else 1
        clm_loss = partial(causal_lm_loss, loss_chunks=chunks) if chunks > 1 else causal_lm_loss
        loss_fn = clm_loss if p.objective == "clm" else mlm_loss
        stream = WindowStream(train, t.micro_batch_size, _Collate(cfg, tokenizer, t.seed), **run.data_shard)
        flat = cfg.flat()
        invariants = {**{k: flat.get(k) for k in RESUME_INVARIANTS}, "shard_tokens": shards["tokens"]}
        outcome = run.train(model, tokenizer, stream, plan, loss_fn=loss_fn,
                            eval_fn=lambda: run.evaluate(model, eval_batches, loss_fn), invariants=invariants)
        result, eval_start = outcome.result, outcome.eval_start

        # Final numbers (and the sample) in the run's precision, like the step-0 eval they are compared with: a bf16
        # base under an fp32 LoRA adapter cannot run outside the training autocast (a dtype error after the whole run).
        summary: dict[str, Any] = {**run.summary(outcome, model), "objective": p.objective, "parameters": params,
                                   "non_embedding_parameters": non_embedding, "flops_per_token": flops,
                                   "tokens_seen": result.total_tokens, "shards": shards}
        if p.objective == "clm":
            eval_loss = run.evaluate(model, eval_batches, causal_lm_loss)
            targets = np.concatenate([b["input_ids"][:, 1:].reshape(-1).numpy() for b in eval_batches])
            baseline = unigram_entropy(targets)
            summary.update(eval_loss=eval_loss, eval_perplexity=perplexity(eval_loss), unigram_entropy=baseline,
                           unigram_perplexity=perplexity(baseline), eval_tokens=int(len(targets)))
            say(f"held-out loss {eval_loss:.4f} nats/token (perplexity {perplexity(eval_loss):.1f}) vs unigram baseline "
                f"{baseline:.4f} (perplexity {perplexity(baseline):.1f}) on {len(targets):,} tokens; was {eval_start:.4f} at step 0")
            prompt = _default_sample(cfg, tokenizer, val)
            summary["sample"] = run.call(model, clm_sample, tokenizer, prompt, run.device)
            say(f"sample (greedy) from {prompt!r}:\n{summary['sample']}")
        else:
            majority_id = _most_frequent_token(shards_dir, tokenizer.all_special_ids)
            metrics = run.call(model, mlm_metrics, eval_batches, run.device, majority_id)
            summary.update(eval_loss=metrics["loss"], masked_accuracy=metrics["accuracy"],
                           majority_accuracy=metrics["majority_accuracy"], majority_token=tokenizer.decode([majority_id]),
                           eval_masked_tokens=metrics["masked_tokens"])
            say(f"masked-token accuracy {metrics['accuracy']:.2%} vs most-frequent-token baseline "
                f"{metrics['majority_accuracy']:.2%} (always {summary['majority_token']!r}) on {metrics['masked_tokens']:,} "
                f"masked held-out tokens; loss {metrics['loss']:.4f} (was {eval_start:.4f} at step 0)")
            text = _default_sample(cfg, tokenizer, val)
            fills = run.call(model, fill_mask_sample, tokenizer, text, run.device)
            summary["sample"] = {"text": text, "top": fills}
            say(f"fill-mask sample {text!r}: " + ", ".join(f"{w!r} {q:.0%}" for w, q in fills))

        run.publish(model, tokenizer, outcome)
        run.write_summary(summary, outcome)
    say(f"done: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s, {summary['wall_seconds']:.0f}s of training; "
        f"model and tokenizer saved to {output_dir}")
    return summary
