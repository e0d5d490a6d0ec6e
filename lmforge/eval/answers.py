"""Answer extraction for exact match: the final answer out of a worked solution, the same way lm-eval reads it.

Four extractors, chosen by ``eval_answer_extractor``:

- ``gsm8k``: the number after ``####`` (lm-eval's gsm8k "strict-match" filter, first match);
- ``last_number``: the last number in the text (lm-eval's gsm8k "flexible-extract" filter);
- ``boxed``: the contents of the last ``\\boxed{...}`` (braces balanced, as MATH answers nest them);
- ``regex``: the first match of ``eval_answer_regex`` (its first group, or the whole match without one);
- ``none``: the whole text, stripped.

An extractor that finds nothing returns None: the example counts as a miss, and the report counts how many
such misses there were (a model that never writes ``####`` is told apart from one that writes wrong numbers).
Answers are then normalised the way lm-eval's gsm8k ``exact_match`` does (``regexes_to_ignore``, case), so
lmforge's score on the same generations equals lm-eval's (tests/test_eval.py checks this).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.errors import LmforgeError

EXTRACTORS = ("gsm8k", "last_number", "boxed", "regex", "none")
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm_eval/tasks/gsm8k/gsm8k.yaml, strict-match
FLEXIBLE_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm_eval/tasks/gsm8k/gsm8k.yaml, flexible-extract
# lm-eval's gsm8k exact_match: regexes_to_ignore, then ignore_case (ignore_punctuation is off).
IGNORED = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]


def _first_group(match: re.Match[str]) -> str:
    """The text of a match the way lm-eval's RegexFilter takes it: the first non-empty group, else the match."""
    groups = [g for g in match.groups() if g]
    return (groups[0] if groups else match.group(0)).strip()


def gsm8k(text: str) -> str | None:
    match = GSM8K_STRICT.search(text)
    return _first_group(match) if match else None


def last_number(text: str) -> str | None:
    matches = list(FLEXIBLE_NUMBER.finditer(text))
    return _first_group(matches[-1]) if matches else None


def boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None  # an unclosed box is no answer


def whole(text: str) -> str | None:
    return text.strip()


@dataclass(frozen=True)
class Extractor:
    """One way to read the final answer out of a text (a generation or a reference)."""

    name: str
    extract: Callable[[str], str | None]

    @classmethod
    def named(cls, name: str, pattern: str | None = None) -> "Extractor":
        if name == "regex":
            if not pattern:
                raise LmforgeError("eval_answer_extractor: regex needs a pattern", where="eval_answer_regex",
                                   fix='set eval_answer_regex, e.g. "The answer is (\\\\d+)"')
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise LmforgeError(f"eval_answer_regex is not a regular expression: {exc}", where="eval_answer_regex",
                                   fix="fix the pattern (Python re syntax)") from exc

            def by_regex(text: str) -> str | None:
                match = compiled.search(text)
                return _first_group(match) if match else None

            return cls("regex", by_regex)
        found = {"gsm8k": gsm8k, "last_number": last_number, "boxed": boxed, "none": whole}.get(name)
        if found is None:
            raise LmforgeError(f"unknown answer extractor '{name}'", where="eval_answer_extractor",
                               fix=f"use one of: {', '.join(EXTRACTORS)}")
        return cls(name, found)

    def reference(self, text: str) -> str:
        """The answer in a reference: extracted the same way, else the whole reference (a bare answer)."""
        found = self.extract(text)
        return text.strip() if found is None else found


def normalize(answer: str) -> str:
    """lm-eval gsm8k's exact_match normalisation: drop , $ a leading worked solution and a final period; casefold."""
    for pattern in IGNORED:
        answer = pattern.sub("", answer)
    return answer.lower()


def same_answer(prediction: str | None, reference: str) -> bool:
    return prediction is not None and normalize(prediction) == normalize(reference)


def choose_extractor(name: str, pattern: str | None, references: list[str]) -> Extractor:
    """``eval_answer_extractor``'s extractor; ``auto`` picks gsm8k or boxed when every reference uses it, else none."""
    if name == "auto":
        if references and all(GSM8K_STRICT.search(r) for r in references):
            name = "gsm8k"
        elif references and all("\\boxed{" in r for r in references):
            name = "boxed"
        else:
            name = "none"
    return Extractor.named(name, pattern)
