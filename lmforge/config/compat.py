"""Screen a config's axolotl keys against the key table before the schema validates it.

Every key is looked up in :mod:`lmforge.config.keytable`: keys lmforge implements pass on (older
spellings are renamed), keys that change nothing here are dropped with a notice, and the rest are
refused by name, at their ``file:line``. A key neither in lmforge's schema nor in the table is
unknown, and gets a did-you-mean.
"""

from __future__ import annotations

import copy
import difflib
import os
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmforge.config.keytable import (
    DATASET,
    DATASET_TYPE,
    KEYS,
    PLUGIN,
    PRETRAINING,
    SPREAD,
    SPECIAL_TOKENS,
    TOP,
    TRL,
    Facts,
    Key,
    Kind,
    QUIET,
    Verdict,
    find,
)
from lmforge.config.loader import KeyPath, RawConfig
from lmforge.config.sections import SECTIONS, DatasetSpec, PretrainingSource, TrlSettings, UserDefinedFormat, key_owners
from lmforge.errors import LmforgeError

GPU_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def is_off(value: Any) -> bool:
    """A switch left off asks for nothing: false, null, 0, empty string/list/dict."""
    return value is None or value is False or value == 0 or value in ("", [], {})


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA or AMD GPU driver (read without importing torch).

    It decides only whether a GPU-only key may be accepted with "changes nothing here": without a
    driver no CUDA/ROCm kernel can run, so the claim is safe; with one, such keys are refused.
    """
    return any(os.path.exists(marker) for marker in GPU_MARKERS)


@dataclass(frozen=True)
class Notice:
    """A key accepted because it changes nothing here, and why (``lmforge validate`` prints these)."""

    where: str
    key: str
    text: str

    def line(self) -> str:
        return f"{self.where}: {self.key}: {self.text}"


def schema_fields() -> dict[str, set[str]]:
    """The keys lmforge's schema defines, per scope."""
    return {
        TOP: set(key_owners()),
        DATASET: set(DatasetSpec.model_fields),
        DATASET_TYPE: set(UserDefinedFormat.model_fields),
        PRETRAINING: set(PretrainingSource.model_fields),
        SPECIAL_TOKENS: {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"},
        PLUGIN: set(),
        TRL: set(TrlSettings.model_fields),
    }


def nullable_fields() -> dict[str, set[str]]:
    """Fields whose value may be null (for the others, an empty value means "use the default")."""
    def nullable(model: type[BaseModel]) -> set[str]:
        return {info.alias or name for name, info in model.model_fields.items()
                if info.annotation is None or type(None) in typing.get_args(info.annotation)}

    top = set().union(*(nullable(model) for model in SECTIONS.values()))
    return {TOP: top, DATASET: nullable(DatasetSpec), DATASET_TYPE: nullable(UserDefinedFormat),
            PRETRAINING: nullable(PretrainingSource), SPECIAL_TOKENS: set(), PLUGIN: set(),
            TRL: nullable(TrlSettings)}


def _in(value: Any, values: Any) -> bool:
    try:
        return value in values
    except TypeError:  # an unhashable value (a mapping) is in no table of values
        return False


def decide(row: Key, value: Any, facts: Facts) -> Verdict | None:
    """The verdict for one value of a key: None means lmforge acts on it (a field, or renamed to one)."""
    if row.kind is not Kind.IMPLEMENTED:
        if (row.quiet is None and is_off(value)) or (row.quiet is not None and _in(value, row.quiet)):
            return QUIET
        if row.only_with and is_off(facts.here.get(row.only_with)):
            return Verdict(Kind.NOTICE, f"only used together with {row.only_with}, which is not set: nothing changes")
    if row.rule is not None:
        try:
            verdict = row.rule(value, facts)
        except TypeError:  # a rule reads values of the key's type; another type is named by the schema's check
            verdict = None
        if verdict is not None:
            return verdict
    if row.kind is Kind.IMPLEMENTED:
        return None
    if _in(value, row.same):
        return Verdict(Kind.NOTICE, row.same[value])
    if row.cpu and not facts.gpu:
        return Verdict(Kind.NOTICE, row.cpu)
    if row.kind is Kind.NOTICE:
        return Verdict(Kind.NOTICE, row.text)
    return Verdict(row.kind, row.text, row.nearest, row.issue)


def refusal(label: str, verdict: Verdict, where: str) -> LmforgeError:
    """One line naming the key, why it is refused, and the nearest supported key."""
    if verdict.kind is Kind.OUT_OF_SCOPE:
        message = f"'{label}' is out of scope: {verdict.text}"
        fix = f"instead: {verdict.nearest}" if verdict.nearest else f"remove {label}"
    else:
        planned = f"; planned in issue {verdict.issue}" if verdict.issue else ""
        message = f"'{label}' is not supported yet ({verdict.text}{planned})"
        fix = f"nearest supported: {verdict.nearest}" if verdict.nearest else f"remove {label}"
    return LmforgeError(message, where=where, fix=fix)


def _suggest(key: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else "see `lmforge config-schema --table` for the keys"


class _Screen:
    def __init__(self, raw: RawConfig, gpu: bool) -> None:
        self.raw = raw
        self.gpu = gpu
        self.fields = schema_fields()
        self.nullable = nullable_fields()
        self.notices: list[Notice] = []

    def where(self, path: KeyPath) -> str:
        return self.raw.where(path)

    def label(self, path: KeyPath) -> str:
        """datasets[0].field_thinking"""
        text = ""
        for part in path:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
        return text

    def mapping(self, values: dict[str, Any], scope: str, path: KeyPath) -> dict[str, Any]:
        """Screen one mapping of keys (the config, or one entry); returns what the schema should see."""
        out: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise LmforgeError(f"config keys must be names, got {key!r}", where=self.where(path + (str(key),)),
                                   fix="quote the key or rename it")
            here = path + (key,)
            row = find(scope, key)
            is_field = key in self.fields[scope]
            if row is None and not is_field:
                if scope == TOP:
                    known = self.fields[TOP] | {r.name for r in KEYS if r.scope == TOP and not r.name.endswith("*")}
                    raise LmforgeError(f"unknown key '{key}'", where=self.where(here), fix=_suggest(key, known))
                out[key] = value  # the entry's own model names the unknown key, with a did-you-mean
                continue
            if key == "plugins" and scope == TOP:
                value = self.plugins(value, here)
                if value is None:
                    continue
            verdict = decide(row, value, Facts(values, self.raw.values, self.gpu)) if row else None
            if verdict is not None and verdict.kind in (Kind.NOT_YET, Kind.OUT_OF_SCOPE):
                raise refusal(self.label(here), verdict, self.where(here))
            if verdict is not None and verdict.kind is Kind.NOTICE:
                self.notices.append(Notice(self.where(here), self.label(here), verdict.text))
            if verdict is not None and verdict.rename is not None:
                out[verdict.rename] = verdict.value if verdict.replaces else value
                continue
            if verdict is not None and not (is_field and verdict.kind is Kind.NOTICE):
                continue  # quiet, or a notice for a key the schema does not hold: nothing to pass on
            if verdict is not None and verdict.replaces:
                value = verdict.value  # axolotl's name for what lmforge has under another
            if value is None and is_field and key not in self.nullable[scope]:
                continue  # `key:` left empty asks for nothing: the default applies (axolotl reads it so)
            if row is not None and row.rename is not None and not is_field:
                self.rename(row, value, values, out, here)
                continue
            out[key] = self.nested(key, value, scope, here)
        return out

    def rename(self, row: Key, value: Any, values: dict[str, Any], out: dict[str, Any], here: KeyPath) -> None:
        written = dict(value) if row.rename == SPREAD else {
            row.rename: row.convert(value, Facts(values, self.raw.values, self.gpu)) if row.convert else value}
        for target, new in written.items():
            if target in values and values[target] != new:
                raise LmforgeError(f"{self.label(here)} sets {target} to {new!r}, but {target} is also set to {values[target]!r}",
                                   where=self.where(here), fix=f"keep one of {here[-1]} and {target}")
            out[target] = new

    def plugins(self, value: Any, here: KeyPath) -> Any:
        """Each plugin is decided by its own row; the key passes only while some plugin still needs deciding."""
        if not isinstance(value, list):
            return value
        for index, entry in enumerate(value):
            name = str(entry)
            module = name.split(".")[2] if name.startswith("axolotl.integrations.") and name.count(".") >= 3 else name
            row = find(PLUGIN, module)
            where = self.where(here + (index,))
            if row is None:
                raise LmforgeError(f"plugin '{name}' is not known to lmforge", where=where, fix="remove it from plugins")
            verdict = decide(row, True, Facts({}, self.raw.values, self.gpu))
            if verdict is not None and verdict.kind in (Kind.NOT_YET, Kind.OUT_OF_SCOPE):
                raise refusal(f"plugins: {name}", verdict, where)
            if verdict is not None and verdict.kind is Kind.NOTICE:
                self.notices.append(Notice(where, f"plugins: {module}", verdict.text))
        return None

    def nested(self, key: str, value: Any, scope: str, here: KeyPath) -> Any:
        """Entries of datasets, pretraining_dataset and special_tokens are screened with their own rows."""
        if scope == TOP and key in ("datasets", "test_datasets") and isinstance(value, list):
            return [self.dataset(entry, here + (i,)) for i, entry in enumerate(value)]
        if scope == TOP and key == "pretraining_dataset" and isinstance(value, list):
            return [self.mapping(e, PRETRAINING, here + (i,)) if isinstance(e, dict) else e for i, e in enumerate(value)]
        if scope == TOP and key == "pretraining_dataset" and isinstance(value, dict):
            return self.mapping(value, PRETRAINING, here)
        if scope == TOP and key == "special_tokens" and isinstance(value, dict):
            return self.mapping(value, SPECIAL_TOKENS, here)
        if scope == TOP and key == "trl" and isinstance(value, dict):
            return self.mapping(value, TRL, here)
        return value

    def dataset(self, entry: Any, here: KeyPath) -> Any:
        if not isinstance(entry, dict):
            return entry
        screened = self.mapping(entry, DATASET, here)
        if isinstance(screened.get("type"), dict):
            screened["type"] = self.mapping(screened["type"], DATASET_TYPE, here + ("type",))
        return screened


def screen(raw: RawConfig, gpu: bool | None = None) -> tuple[dict[str, Any], list[Notice]]:
    """The config as lmforge's schema should validate it, and the notices for keys that change nothing here.

    Raises LmforgeError at the first key that is unknown, not supported yet or out of scope.
    """
    screener = _Screen(raw, gpu_present() if gpu is None else gpu)
    values = screener.mapping(copy.deepcopy(raw.values), TOP, ())
    return values, screener.notices
