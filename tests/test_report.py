"""`lmforge data report`: counts, duplicates, overlap and label share, as Markdown and PNG."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from conftest import ARITHMETIC, tiny_config, write_config, write_jsonl
from lmforge.config.sections import DataSection
from lmforge.data.quality import build_report, write_report


def test_report_counts_duplicates_overlap_and_writes_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = ARITHMETIC[:8] + [ARITHMETIC[0]] + [{**ARITHMETIC[1], "output": ARITHMETIC[1]["output"] + " !"}] + [{"instruction": "", "output": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    test = write_jsonl(tmp_path / "t.jsonl", ARITHMETIC[2:4] + ARITHMETIC[15:16])
    data = DataSection(datasets=[{"path": str(path)}], test_datasets=[{"path": str(test)}], skip_bad_rows=True, sequence_len=64)
    report = build_report(data, tok, seed=0)
    assert report.per_source[str(path)]["rows"] == 11 and report.per_source[str(path)]["examples"] == 10
    assert report.stats.bad_rows == 1 and report.empty_fields["instruction"] == 1 and report.empty_fields["input"] == 10
    assert report.exact_duplicates == 1 and report.near_duplicates == 1
    assert report.overlap == 2 and report.eval_rows == 3
    md, png = write_report(report, tmp_path / "out")
    text = md.read_text()
    assert "exact duplicate examples: 1" in text and "train/eval overlap: 2 of 3" in text and "bad rows skipped: 1" in text
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_data_report(tmp_path: Path, tiny_model_dir: Path, alpaca_file: Path) -> None:
    from lmforge.cli import main

    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"))
    assert main(["data", "report", str(config)]) == 0
    assert (tmp_path / "out" / "data_report.md").is_file()
