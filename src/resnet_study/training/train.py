"""The paper's training recipe: one-cycle LR per batch, checkpoints every epoch, exact resume.

`train` (the command) and `run_in_folder` (a study's run, a search's trial) restore a run or
start it, run its epochs (`epoch.run_epoch`) on its `Assembly`, and record it in its
`RunFolder`: metrics.csv, checkpoint.pt and predictions.npz after every epoch, summary.json
(`RunRecord`) whatever the outcome. Callbacks (`callbacks`: a study's progress, the trackers
that `--log` names) see the run start, each finished epoch (and may stop the run cleanly
there) and its end.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from ..config import Experiment
from ..errors import Interrupted, UsageError, one_line
from ..models import count_params
from ..ranks import is_main
from .assembly import Assembly, assemble
from .callbacks import Callback, RunStart, Stop
from .checkpoint import (
    check_same_experiment,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from .device import device_label, peak_memory_mib
from .epoch import Diverged, EpochResult, StopRequested, StopSignal, run_epoch
from .run_folder import FINAL, RunFolder, RunRecord
from .trackers import Tracking, trackers

METRICS = ["epoch", "train_loss", "test_loss", "test_top1", "test_top5", "lr", "epoch_seconds",
           "eval_seconds", "images_per_second"]
TEST_METRICS = METRICS[2:5]
VAL_METRICS = ["val_loss", "val_top1", "val_top5"]
EXIT_DIVERGED = 3


def restore(exp: Experiment, folder: RunFolder, resume: bool
            ) -> tuple[dict | None, dict | None]:
    """(the checkpoint to resume from, or None; the summary of a run already finished, which
    needs nothing more). Refuses, before anything is written, a new run into a folder that holds
    one, and a resume under settings that would change what the run computes."""
    if not resume:
        if folder.checkpoint.exists():
            raise UsageError(f"{folder.path} already holds a run; pass --resume to continue it "
                             "or choose another --out")
        return None, None
    ckpt = load_checkpoint(folder.checkpoint)
    check_same_experiment(ckpt["experiment"], exp, folder.checkpoint)
    finished = folder.summary() if ckpt["epoch"] >= exp.train.epochs else None
    if finished and finished.get("status") == "completed":
        return ckpt, finished
    return ckpt, None


def train(exp: Experiment, out: Path, *, resume: bool = False, quiet: bool = False,
          callbacks: Sequence[Callback] = (), log: Callable[[str], None] | None = None) -> dict:
    """Train one experiment into `out` (the `train` command); return the summary also written
    to summary.json. The run holds `out`'s lock throughout (under torchrun, rank 0 holds it for
    all ranks), so a second process training into the same folder is refused (`FolderHeld`).
    Tracked (`--log mlflow`) as a run of the experiment named after its recipe, in a store
    inside `out` (`Tracking.of_run`)."""
    folder = RunFolder(out)
    with folder.hold_for_ranks(exp.execution.device):
        return _train(exp, folder, resume=resume, quiet=quiet, callbacks=callbacks,
                      tracking=Tracking.of_run(out, exp), record=None, log=log or _log(quiet))


def run_in_folder(exp: Experiment, folder: RunFolder, *, tracking: Tracking,
                  callbacks: Sequence[Callback] = (),
                  log: Callable[[str], None] | None = None) -> dict:
    """A study's run or a search's trial, in `folder`, whose lock the caller holds: the one way
    both train. A run another process finished since it was planned is returned as it stands
    (`skipped`), a partial one resumed from its checkpoint, any other started; any failure
    (out of memory, weights offline, bad data) becomes its summary, with all that was known of
    the run, and the caller goes on."""
    state = folder.state()
    if state in FINAL:
        return {**(folder.summary() or {}), "status": state, "skipped": True}
    record = RunRecord(exp, folder)
    try:
        return _train(exp, folder, resume=state == "partial", quiet=True, callbacks=callbacks,
                      tracking=tracking, record=record, log=log or _log(True))
    except Exception as e:
        return record.summary or record.write("failed", error=one_line(e))


def _train(exp: Experiment, folder: RunFolder, *, resume: bool, quiet: bool,
           callbacks: Sequence[Callback], tracking: Tracking, record: RunRecord | None,
           log: Callable[[str], None]) -> dict:
    ckpt, finished = restore(exp, folder, resume)
    if finished is not None:
        if is_main():
            print(f"{exp.name}: {folder.path} is already trained to epoch {exp.train.epochs} of "
                  f"{exp.train.epochs}; nothing to resume", file=sys.stderr, flush=True)
        return finished  # as it was written
    quiet = quiet or not is_main()  # one progress bar, rank 0's
    # A run that fails before it is assembled (bad data, no weights) has no folder to record
    # in, unless a study or search asked for its record.
    keep_early_failure, record = record is not None, record or RunRecord(exp, folder)
    parts = None
    try:
        parts = assemble(exp, checkpoint=ckpt, progress=not quiet, log=log)
        followers = [*trackers(exp, tracking, log), *callbacks] if is_main() else []
        return Training(parts, folder, record, ckpt, quiet).run(followers)
    except Exception as e:
        if parts is not None:
            record.learn(peak_memory_mib=peak_memory_mib(parts.device))
        if parts is not None or keep_early_failure:
            record.write("failed", error=one_line(e))
        raise


def _log(quiet: bool) -> Callable[[str], None]:
    """Rank 0's log: above the progress bars, or plain lines on stderr when quiet."""
    if not is_main():
        return lambda msg: None
    return (lambda msg: print(msg, file=sys.stderr, flush=True)) if quiet else tqdm.write


