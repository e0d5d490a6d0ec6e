"""GRPO on GSM8K: the prompt transform and the two verifiable rewards that examples/smollm2-135m/grpo-gsm8k.yml names.

A prompt transform (axolotl's convention): `gsm8k_prompt(cfg)` returns the row transform and the columns to drop.
Rewards (TRL's convention): `fn(completions, answer, **kwargs) -> list[float]`, one per completion; a completion
is `[{"role": "assistant", "content": text}]` because the prompts are chat messages.
"""

from __future__ import annotations

import re
from typing import Any

# Short answers keep a CPU run to minutes; the rewards read a worked solution just as well (its last number, its last line).
INSTRUCTION = "Reply with the final answer only, as: #### <number>"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)\s*$")


def reference_answer(solution: str) -> str:
    """GSM8K's reference number: what follows `#### ` in the solution, without thousands separators."""
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k_prompt(cfg: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, list[str]]]:
    """GSM8K rows ({question, answer: worked solution ending in '#### N'}) → a chat prompt and the reference number."""

    def transform(row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": f"{row['question']}\n{INSTRUCTION}"}],
                "answer": reference_answer(row["answer"])}

    return transform, {"remove_columns": ["question"]}


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


def _number(text: str) -> str | None:
    """The completion's final answer: the number after its last '####', else its last number."""
    marked = text.rsplit("####", 1)
    found = NUMBER.findall(marked[1]) if len(marked) == 2 else NUMBER.findall(text)
    if not found:
        return None
    value = found[0] if len(marked) == 2 else found[-1]
    return value.replace(",", "").rstrip(".")


def gsm8k_correct(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1 when the completion's final number equals the reference (exactly, as numbers), else 0."""
    rewards = []
    for completion, reference in zip(completions, answer):
        got = _number(_text(completion))
        try:
            rewards.append(1.0 if got is not None and float(got) == float(reference) else 0.0)
        except ValueError:
            rewards.append(0.0)
    return rewards


def gsm8k_format(completions: list[Any], **kwargs: Any) -> list[float]:
    """1 when the completion ends with '#### <number>' (GSM8K's own answer line), else 0."""
    return [1.0 if FINAL.search(_text(c).strip()) else 0.0 for c in completions]
