"""`lmforge preprocess`: read, format and tokenize every dataset once into the prepared-data cache.

Preference rows (rl: dpo family, kto, reward_model) and GRPO's prompts (rl: grpo, with its reward functions) are
read, checked and counted the way train reads them; train prepares them again in memory."""

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
    if cfg.rl.rl == "grpo":  # prompts (through their transform) and the reward functions, not SFT examples
        from lmforge.data.prompt_sets import prepare_prompts
        from lmforge.train.rewards import load_reward_functions

        trl = cfg.rl.trl
        rewards = load_reward_functions(trl.reward_funcs or [])
        prompts = prepare_prompts(cfg.data, tokenizer, cfg.training.seed, cfg.flat(), trl.chat_template_kwargs)
        say(f"prompts: {prompts.summary()}; rewards: {', '.join(r.name for r in rewards)}")
        lengths = [len(p.ids) for p in prompts.train + prompts.eval]
        say(f"prompt tokens: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; completions up to "
            f"{trl.max_completion_length} tokens, {trl.num_generations} per prompt (generated while training)")
        return prompts  # type: ignore[return-value]
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