class Training:
    """One run's epochs on its assembly, and what they leave in its folder."""

    def __init__(self, parts: Assembly, folder: RunFolder, record: RunRecord,
                 ckpt: dict | None, quiet: bool) -> None:
        self.parts, self.folder, self.record, self.quiet = parts, folder, record, quiet
        self.main = parts.ranks.main
        self.start_epoch = ckpt["epoch"] if ckpt else 0
        self.history: list[dict] = ckpt["history"] if ckpt else []
        self.partial: dict | None = ckpt.get("partial") if ckpt else None
        self.columns = [c for c in METRICS if parts.splits.test or c not in TEST_METRICS] + (
            VAL_METRICS if parts.splits.val else []) + (
            ["test_top1_tta"] if parts.splits.test and parts.experiment.train.tta else [])
        record.learn(params=count_params(parts.model), dataset=parts.splits.images.name,
                     device=device_label(parts.device), precision=parts.precision,
                     processes=parts.ranks.world)
        record.learn_history(self.history)

    def run(self, callbacks: Sequence[Callback]) -> dict:
        """The epochs left, each seen by the callbacks (rank 0's), which also see the start
        and, whatever it is, the end."""
        parts, exp = self.parts, self.parts.experiment
        if self.main:
            self.folder.write_config(exp)
            if self.history:  # as the checkpoint has it, should a kill have come between them
                self.folder.write_metrics(self.history, self.columns)
        parts.log(f"{exp.name}{exp.log_mark}: {self.record.facts['params']:,} parameters, "
                  f"{parts.splits.train.num_images:,} training images "
                  f"({parts.splits.images.name}), {parts.device.type}, {parts.precision}, "
                  f"epochs {self.start_epoch + 1}-{exp.train.epochs} of {exp.train.epochs}")
        start = RunStart(exp, self.folder, self.start_epoch + 1, dict(self.record.facts))
        for callback in callbacks:
            callback.on_start(start)
        ended = {"status": "interrupted"}  # a signal's stop (resumed later), or Ctrl-C
        try:
            ended = self._epochs(callbacks)
            return ended
        except Exception as e:
            ended = {"status": "failed", "error": one_line(e)}
            raise
        finally:
            for callback in callbacks:
                callback.on_end(ended)

    def _epochs(self, callbacks: Sequence[Callback]) -> dict:
        parts, exp = self.parts, self.parts.experiment
        parts.model.train()
        with StopSignal() as signals:
            for epoch in range(self.start_epoch, exp.train.epochs):
                result = self._epoch(epoch, signals)
                if result is None:
                    return self._finish("diverged", diverged_epoch=epoch + 1)
                self._record_epoch(epoch, result)
                stop = self._observe(callbacks, result.row)
                if stop is not None and epoch + 1 < exp.train.epochs:
                    parts.log(f"{exp.name}: stopped after epoch {epoch + 1}: {stop.reason}")
                    self._save_predictions(result)
                    return self._finish("stopped", stop_reason=stop.reason)
        return self._finish("completed")

    def _epoch(self, epoch: int, signals: StopSignal) -> EpochResult | None:
        """The epoch's result; None if it diverged; a stop request checkpoints and ends."""
        parts, exp = self.parts, self.parts.experiment
        try:
            result = run_epoch(parts, epoch, signals, self.partial, progress=not self.quiet)
        except Diverged as e:
            parts.log(f"{exp.name}: diverged ({e}); lower --lr or set --grad-clip")
            return None
        except StopRequested as stopped:
            self._checkpoint(epoch, dataclasses.asdict(stopped.progress))
            step = stopped.progress.step
            parts.log(f"{exp.name}: stopped by {signals.signal_name} in epoch {epoch + 1} after "
                      f"step {step}; checkpoint written")
            raise Interrupted(f"stopped by {signals.signal_name}; checkpoint written in "
                              f"{self.folder.path} at epoch {epoch + 1}, step {step}") from None
        self.partial = None
        return result

    def _record_epoch(self, epoch: int, result: EpochResult) -> None:
        row, exp = result.row, self.parts.experiment
        self.history.append(row)
        self.record.learn_history(self.history)
        if epoch + 1 == exp.train.epochs:  # for per-class analysis
            self._save_predictions(result)
        self._checkpoint(epoch + 1)  # first: metrics.csv never lists an epoch it lacks
        if self.main:
            self.folder.write_metrics(self.history, self.columns)
        split = "test" if "test_loss" in row else "val"
        self.parts.log(f"epoch {epoch + 1:>3}/{exp.train.epochs}  train loss "
                       f"{row['train_loss']:.4f}  {split} loss {row[f'{split}_loss']:.4f}  top-1 "
                       f"{row[f'{split}_top1']:.4f}  top-5 {row[f'{split}_top5']:.4f}  "
                       + (f"with flips {row['test_top1_tta']:.4f}  " if "test_top1_tta" in row
                          else "")
                       + f"{row['images_per_second']:,.0f} img/s  {row['epoch_seconds']:.1f} s")

    def _observe(self, callbacks: Sequence[Callback], row: dict) -> Stop | None:
        """Rank 0's callbacks see the epoch; every rank learns whether one asked to stop."""
        stop = None
        for callback in callbacks:
            stop = callback.on_epoch(self.parts.experiment, row) or stop
        if self.parts.ranks.world > 1 and self.parts.ranks.sum(float(stop is not None))[0]:
            stop = stop or Stop("stopped by a callback on rank 0")
        return stop

    def _save_predictions(self, result: EpochResult) -> None:
        if self.main and result.predictions is not None:
            self.folder.write_predictions(result.predictions,
                                          self.parts.splits.test.labels.cpu().numpy())

    def _checkpoint(self, epoch: int, partial: dict | None = None) -> None:
        if self.main:
            save_checkpoint(self.folder.checkpoint, **self.parts.state_dict(),
                            rng=rng_state(), epoch=epoch, history=self.history,
                            partial=partial, experiment=self.parts.experiment.to_dict())

    def _finish(self, status: str, **extra) -> dict:
        graph = self.parts.graph
        self.record.learn(peak_memory_mib=peak_memory_mib(self.parts.device),
                          cuda_graph=graph is not None and graph.graph is not None,
                          capture_seconds=graph.capture_seconds if graph else 0.0)
        return self.record.write(status, **extra)

