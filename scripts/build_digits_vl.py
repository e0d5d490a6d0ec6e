"""Write data/digits_vl/: scikit-learn's 1,797 handwritten digits (8x8 scans, 0..16) as image-chat rows.

``python scripts/build_digits_vl.py [OUT_DIR]`` (default data/digits_vl). Each image is scaled to 0..255,
upsampled to 32x32 (bilinear) and stored as a base64 PNG in an OpenAI-style image content part:

    {"messages": [{"role": "user", "content": [{"type": "image", "base64": ...}, {"type": "text", "text": "Which digit is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "7"}]}], "answer": "7"}

The first 1,497 rows go to train.jsonl, the last 300 to test.jsonl (held out: the learning test scores them).
The output is deterministic (same bytes every run).
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

QUESTION = "Which digit is this?"
HELD_OUT = 300
SIZE = 32


def digit_png(pixels) -> bytes:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    gray = Image.fromarray(np.round(np.asarray(pixels) * (255 / 16)).astype("uint8"), mode="L")
    buffer = io.BytesIO()
    gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def row(png: bytes, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "base64": base64.b64encode(png).decode()}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ], "answer": answer}


def main(out: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = [row(digit_png(image), str(int(target))) for image, target in zip(digits.images, digits.target)]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", rows[:-HELD_OUT]), ("test.jsonl", rows[-HELD_OUT:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    print(f"wrote {len(rows) - HELD_OUT} train and {HELD_OUT} test rows to {out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")):
        print(__doc__.strip())
        sys.exit(0)
    main(Path(sys.argv[1] if len(sys.argv) == 2 else "data/digits_vl"))
