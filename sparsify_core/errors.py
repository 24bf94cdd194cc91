"""Errors that reach users as one line (the CLI prints them without a traceback)."""
from __future__ import annotations


class SparsifyError(Exception):
    """An error caused by the user's input or environment, shown as one line."""


def one_line(exc: BaseException) -> str:
    """``ExceptionType: first line of its message`` (just the type when it has no message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class RunInterrupted(Exception):
    """The run was stopped by a signal (Ctrl-C, SIGTERM): never swallowed as a stage's or metric's failure."""


class RecipeError(SparsifyError):
    """A recipe that cannot be run: names the file, the line and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, suggestions: list[str] | None = None):
        self.file, self.line, self.field = file, line, field
        self.suggestions = list(suggestions or [])
        self.bare_message = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.file or "<recipe>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: "
        if self.field:
            text += f"{self.field}: "
        text += self.bare_message
        if self.suggestions:
            text += " (did you mean " + " or ".join(repr(s) for s in self.suggestions) + "?)"
        return text


class ParamsError(SparsifyError):
    """Raised by ``Method.check``: params that cannot work on the model; ``field`` is the params field at fault."""

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(message)
