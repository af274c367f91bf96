"""`resnet-study search`: its workers, its progress, and what it writes when they are done.

The workers (`trials.work`) are this process for `--workers 1`, else that many of the pool
that runs a study's runs (`workers`), and they stop as a study's do; this process follows the
search through its storage, with a progress bar (the trials done of those asked for, and an
ETA) and one line per finished trial, whoever ran it, and rewrites the folder's outputs as
trials end, so that a search of many hours can be read while it runs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from ..data.splits import check_sizes
from ..data.store import load_images
from ..errors import UsageError, one_line
from ..training.trackers import check as check_trackers
from ..workers import Worker, run_jobs
from .outputs import write_outputs
from .storage import open_storage
from .trials import Search, counted, open_study, outcome, work

POLL_SECONDS = 2.0
OUTPUTS_SECONDS = 300.0  # how often, at most, outputs are rewritten as trials end (figures cost)


def run_search(search: Search, workers: int = 1, quiet: bool = False) -> dict:
    """Run the search to its `--trials` (or `--timeout`), then write its folder's trials.csv,
    figures, page and best.toml. Rerun after a kill, it goes on where the trials stand."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    images = load_images(search.base.data.data)
    check_sizes(search.base, len(images.train_labels))
    try:
        search.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write the search to {search.out} ({e.strerror or e}); "
                         "choose another --out") from None
    check_trackers(search.base.execution.log, search.tracking(""))
    storage = open_storage(search.storage, search.out, search.name)
    study = open_study(search, storage, len(images.classes))  # refuses another search here
    deadline = time.time() + search.timeout if search.timeout else None
    progress = Progress(study, search.trials, quiet,
                        outputs=lambda: write_outputs(search, study, images))
    with progress:
        if workers == 1:
            work(search, deadline)
        else:
            _in_workers(search, workers, deadline)
    return write_outputs(search, study, images)


def _in_workers(search: Search, workers: int, deadline: float | None) -> None:
    """`workers` workers of the pool (`workers`), each taking trials until the search has its
    `--trials`. A worker's error (a space whose draws are all over budget, say) ends the search
    with that one line, once the others are done."""
    errors: list[Exception] = []
    run_jobs(_work_on_worker, [(search, deadline)] * workers,
             [search.base.execution.device] * workers,
             on_done=lambda job, result: errors.append(result)
             if isinstance(result, Exception) else None)
    if errors:
        e = errors[0]
        raise e if isinstance(e, UsageError) else UsageError(
            f"a search worker ended with an error ({one_line(e)}); rerun the same command to "
            "go on")


def _work_on_worker(job: tuple[Search, float | None], worker: Worker) -> None:
    work(*job)


class Progress:
    """A progress bar over the trials asked for, and one line per trial as it finishes,
    read from the study (so a trial of any worker, here or elsewhere, is seen); after a trial
    ends, `outputs` (the folder's trials.csv, page and best.toml) at most every
    OUTPUTS_SECONDS. A failed write of them is one line, and the search goes on."""

    def __init__(self, study: optuna.Study, total: int, quiet: bool,
                 outputs: Callable[[], object]) -> None:
        self.study, self.total, self.quiet, self.outputs = study, total, quiet, outputs
        self.written = time.monotonic()
        self.seen = {t.number for t in self._finished()}
        self.bar = tqdm(total=total, initial=min(total, len(self.seen)), unit="trial",
                        desc="search", disable=quiet, dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        self.bar.close()

    def _finished(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state.is_finished()]

    def _follow(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            if self._update() and time.monotonic() - self.written >= OUTPUTS_SECONDS:
                self.written = time.monotonic()
                try:
                    self.outputs()
                except Exception as e:  # the final write, after the trials, still says why
                    self._say(f"search: the outputs so far were not written ({one_line(e)}); "
                              "the search goes on")

    def _update(self) -> bool:
        """Report the trials finished since the last call; whether there were any."""
        new = [t for t in self._finished() if t.number not in self.seen]
        for t in new:
            self.seen.add(t.number)
            if counted(t):
                self.bar.update()
            self._say(trial_line(t))
        return bool(new)

    def _say(self, line: str) -> None:
        (tqdm.write if not self.quiet else lambda m: print(m, file=sys.stderr))(line)


def trial_line(t: optuna.trial.FrozenTrial) -> str:
    """One finished trial in one line: its outcome, value, epochs, time and knobs."""
    value = f"val top-1 {t.value:.4f}" if t.state == TrialState.COMPLETE else outcome(t)
    if t.state == TrialState.PRUNED and t.intermediate_values:
        value = (f"pruned after its {max(t.intermediate_values)}-epoch schedule (val top-1 "
                 f"{t.intermediate_values[max(t.intermediate_values)]:.4f})")
    seconds = t.user_attrs.get("seconds")
    took = f", {seconds:.0f} s" if seconds else ""
    row = f" [{t.user_attrs['paper_row']}]" if "paper_row" in t.user_attrs else ""
    knobs = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
    return f"search: trial {t.number}{row}: {value}{took} | {knobs}"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
