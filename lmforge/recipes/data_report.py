"""`lmforge data report CONFIG`: a Markdown + PNG quality report of the datasets, in output_dir."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import LmforgeConfig
from lmforge.data.quality import build_report, write_report
from lmforge.models.load import config_tokenizer
from lmforge.recipes.console import say


def run_data_report(cfg: LmforgeConfig) -> Path:
    tokenizer = config_tokenizer(cfg, say=say)
    report = build_report(cfg.data, tokenizer, cfg.training.seed)
    md, png = write_report(report, cfg.training.output_dir)
    print(report.markdown(png.name if png else None), end="")
    say(f"report written to {md}" + (f" and {png}" if png else ""))
    return md
