"""The console progress bar of a segmentation run (images, images/s, time left), driven by
the ``segment`` flow's ``on_plan`` and ``on_shard`` hooks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextlib.contextmanager
def segment_progress(
    console: Console, label: str = "segment"
) -> Iterator[dict[str, Callable[[Any], None]]]:
    """Yield ``{"on_plan": ..., "on_shard": ...}`` to pass to the flow; the bar shows until
    the block ends."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(label, total=None, rate=0.0, since=time.perf_counter())

        def on_plan(plan: Any) -> None:
            progress.update(bar, total=sum(len(s) for s in plan.pending), completed=0)
            progress.tasks[bar].fields["since"] = time.perf_counter()

        def on_shard(summary: dict[str, Any]) -> None:
            task = progress.tasks[bar]
            done = task.completed + summary["images"]
            rate = done / max(time.perf_counter() - task.fields["since"], 1e-9)
            progress.update(bar, completed=done, rate=rate)

        yield {"on_plan": on_plan, "on_shard": on_shard}
