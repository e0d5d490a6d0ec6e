"""Census of axolotl's image-text example configs (those with `processor_type`): validate, then train 2 steps.

For every YAML under axolotl's examples/ that sets processor_type, the model family is read from its base_model's
name (and chat_template), and `scripts/build_tiny_vlm.py` builds a tiny random-weight model of that family with the
family's own processor class (a word-level tokenizer carrying the family's special tokens, tiny image sizes), saved
with safetensors. Where transformers cannot build the family here (its processor needs torchvision, its model needs
timm, it takes no images), the reason is printed and the tiny LLaVA stands in, so the config's keys are still
checked. The config is validated by lmforge with `base_model` swapped to that model and `datasets` to the shipped
digits (every image opened), then `lmforge train` runs 2 steps of it in a subprocess (16 rows, micro_batch_size 1,
sequence_len 256 at most); everything else as axolotl wrote it. Sockets are blocked: nothing may reach the network.

    git --git-dir=/path/to/axolotl.git archive HEAD examples | tar -x -C /tmp/axolotl   # or a checkout
    .venv/bin/python bench/vision_examples.py /tmp/axolotl

Prints one markdown row per config (family, the tiny model it ran on, validate's and train's verdicts) and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "bench"))

from axolotl_e2e import MISTRAL_COMMON_VISION, one_line, tiny_mistral_builder  # noqa: E402

# base_model name pattern → transformers model type of its family (first match wins)
FAMILIES = (
    (r"llava", "llava"), (r"smolvlm", "smolvlm"), (r"qwen2\.5-vl", "qwen2_5_vl"), (r"qwen2-vl", "qwen2_vl"),
    (r"qwen3\.5-.*a3b", "qwen3_5_moe"), (r"qwen3\.5", "qwen3_5"), (r"gemma-3n", "gemma3n"), (r"gemma-3", "gemma3"),
    (r"gemma-4", "gemma4"), (r"llama-3\.2-.*vision", "mllama"), (r"llama-4", "llama4"), (r"pixtral", "pixtral"),
    (r"mistral-small-4|mistral-medium", "mistral3"), (r"mistral-small|magistral|ministral", "mistral3"),
    (r"internvl", "internvl"), (r"glm-4\.6v", "glm46v"), (r"paddleocr-vl", "paddleocr_vl"), (r"lfm2-vl", "lfm2_vl"),
    (r"voxtral", "voxtral"),
)


def family(base_model: str, chat_template: str | None = None) -> str:
    """The transformers model type of a config's model family ("pixtral": LLaVA with a Pixtral tower)."""
    if chat_template == "gemma4_unified":
        return "gemma4_unified"
    name = base_model.lower()
    return next((kind for pattern, kind in FAMILIES if re.search(pattern, name)), "unknown")


def first_line(exc: BaseException) -> str:
    """The reason in an exception: transformers' "X requires the timm library ..." as "X needs timm"."""
    text = str(exc).strip()
    missing = re.search(r"(\w+) requires the (\w+) library", text)
    if missing:
        return f"{missing.group(1)} needs {missing.group(2).lower()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__).strip("'")


def model_builds(model_type: str) -> str:
    """'yes', or why transformers cannot build this family's image-text model class (default config, meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    kind = "llava" if model_type == "pixtral" else model_type
    try:
        with torch.device("meta"):
            AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind))
        return "yes"
    except Exception as exc:  # noqa: BLE001 (the reason is the census's answer)
        text = str(exc).strip()
        if "Unrecognized configuration class" in text:
            return "no: no image-text-to-text class" + (" (audio-text model)" if kind == "voxtral" else "")
        return f"no: {first_line(exc)[:90]}"


class TinyModels:
    """One tiny model per family, built once; the tiny LLaVA stands in where a family cannot be built here."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.built = folder, {}
        self.builder = _load_builder()

    def get(self, kind: str) -> tuple[Path, str]:
        """(model folder, what it is: "tiny KIND", or "tiny LLaVA: REASON the family's own could not be built")."""
        if kind == MISTRAL_COMMON_VISION and kind not in self.built:  # tokenizer_use_mistral_common: images by mistral-common
            tiny_mistral_builder().build_tiny_mistral3(self.folder / kind)
            self.built[kind] = (self.folder / kind, "tiny mistral3 with tekken.json (images encoded by mistral-common)")
        if kind not in self.built and (built := model_builds(kind)) != "yes":
            self.built[kind] = (self.get("llava")[0], f"tiny llava; {kind} not built: {built.removeprefix('no: ')}")
        if kind not in self.built:
            try:
                self.builder.build_tiny_family(kind, self.folder / kind)
                self.built[kind] = (self.folder / kind, f"tiny {kind}")
            except Exception as exc:  # noqa: BLE001 (the reason is the census's answer)
                self.built[kind] = (self.get("llava")[0], f"tiny llava; {kind} not built: {first_line(exc)}")
        return self.built[kind]


