"""`lmforge data report CONFIG`: a Markdown + PNG quality report of the datasets, in output_dir."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import LmforgeConfig
from lmforge.data.quality import build_report, write_report
from lmforge.models.load import config_tokenizer
from lmforge.recipes.console import say


def run_data_report(cfg: LmforgeConfig) -> Path:
    tokenizer = config_tokenizer(cfg, say=say)
    if cfg.rl.preference:  # preference rows: counts (skipped, truncated) and the chosen / rejected answer-length histograms
        from lmforge.atomic import write_text
        from lmforge.data.preference import prepare_preferences, report_lines

        data = prepare_preferences(cfg.data, tokenizer, cfg.training.seed, kto=cfg.rl.rl == "kto", max_prompt_len=cfg.rl.max_prompt_len)
        text = "# Preference data report\n\n```\n" + "\n".join(report_lines(data.stats)) + "\n```\n"
        md = Path(cfg.training.output_dir) / "data_report.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        write_text(md, text)
        print(text, end="")
        say(f"report written to {md}")
        return md
    report = build_report(cfg.data, tokenizer, cfg.training.seed)
    md, png = write_report(report, cfg.training.output_dir)
    print(report.markdown(png.name if png else None), end="")
    say(f"report written to {md}" + (f" and {png}" if png else ""))
    return md
