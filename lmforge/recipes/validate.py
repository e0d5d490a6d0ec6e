"""`lmforge validate`: the config's checks, its warnings and its data files read, all without loading a model."""

from __future__ import annotations

import sys

import yaml

from lmforge.config import LmforgeConfig
from lmforge.data.check import check_data_files
from lmforge.data.sources import local_files
from lmforge.errors import LmforgeError
from lmforge.redact import redact


def check_tokenized(cfg: LmforgeConfig) -> str:
    """The data tokenized the way `train` prepares it, so what train refuses before its weights load (a
    sequence_len that leaves no response token in any example, ...) fails here too, by the same check.
    Nothing is written; a prepared-data cache entry that matches is reused."""
    if cfg.is_pretraining or cfg.data.datasets is None or cfg.model.base_model is None:
        return "tokens: pretraining windows are checked when pretraining starts"
    specs = [*cfg.data.datasets, *(cfg.data.test_datasets or [])]
    if any(local_files(spec.path, spec.ds_type, spec.data_files) is None for spec in specs):
        return "tokens: checked when training (a Hub dataset is read then, not here)"
    from lmforge.data.prepare import prepare
    from lmforge.models.load import config_processor, config_tokenizer
    from lmforge.recipes.console import say

    try:
        tokenizer = config_tokenizer(cfg, say=say)
        # image chats: every image opened and checked, and counted against its placeholders, as train will
        processor = config_processor(cfg, tokenizer) if cfg.model.processor_type else None
    except LmforgeError as exc:  # e.g. a Hub tokenizer while offline: the rows were checked, the tokens cannot be
        return f"tokens: not checked, the tokenizer does not load here ({exc.format()})"
    if cfg.rl.rl == "grpo":  # prompts through their transform, and the reward functions imported, as train does
        from lmforge.data.prompt_sets import prepare_prompts
        from lmforge.train.rewards import load_reward_functions

        load_reward_functions(cfg.rl.trl.reward_funcs or [])
        prompts = prepare_prompts(cfg.data, tokenizer, cfg.training.seed, cfg.flat(), cfg.rl.trl.chat_template_kwargs)
        return f"prompts: {prompts.summary()}"
    if cfg.rl.preference:  # pairs: truncated and too-long rows counted, as train prepares them
        from lmforge.data.preference import prepare_preferences

        pairs = prepare_preferences(cfg.data, tokenizer, cfg.training.seed, kto=cfg.rl.rl == "kto", max_prompt_len=cfg.rl.max_prompt_len)
        s = pairs.stats
        return (f"tokens: {len(pairs.train):,} train / {len(pairs.eval):,} eval pairs at sequence_len {cfg.data.sequence_len}; "
                f"{s.truncated} truncated to fit, {s.too_long_skipped} skipped (the prompt alone fills it), "
                f"{s.identical_skipped} with chosen == rejected skipped")
    data = prepare(cfg.data, tokenizer, cfg.training.seed, save=False, processor=processor)
    return f"tokens: {len(data.train):,} train / {len(data.eval):,} eval examples at sequence_len {cfg.data.sequence_len}"


def run_validate(cfg: LmforgeConfig, location: str, print_config: bool = False) -> None:
    """The checks and a one-line verdict (stderr); with `print_config`, the resolved config (YAML, stdout)."""
    data_lines = check_data_files(cfg)  # a bad row raises here, naming its file:line
    data_lines.append(check_tokenized(cfg))
    if print_config:
        print(yaml.safe_dump(redact(cfg.flat()), sort_keys=False), end="")  # passwords in URIs and *_api_key values masked
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for line in data_lines:
        print(f"# data: {line}", file=sys.stderr)
    warned = f" with {len(cfg.warnings)} warning{'s' * (len(cfg.warnings) != 1)}" if cfg.warnings else ""
    print(f"# {location}: valid{warned}" + ("" if print_config else " (--print-config shows it resolved)"), file=sys.stderr)