def _load_builder():  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_vlm", REPO / "scripts" / "build_tiny_vlm.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def validate(path: Path) -> tuple[bool, str]:
    from lmforge import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["validate", str(path)])
    lines = [line for line in err.getvalue().splitlines() if line.startswith(("error:", "#"))]
    verdict = next((line for line in lines if line.startswith("error:")), None) or next(
        (line for line in lines if "valid" in line), "no verdict")
    verdict = re.sub(r"^# \S+: | \(--print-config shows it resolved\)", "", verdict.replace(str(path.parent) + "/", ""))
    return code == 0, verdict.replace(f"{path.name}:", "line ")


def train_two_steps(path: Path, work: Path) -> tuple[bool, str, float]:
    """`lmforge train` in this process (a fresh Python per config costs more than the 2 steps on a small machine)."""
    from lmforge import cli

    start = time.perf_counter()
    output = io.StringIO()
    try:
        with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
            code = cli.main(["train", str(path)])
    except Exception as exc:  # noqa: BLE001 (a traceback is a finding: the CLI should have said one line)
        code, output = 1, io.StringIO(f"traceback: {first_line(exc)}")
    ok, line = code == 0, one_line(output.getvalue())
    if ok:
        report = work / "out" / "summary.json"
        summary = json.loads(report.read_text()) if report.exists() else {}
        loss = summary.get("final_train_loss")
        line = f"{summary.get('steps')} steps" + (f", loss {loss:.2f}" if loss is not None else "")
    return ok, line, time.perf_counter() - start


def rewrite(config: dict[str, Any], model: Path, rows: Path, work: Path) -> dict[str, Any]:
    """Only the model, the data and what a 2-step CPU run needs change; every other key is axolotl's."""
    out = dict(config)
    for key in ("test_datasets", "dataset_prepared_path", "hub_model_id", "resume_from_checkpoint", "wandb_name"):
        out.pop(key, None)
    out.update(base_model=str(model), datasets=[{"path": str(rows), "type": "chat_template"}], output_dir=str(work / "out"),
               max_steps=2, num_epochs=1, micro_batch_size=1, gradient_accumulation_steps=1,
               sequence_len=min(int(config.get("sequence_len") or 256), 256))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("axolotl", help="a folder holding axolotl's examples/ (a checkout or an archive)")
    parser.add_argument("--no_train", action="store_true", help="validate only")
    parser.add_argument("--out", help="also write the table to this file, row by row")
    parser.add_argument("--only", action="append", default=[], help="only configs whose path contains this (repeatable)")
    args = parser.parse_args()
    examples = sorted(p for p in Path(args.axolotl, "examples").rglob("*.y*ml") if "processor_type" in p.read_text()
                      and (not args.only or any(o in str(p) for o in args.only)))
    if not examples:
        parser.error(f"no processor_type configs under {args.axolotl}/examples")

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError("network blocked by bench/vision_examples.py")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    os.environ.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    table = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115

    def emit(line: str) -> None:
        print(line, flush=True)
        if table:
            table.write(line + "\n")
            table.flush()

    digits = (REPO / "data" / "digits_vl" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "digits16.jsonl"
        rows.write_text("\n".join(digits[:16]) + "\n", encoding="utf-8")
        models = TinyModels(Path(tmp) / "models")
        emit("| config | family | transformers builds its model class | tiny model used | lmforge validate | lmforge train, 2 steps |")
        emit("| --- | --- | --- | --- | --- | --- |")
        validated = trained = 0
        for path in examples:
            config = yaml.safe_load(path.read_text())
            kind = family(str(config.get("base_model", "")), config.get("chat_template"))
            if kind == "mistral3" and config.get("tokenizer_use_mistral_common"):
                kind = MISTRAL_COMMON_VISION
            model, used = models.get(kind) if kind != "unknown" else models.get("llava")
            rel = path.relative_to(Path(args.axolotl, "examples"))
            work = Path(tmp) / re.sub(r"[^A-Za-z0-9_.-]", "_", str(rel))
            work.mkdir(parents=True)
            target = work / path.name
            target.write_text(yaml.safe_dump(rewrite(config, model, rows, work), sort_keys=False))
            ok, verdict = validate(target)
            validated += ok
            train = "not run (validate refused)" if not ok else "not run (--no_train)"
            if ok and not args.no_train:
                done, train, seconds = train_two_steps(target, work)
                trained += done
                train = ("" if done else "failed: ") + train + f" ({seconds:.0f} s)"
            cells = (str(rel), kind, model_builds(kind.split("+")[0]) if kind != "unknown" else "unknown family", used, verdict, train)
            emit("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    emit(f"\n{validated} of {len(examples)} validate; {trained} of {len(examples)} train 2 steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
