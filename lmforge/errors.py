"""The one user-facing error type.

Every mistake a user can make (a config key, a dataset row, a model path, a corrupt
checkpoint) is raised as :class:`LmforgeError`. The CLI prints it as one line and exits
non-zero; only ``--debug`` shows a traceback.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """An error the user can fix: what went wrong, where, and what to do."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f" ({self.fix})"
        return text
