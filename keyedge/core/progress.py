"""What a user sees while keyedge works: one-line messages and rich progress bars with live metrics.

Library functions report through an :data:`Echo` (``echo(message, err=False)``): the CLI passes
:func:`echo`, a library caller (the demo, the fleet) passes :func:`quiet` or its own.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


Echo = Callable[..., None]


def echo(message: str, err: bool = False) -> None:
    """One line on standard output (``err``: on standard error)."""
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def quiet(message: str, err: bool = False) -> None:
    """An echo that says nothing."""


def status_printer(console: Console, command: str) -> Callable[[str], None]:
    """Status lines of a long command (``eval: white-box ...``) on the console (standard error)."""
    return lambda s: console.print(f"[bold]{command}[/]: {s}")


class _Bar:
    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, **metrics: float) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._progress.update(self._task, advance=advance, metrics=text)


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True,
                 console: Console | None = None) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"),
                        console=console or Console(stderr=True), transient=True)
    with progress:
        task = progress.add_task(description, total=total, metrics="")
        yield _Bar(progress, task)
