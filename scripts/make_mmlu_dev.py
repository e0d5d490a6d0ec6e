"""Write data/mmlu_dev/dev.jsonl: the MMLU dev questions that lm-eval ships inside its PyPI wheel.

lm-eval 0.4.x carries MMLU's 5 dev questions per subject (57 subjects) as the chain-of-thought
few-shot prompts of its ``mmlu_flan_cot_fewshot`` tasks (lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json).
This script parses them back into question / four choices / answer rows, so that a knowledge
multiple-choice task runs offline. MMLU (Hendrycks et al., 2021) is MIT-licensed, and so is lm-eval.
Usage: python scripts/make_mmlu_dev.py   (needs lm-eval installed; rewrites the file byte for byte)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

QUESTION = re.compile(r"Q: (?P<question>.*?)\n(?P<choices>\(A\).*?)\nA: .*?The answer is \((?P<answer>[A-D])\)\.", re.S)
CHOICES = re.compile(r"\(([A-D])\) ?(.*?)(?= \([A-D]\) |$)", re.S)


def main() -> int:
    import lm_eval

    source = Path(lm_eval.__file__).parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    prompts = json.loads(source.read_text(encoding="utf-8"))
    rows = []
    for subject, text in sorted(prompts.items()):
        for match in QUESTION.finditer(text):
            found = CHOICES.findall(match["choices"].replace("\n", " "))
            if [letter for letter, _ in found] != ["A", "B", "C", "D"]:
                continue  # a prompt whose choices do not parse cleanly is left out, not guessed
            rows.append({"subject": subject, "question": match["question"].strip(),
                         "choices": [choice.strip() for _, choice in found], "answer": "ABCD".index(match["answer"])})
    out = Path(__file__).resolve().parent.parent / "data/mmlu_dev/dev.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} questions from {len(prompts)} subjects -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
