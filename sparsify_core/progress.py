"""Progress display for long work: rich bars on a terminal, periodic lines otherwise."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True, markup=False)  # stage names are user text, not markup


class Task:
    """Handle of one progress task: ``advance(n, **fields)`` and ``set(**fields)``.

    ``fields`` (loss, sparsity, tokens/s ...) are shown next to the bar.
    """

    def __init__(self, progress: Progress | None, task_id, description: str, total: float | None):
        self._p, self._id = progress, task_id
        self.description, self.total = description, total
        self.done = 0.0
        self.fields: dict[str, object] = {}
        self._t0 = self._last = time.monotonic()

    def _field_text(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def advance(self, n: float = 1, **fields) -> None:
        self.done += n
        self.set(**fields)

    def set(self, **fields) -> None:
        self.fields.update(fields)
        if self._p is not None:
            self._p.update(self._id, completed=self.done, info=self._field_text())
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if now - self._last >= 10 or finished:  # plain logs: a line every 10 s
            self._last = now
            total = f"/{self.total:g}" if self.total else ""
            console.print(f"  {self.description}: {self.done:g}{total} "
                          f"[{now - self._t0:.0f}s] {self._field_text()}", highlight=False)


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Task]:
    """Show progress of one piece of work; a rich bar when stderr is a terminal."""
    if console.is_terminal:
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False)]
        with Progress(*columns, console=console, transient=False) as p:
            tid = p.add_task(description, total=total, info="")
            yield Task(p, tid, description, total)
    else:
        console.print(f"  {description} ...", highlight=False)
        t = Task(None, None, description, total)
        yield t
        console.print(f"  {description}: done in {time.monotonic() - t._t0:.1f}s {t._field_text()}", highlight=False)


def info(message: str) -> None:
    """A status line on stderr."""
    console.print(message, highlight=False)


def is_terminal() -> bool:
    return sys.stderr.isatty()
