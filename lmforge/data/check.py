"""Read a config's data files without a tokenizer: every row parsed and its fields checked.

`lmforge validate` runs this, so a broken JSON line, a CSV without the mapped column or a
conversation with no turns is named by ``file:line`` before any model or tokenizer loads.
What needs the tokenizer (token counts, truncation, chat-template rendering) is checked when
the data is prepared, which `train` does before it loads any weights.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lmforge.config.sections import DataSection, DatasetSpec, PretrainingSource
from lmforge.data.formats import SkipRow, get_format
from lmforge.data.formats.hook import looks_like_hook
from lmforge.data.compressed import compression, data_suffix, guard, open_binary
from lmforge.data.sources import TEXT_SUFFIXES, local_files, no_rows, read_local, read_rows
from lmforge.errors import LmforgeError


class Unchecked(Exception):
    """The entry's rows cannot be checked without the real tokenizer; the message says why."""


def _row_checker(spec: DatasetSpec, where: str) -> Any:
    """A function row → None raising LmforgeError for a bad row, for the entry's `type`; None when the
    format cannot be checked without a tokenizer (a hook may need the chat template to run). Raises
    Unchecked when a chat format cannot even be built with a stand-in tokenizer (said, not hidden)."""
    kind = spec.type
    if isinstance(kind, str) and kind in ("chat_template", "sharegpt"):
        # The turns' structure needs no template; a stand-in tokenizer lets the format be built.
        stand_in = SimpleNamespace(bos_token="", eos_token="", chat_template="{{ messages }}", special_tokens_map={})
        try:
            fmt = get_format(kind, f"{where}.type", spec=spec, tokenizer=stand_in, chat_template=None)
        except Exception as exc:  # noqa: BLE001 (a template option only the real tokenizer can resolve: checked at prepare)
            reason = exc.format() if isinstance(exc, LmforgeError) else f"{type(exc).__name__}: {exc}"
            raise Unchecked(f"its chat template needs the real tokenizer ({reason})") from exc
        return fmt.messages
    if isinstance(kind, str) and looks_like_hook(kind):
        get_format(kind, f"{where}.type", spec=spec)  # imports the function: a missing one is named now
        return None
    return get_format(kind, f"{where}.type", spec=spec).segments


class _RenderTurns:
    """A stand-in tokenizer for checking preference rows: renders turns as plain text (the real template is applied
    when training); enough to find missing fields, empty answers and identical pairs."""

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def _preference_checker(spec: DatasetSpec, where: str, kto: bool, identical: list[int]) -> Any:
    """rl: each row formatted as a pair (or KTO row): both answers present and non-empty; identical pairs counted."""
    from lmforge.data.formats.preference import PreferenceText, preference_format

    fmt = preference_format(spec.type, f"{where}.type", spec=spec, tokenizer=_RenderTurns(), template="", completion=kto)

    def check(values: dict[str, Any], row_where: str) -> None:
        text = fmt(values, row_where)
        if isinstance(text, PreferenceText) and text.chosen.strip() == text.rejected.strip():
            identical[0] += 1

    return check


def check_dataset(spec: DatasetSpec, where: str, data: DataSection, preference: str | None = None) -> str:
    """Parse every row of one local dataset entry and check its fields; a line saying what was read.
    `preference` (rl: dpo | kto | ..., or reward_model): rows are pairs (KTO: labelled answers)."""
    if local_files(spec.path, spec.ds_type, spec.data_files) is None:
        return f"{where}: {spec.path} is a Hub dataset, read when training"
    identical = [0]
    try:
        if preference:
            check, unchecked = _preference_checker(spec, where, preference == "kto", identical), ""
        else:
            check, unchecked = _row_checker(spec, where), ""
    except Unchecked as exc:
        check, unchecked = None, str(exc)
    rows = bad = 0
    first_bad = ""
    for row in read_rows(spec.path, spec.ds_type, spec.data_files, spec.split, spec.name):
        rows += 1
        try:
            values = row.check()
            if check is not None:
                check(values, row.where)
        except SkipRow:
            continue
        except LmforgeError as exc:
            if not data.skip_bad_rows:
                exc.fix = exc.fix or "fix the row, or set skip_bad_rows: true to skip and count such rows"
                raise
            bad += 1
            first_bad = first_bad or exc.format()
    if not rows:
        raise no_rows(spec.path)  # a Hub split; a local file says so as it is read
    if bad == rows:
        raise LmforgeError(f"all {rows} rows are bad (first: {first_bad})", where=spec.path, fix="check the data and its type")
    checked = "fields checked" if check is not None else (
        f"rows parsed; the format is checked when training: {unchecked}" if unchecked else "rows parsed (the format is checked when training)")
    if identical[0] == rows:
        raise LmforgeError(f"all {rows} pairs have chosen == rejected: nothing to prefer", where=spec.path, fix="check the data and its fields")
    return (f"{where}: {spec.path}: {rows:,} rows, {checked}" + (f", {bad:,} bad rows will be skipped" if bad else "")
            + (f", {identical[0]:,} pairs with chosen == rejected will be skipped" if identical[0] else ""))


def check_text_source(source: PretrainingSource, where: str) -> str:
    """A pretraining source: text files exist; JSONL/CSV/Parquet rows hold `text_column`."""
    files = local_files(source.path, None, source.data_files)
    if files is None:
        return f"{where}: {source.path} is a Hub dataset, streamed when training"
    rows = 0
    for path in files:
        if data_suffix(path) in TEXT_SUFFIXES:
            if compression(path):  # read through: a damaged or cut-off file is named now, not mid-run
                with guard(path), open_binary(path) as handle:
                    while handle.read(1 << 20):
                        pass
            continue
        for row in read_local(path):
            values = row.check()
            if source.text_column not in values:
                raise LmforgeError(f"column '{source.text_column}' is missing", where=row.where,
                                   fix=f"set text_column to one of: {', '.join(map(str, values))}")
            rows += 1
    return f"{where}: {len(files)} file(s)" + (f", {rows:,} rows with '{source.text_column}'" if rows else "")


def check_data_files(cfg: Any) -> list[str]:
    """Every local data file of the config read and checked (no tokenizer); one line per entry."""
    data, lines = cfg.data, []
    rl = getattr(cfg, "rl", None)
    preference = rl.preference if rl is not None else None
    pretraining_text = cfg.pretrain.pretraining_dataset
    for index, source in enumerate(pretraining_text or []):
        lines.append(check_text_source(source, f"pretraining_dataset[{index}]"))
    for key, specs in (("datasets", [] if pretraining_text else data.datasets or []), ("test_datasets", data.test_datasets or [])):
        for index, spec in enumerate(specs):
            lines.append(check_dataset(spec, f"{key}[{index}]", data, preference))
    return lines
