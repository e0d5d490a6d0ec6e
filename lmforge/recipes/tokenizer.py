"""`lmforge tokenizer train`, and the tokenizer pretraining trains first or reuses.

The settings come from a config's tokenizer_train (with command-line flags on top), the text from its
files or else the local text files of pretraining_dataset; the report says how well it compresses
held-out text and whether it round-trips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config import LmforgeConfig
from lmforge.config.sections import TokenizerTrainSpec
from lmforge.data.sources import text_files
from lmforge.data.tokenizer_train import TokenizerReport, train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.load import config_tokenizer, local_model_dir
from lmforge.recipes.console import say


def format_tokenizer_report(report: TokenizerReport) -> str:
    return (f"tokenizer ({report.backend} {report.model_type}) trained in {report.seconds:.1f}s on "
            f"{report.train_bytes / 1e6:.2f} MB: vocab {report.vocab_size}, {report.tokens_per_word:.3f} tokens/word and "
            f"{report.chars_per_token:.2f} chars/token on {report.heldout_words:,} held-out words, "
            f"round trip {'exact' if report.roundtrip_exact else 'NOT exact'}; saved to {report.out_dir}")


def tokenizer_spec(cfg: LmforgeConfig | None, flags: dict[str, Any] | None = None) -> tuple[TokenizerTrainSpec, str]:
    """The tokenizer_train settings of a config (if any) with command-line `flags` on top, and its output folder."""
    spec = (cfg.pretrain.tokenizer_train if cfg and cfg.pretrain.tokenizer_train else TokenizerTrainSpec())
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    spec = spec.model_copy(update=given)
    TokenizerTrainSpec.model_validate(spec.model_dump())  # flags get the same checks as config keys
    if not spec.files and cfg and cfg.pretrain.pretraining_dataset:
        spec = spec.model_copy(update={"files": text_files(cfg.pretrain.pretraining_dataset)})
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


def pretraining_tokenizer(cfg: LmforgeConfig) -> tuple[Any, str | None]:
    """Pretraining's tokenizer (trained first with tokenizer_train unless its folder holds one), and its
    folder when that folder holds a tokenizer.json the shards can use as is."""
    if cfg.pretrain.tokenizer_train is not None:
        spec, out = tokenizer_spec(cfg)
        if (Path(out) / "tokenizer.json").is_file():
            say(f"tokenizer: reusing {out} (delete it to train a new one)")
        else:
            run_tokenizer_train(cfg)
        source: str | None = out
    else:
        source = None
    tokenizer = config_tokenizer(cfg, source, say)
    if cfg.model.special_tokens:  # tokens added on top of the folder's: the shards need this very tokenizer
        return tokenizer, None
    folder = source or local_model_dir(cfg.model.tokenizer_config or cfg.model.base_model or "", marker="tokenizer_config.json")
    return tokenizer, folder if (Path(folder) / "tokenizer.json").is_file() else None
