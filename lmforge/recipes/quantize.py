"""`lmforge quantize CONFIG`: the trained model quantized for real with torchao, as its `qat:` settings trained it
(axolotl's `axolotl quantize`)."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import LmforgeConfig
from lmforge.errors import LmforgeError
from lmforge.models.load import load_model, load_tokenizer
from lmforge.recipes.console import say


def run_quantize(cfg: LmforgeConfig, model: str | None = None, output: str | None = None) -> Path:
    """Quantize `model` (default: the config's output_dir, where training saved it) into `output`
    (default: OUTPUT_DIR/quantized); returns that folder."""
    from lmforge.atomic import atomic_dir
    from lmforge.models.qat import quantize_for_saving

    spec = cfg.quantization.qat
    if spec is None:
        raise LmforgeError("lmforge quantize quantizes with the config's qat: settings, and it has none", where="qat",
                           fix="add qat: {weight_dtype: int4, activation_dtype: int8, group_size: 32}")
    source = model or cfg.training.output_dir
    if not (Path(source) / "config.json").is_file():
        raise LmforgeError(f"no trained model in {source}", where="--model" if model else "output_dir",
                           fix="train first (lmforge train CONFIG), or pass --model FOLDER")
    target = Path(output or Path(cfg.training.output_dir) / "quantized")
    tokenizer = load_tokenizer(source)
    quantized = quantize_for_saving(load_model(source), spec)

    def write(tmp: Path) -> None:
        quantized.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(target, write)
    say(f"quantized {source} (int4 weights in groups of {spec.group_size}, int8 dynamic activations) into {target}")
    return target
