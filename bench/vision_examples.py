"""Census of axolotl's image-text example configs (those with `processor_type`): does `lmforge validate` take each?

For every YAML under axolotl's examples/ that sets processor_type, the model family is read from its base_model's
name, and transformers is asked whether it can build that family offline (its image-text-to-text class from a
default config, on the meta device: no weights, no network). The config is then validated by lmforge with
`base_model` swapped to the tiny LLaVA that `scripts/build_tiny_vlm.py` builds (the one family whose processor
lmforge can assemble offline: the others need their own tokenizer files from the Hub) and `datasets` swapped to
the shipped `data/digits_vl/train.jsonl`; everything else as axolotl wrote it. Validation opens every image,
so the data path is exercised too. Sockets are blocked: nothing may reach the network.

    git --git-dir=/path/to/axolotl.git archive HEAD examples | tar -x -C /tmp/axolotl   # or a checkout
    .venv/bin/python bench/vision_examples.py /tmp/axolotl

Prints one markdown row per config (family, buildable offline, validate's verdict) and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import socket
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# base_model name pattern → transformers model type of its family (first match wins)
FAMILIES = (
    (r"llava", "llava"), (r"smolvlm", "smolvlm"), (r"qwen2\.5-vl", "qwen2_5_vl"), (r"qwen2-vl", "qwen2_vl"),
    (r"qwen3\.5-.*a3b", "qwen3_5_moe"), (r"qwen3\.5", "qwen3_5"), (r"gemma-3n", "gemma3n"), (r"gemma-3", "gemma3"),
    (r"gemma-4", "gemma4"), (r"llama-3\.2-.*vision", "mllama"), (r"llama-4", "llama4"), (r"pixtral", "llava"),
    (r"mistral-small-4|mistral-medium", "mistral3"), (r"mistral-small|magistral|ministral", "mistral3"),
    (r"internvl", "internvl"), (r"glm-4\.6v", "glm46v"), (r"paddleocr-vl", "paddleocr_vl"), (r"lfm2-vl", "lfm2_vl"),
    (r"voxtral", "voxtral"),
)


def family(base_model: str) -> str:
    name = base_model.lower()
    return next((kind for pattern, kind in FAMILIES if re.search(pattern, name)), "unknown")


def buildable(model_type: str) -> str:
    """'yes', or why transformers cannot build an image-text model of this family offline."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type))
        return "yes"
    except Exception as exc:  # noqa: BLE001 (the reason is the census's answer)
        text = str(exc).strip()
        reason = (text.splitlines()[-1] if isinstance(exc, ImportError) else text.splitlines()[0]) if text else type(exc).__name__
        if "Unrecognized configuration class" in reason:
            reason = "no image-text-to-text class (audio-text model)" if model_type == "voxtral" else "no image-text-to-text class"
        return f"no: {type(exc).__name__}: {reason[:90]}"


def validate(path: Path) -> tuple[bool, str]:
    from lmforge import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["validate", str(path)])
    lines = [line for line in err.getvalue().splitlines() if line.startswith(("error:", "#"))]
    verdict = next((line for line in lines if line.startswith("error:")), None) or next(
        (line for line in lines if "valid" in line), "no verdict")
    return code == 0, verdict.replace(str(path.parent) + "/", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("axolotl", help="a folder holding axolotl's examples/ (a checkout or an archive)")
    args = parser.parse_args()
    examples = sorted(p for p in Path(args.axolotl, "examples").rglob("*.y*ml") if "processor_type" in p.read_text())
    if not examples:
        parser.error(f"no processor_type configs under {args.axolotl}/examples")

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError("network blocked by bench/vision_examples.py")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / "tiny-llava"
        import importlib.util

        spec = importlib.util.spec_from_file_location("build_tiny_vlm", REPO / "scripts" / "build_tiny_vlm.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        builder.build_tiny_vlm(tiny)
        print("| config | family | transformers builds it offline | lmforge validate (tiny LLaVA, digits_vl) |")
        print("| --- | --- | --- | --- |")
        passed = 0
        for path in examples:
            config = yaml.safe_load(path.read_text())
            kind = family(str(config.get("base_model", "")))
            config["base_model"] = str(tiny)
            config["datasets"] = [{"path": str(REPO / "data" / "digits_vl" / "train.jsonl"), "type": "chat_template"}]
            config.pop("test_datasets", None)
            config["output_dir"] = str(Path(tmp) / "out")
            target = Path(tmp) / path.name
            target.write_text(yaml.safe_dump(config, sort_keys=False))
            ok, verdict = validate(target)
            passed += ok
            rel = path.relative_to(Path(args.axolotl, "examples"))
            print(f"| {rel} | {kind} | {buildable(kind) if kind != 'unknown' else 'unknown family'} | {verdict.replace('|', '/')} |")
    print(f"\n{passed} of {len(examples)} validate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
