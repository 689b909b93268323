"""rich progress bars with live metrics (loss, accuracy, images/s)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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
