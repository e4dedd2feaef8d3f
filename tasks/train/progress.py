"""Progress within training: a console bar on a terminal and a Prefect progress artifact."""

from __future__ import annotations

import logging
import time
from typing import Optional
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)


class TrainingProgress:
    """Receives the training loop's (epoch, batch) ticks; shows them as a bar on `console` (none:
    no bar) and as the Prefect progress artifact `artifact_key` (none: no artifact).

        The artifact is updated at most every `interval` seconds within an epoch and at every epoch's
        end, so a long epoch shows movement without an API call per batch.
    """

    def __init__(
        self,
        epochs: int,
        batches: int,
        artifact_key: Optional[str] = None,
        console: Optional[Console] = None,
        interval: float = 2.0,
    ) -> None:
        self.epochs, self.batches, self.interval = epochs, batches, interval
        self.artifact_key = artifact_key
        self.artifact_id: Optional[UUID] = None
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=console is None,
        )
        self.task: Optional[TaskID] = None
        self.updated = 0.0

    def __enter__(self) -> "TrainingProgress":
        self.bar.start()
        if self.artifact_key:
            self.artifact_id = create_progress_artifact(
                0.0, key=self.artifact_key, description=f"Training progress over {self.epochs} epochs"
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.stop()

    def percent(self, epoch: int, batch: int) -> float:
        return 100.0 * ((epoch - 1) * self.batches + batch) / (self.epochs * self.batches)

    def batch_done(self, epoch: int, batch: int) -> None:
        """Called after each optimisation step, `batch` counting from 1 within `epoch`."""
        if self.task is None:
            fields = dict(epoch=epoch, epochs=self.epochs)
            self.task = self.bar.add_task("train", total=self.batches, completed=batch - 1, **fields)
        self.bar.update(self.task, completed=batch)
        if time.monotonic() - self.updated >= self.interval:
            self._publish(self.percent(epoch, batch))

    def epoch_done(self, epoch: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.bar.refresh()  # clears the bar before the epoch's log line is written
            self.task = None
        self._publish(self.percent(epoch, self.batches))

    def _publish(self, percent: float) -> None:
        self.updated = time.monotonic()
        if self.artifact_id is None:
            return
        try:
            update_progress_artifact(self.artifact_id, round(percent, 1))
        except Exception as error:  # progress is a view: losing it must not stop training
            logger.warning("stopped updating the progress artifact: %s", error)
            self.artifact_id = None
