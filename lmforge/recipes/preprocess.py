"""`lmforge preprocess`: read, format and tokenize every dataset once into the prepared-data cache."""

from __future__ import annotations

import time

from lmforge.config import LmforgeConfig
from lmforge.data.batching import packing_efficiency
from lmforge.data.examples import PreparedData
from lmforge.data.prepare import prepare
from lmforge.models.load import config_processor, config_tokenizer
from lmforge.recipes.console import say


def run_preprocess(cfg: LmforgeConfig) -> PreparedData:
    tokenizer = config_tokenizer(cfg, say=say)  # the tokenizer train uses: the same prepared-data cache key
    # image chats (processor_type): every image read and checked; they are not cached (prepared per run)
    processor = config_processor(cfg, tokenizer) if cfg.model.processor_type else None
    started = time.perf_counter()
    if cfg.rl.preference:  # preference rows are checked and counted here; train prepares them again in memory
        from lmforge.data.preference import prepare_preferences, report_lines

        pairs = prepare_preferences(cfg.data, tokenizer, cfg.training.seed, kto=cfg.rl.rl == "kto", max_prompt_len=cfg.rl.max_prompt_len)
        for line in report_lines(pairs.stats):
            say(line)
        return pairs  # type: ignore[return-value]
    data = prepare(cfg.data, tokenizer, cfg.training.seed, save=True, processor=processor)
    seconds = time.perf_counter() - started
    say(f"{data.stats.summary()}")
    say(f"{len(data.train)} train / {len(data.eval)} eval examples in {seconds:.1f}s ({data.stats.tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    for line in data.stats.bad_examples[:5]:
        say(f"skipped: {line}")
    if cfg.data.sample_packing:
        efficiency, rows = packing_efficiency([len(e) for e in data.train], cfg.data.sequence_len, cfg.training.seed)
        say(f"sample packing: {rows} rows of {cfg.data.sequence_len} tokens, {efficiency:.1%} filled")
    return data
