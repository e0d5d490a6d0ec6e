"""What the property-based suites share: the CLI run in this process, and the one rule every case must meet.

Each case either works (exit 0) or ends with one line ``error: WHERE: WHAT (FIX)`` and exit 2: an
LmforgeError that names a key or ``file:line`` and says what to do. Exit 1 is the CLI's net for any
other exception (an lmforge bug): the case fails, and its traceback (the command rerun with
``--debug``) is in the failure message.

Budget: a fixed seed and example count in CI (``derandomize``); ``LMFORGE_FUZZ_EXAMPLES=N`` runs N
cases per suite instead, drawn at random (``LMFORGE_FUZZ_SEED`` fixes the draw).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import traceback
from dataclasses import dataclass

from hypothesis import HealthCheck, settings

QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS",
             "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "HF_HUB_VERBOSITY")


def fuzz_settings(ci_examples: int) -> settings:
    """`ci_examples` derandomized cases (CI), or LMFORGE_FUZZ_EXAMPLES random ones."""
    wanted = os.environ.get("LMFORGE_FUZZ_EXAMPLES")
    common = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                         HealthCheck.data_too_large, HealthCheck.large_base_example])
    if wanted:
        return settings(max_examples=int(wanted), derandomize=False, **common)
    return settings(max_examples=ci_examples, derandomize=True, **common)


@dataclass
class CliResult:
    code: int
    out: str
    err: str
    args: list[str]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def _kept_environment():
    saved = {name: os.environ.get(name) for name in QUIET_ENV}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_cli(args: list[str]) -> CliResult:
    """`lmforge ARGS` in this process, its output captured (no subprocess: thousands of cases must stay fast)."""
    from lmforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _kept_environment(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refusing the command line
            code = exc.code if isinstance(exc.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue(), list(args))


def _traceback(args: list[str]) -> str:
    from lmforge.cli import main

    sink = io.StringIO()
    with _kept_environment(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            main([*args, "--debug"])
        except BaseException:  # noqa: BLE001 (what we want to show)
            return traceback.format_exc()
    return "(no exception with --debug)"


# `error: WHERE: WHAT (FIX)`; WHERE is a file (path or path:line), a key path, or a command-line flag.
ONE_LINE = re.compile(r"^error: (?P<where>.+?): (?P<what>.+) \((?P<fix>[^()]*(\([^()]*\)[^()]*)*)\)$")


def assert_works_or_one_line(result: CliResult, wheres: tuple[str, ...] = ()) -> None:
    """The rule: exit 0, or exit 2 with exactly one error line naming where (one of `wheres`, a key or a
    file) and what to do. Anything else fails with the command's traceback."""
    context = f"lmforge {' '.join(result.args)}\n--- stderr ---\n{result.err[-3000:]}"
    if result.code == 1 or "Traceback" in result.err:
        raise AssertionError(f"not an LmforgeError:\n{context}\n--- with --debug ---\n{_traceback(result.args)}")
    assert result.code in (0, 2), context
    if result.code == 0:
        assert not result.error_lines, context
        return
    lines = result.error_lines
    assert len(lines) == 1, context
    match = ONE_LINE.match(lines[0])
    assert match, f"the error does not say where and what to do:\n{context}"
    where = match.group("where")
    names_a_place = (any(w in where for w in wheres) or " on the command line" in where
                     or re.match(r"^[A-Za-z_][\w.\[\]]*(\.\w+)?$", where) is not None)
    assert names_a_place, f"the error names no key or file ({where!r}):\n{context}"
