"""What a run tells those who follow it: a `Callback` is called at the run's start, after each
finished epoch (where it may ask the run to stop) and at its end, whatever the end, on rank 0
only. A study's progress, a test's observer and the experiment trackers (`trackers`:
TensorBoard, MLflow) are callbacks; so is anything a user attaches to `train`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Experiment

if TYPE_CHECKING:
    from .run_folder import RunFolder


@dataclasses.dataclass(frozen=True)
class Stop:
    """A callback's request to end a run after the epoch it saw: the run's folder is left as
    complete as a finished run's, with status `stopped` and this reason."""

    reason: str


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What a callback learns of a run as it starts (or resumes)."""

    experiment: Experiment
    folder: RunFolder
    first_epoch: int  # 1, or the epoch a resumed run goes on from
    facts: dict  # parameters, dataset, device, precision, processes


class Callback:
    """Override what you need; each method does nothing by default."""

    def on_start(self, run: RunStart) -> None:
        """The run's folder holds its config.json; no epoch of this invocation has run."""

    def on_epoch(self, experiment: Experiment, row: dict) -> Stop | None:
        """An epoch finished and is in metrics.csv and the checkpoint: its row of metrics."""
        return None

    def on_end(self, summary: dict) -> None:
        """The run ended: summary.json's content, or, for a run stopped by a signal (status
        `interrupted`, to be resumed) or failed before its summary, what is known."""


class OnEpoch(Callback):
    """A function of each finished epoch (the experiment, its row) as a callback."""

    def __init__(self, function: Callable[[Experiment, dict], Stop | None]) -> None:
        self.function = function

    def on_epoch(self, experiment: Experiment, row: dict) -> Stop | None:
        return self.function(experiment, row)
