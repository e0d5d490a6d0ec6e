"""`lmforge preprocess`: read, format and tokenize every dataset and report what it holds."""

from __future__ import annotations

from lmforge.config import LmforgeConfig
from lmforge.data.prepare import prepare
from lmforge.models.load import load_tokenizer


def run_preprocess(cfg: LmforgeConfig) -> None:
    tokenizer = load_tokenizer(cfg.model.base_model, cfg.model.tokenizer_config, cfg.model.trust_remote_code)
    data = prepare(cfg.data, tokenizer, cfg.training.seed)
    print(f"[lmforge] {data.stats.summary()}")
    print(f"[lmforge] {len(data.train)} train / {len(data.eval)} eval examples")
