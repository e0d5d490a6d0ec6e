"""`lmforge validate`: the config resolved, its warnings, and its data files read, all without loading a model."""

from __future__ import annotations

import sys

import yaml

from lmforge.config import LmforgeConfig
from lmforge.data.check import check_data_files
from lmforge.redact import redact


def run_validate(cfg: LmforgeConfig, location: str) -> None:
    """Print the resolved config (YAML, stdout); warnings and what the data check read (stderr)."""
    data_lines = check_data_files(cfg)  # a bad row raises here, naming its file:line
    print(yaml.safe_dump(redact(cfg.flat()), sort_keys=False), end="")  # passwords in URIs and *_api_key values masked
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for line in data_lines:
        print(f"# data: {line}", file=sys.stderr)
    print(f"# {location}: valid", file=sys.stderr)
