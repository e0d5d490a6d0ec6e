"""Regenerate lmforge/export/llama_cpp_tables.py from a llama.cpp source tree.

    python scripts/update_llama_cpp_tables.py LLAMA_CPP_SRC COMMIT [--via "llama-cpp-python 0.3.36"]

LLAMA_CPP_SRC is a llama.cpp checkout (or the vendor/llama.cpp folder of a llama-cpp-python
sdist, `pip download --no-deps --no-binary :all: llama-cpp-python==X`), COMMIT its short hash.
It copies two tables: the pre-tokenizer names llama.cpp's loader accepts for BPE vocabularies
(src/llama-vocab.cpp) and the converter's map from the hash of the check text's token ids to
those names (get_vocab_base_pre in convert_hf_to_gguf.py, or conversion/base.py since the
converter was split into a package).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lmforge" / "export" / "llama_cpp_tables.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("commit")
    parser.add_argument("--via", default="", help="where the source came from, e.g. 'llama-cpp-python 0.3.36'")
    args = parser.parse_args()

    converter = next(p for p in (args.src / "conversion" / "base.py", args.src / "convert_hf_to_gguf.py")
                     if p.is_file() and "def get_vocab_base_pre" in p.read_text())
    text = converter.read_text()
    body = text[text.index("def get_vocab_base_pre"):]
    body = body[:body.index("return res")]
    chktxt = ast.literal_eval(re.search(r"chktxt = (.*)\n", body).group(1))
    hashes: dict[str, str] = {}
    for digest, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#.*\n)*\s*res = "([^"]+)"', body):
        hashes[digest] = name  # consecutive ifs: a later match overrides an earlier one
    assert len(hashes) == len(set(re.findall(r'chkhsh == "([0-9a-f]{64})"', body))), "unparsed hash entries"

    vocab = (args.src / "src" / "llama-vocab.cpp").read_text()
    chain = vocab[vocab.index("if (tokenizer_pre.empty())"):vocab.index("unknown pre-tokenizer type")]
    known = sorted(set(re.findall(r'tokenizer_pre == "([^"]+)"', chain)))

    via = f" (vendored by {args.via})" if args.via else ""
    lines = [
        '"""Tables copied from llama.cpp; regenerate with scripts/update_llama_cpp_tables.py, do not edit.',
        "",
        f"Source: ggml-org/llama.cpp commit {args.commit}{via}.",
        "KNOWN_PRE_TOKENIZERS: the tokenizer.ggml.pre names src/llama-vocab.cpp accepts for BPE vocabularies",
        "(any other name fails to load: \"unknown pre-tokenizer type\"). CHECK_TEXT and PRE_TOKENIZER_HASHES:",
        f"get_vocab_base_pre in {converter.relative_to(args.src)}, which hashes the token ids of CHECK_TEXT",
        "(sha256 of str(tokenizer.encode(CHECK_TEXT))) and maps the hash to a name.",
        '"""',
        "",
        f'LLAMA_CPP_COMMIT = "{args.commit}"',
        "",
        f"CHECK_TEXT = {chktxt!r}",
        "",
        "KNOWN_PRE_TOKENIZERS = frozenset({",
        *(f"    {name!r}," for name in known),
        "})",
        "",
        "PRE_TOKENIZER_HASHES = {",
        *(f'    "{digest}": {name!r},' for digest, name in hashes.items()),
        "}",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}: {len(known)} pre-tokenizer names, {len(hashes)} hashes")


if __name__ == "__main__":
    main()
