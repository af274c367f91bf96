"""A search's trials: what a search is (`Search`), its Optuna study, and the loop of one worker.

A trial is successive halving over complete schedules (issue 31). It trains the one-cycle run
of its first rung (`--min-epochs`) from scratch to its end, in a run folder of its own
(`trials/trial-NNNN/epochs-003`), with the test split switched off, and reports that run's
validation top-1 to Optuna; if the pruner keeps it, it trains the next rung's complete run
(3x the epochs), and so on up to `--epochs`. No trial is judged in the middle of its LR
schedule, where a regulariser (mixup, an EMA) has cost accuracy and not yet paid it back. A
trial that dies is queued again with its parameters and its folder: its finished rungs stand,
and the rung it was in resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..catalogue import PRESETS
from ..config import (
    RECIPE_SECTIONS,
    SECTION_OF,
    SECTIONS,
    Experiment,
)
from ..data.store import load_images
from ..errors import Interrupted, UsageError
from ..models import training_flops
from ..training.epoch import StopSignal
from ..training.run_folder import RunFolder
from ..training.trackers import Tracking, tag_runs
from ..training.train import run_in_folder
from .space import Space
from .storage import STOPPED, Claim, Storage, open_storage

OBJECTIVE = "validation top-1 at the end of the longest schedule (maximised)"
REDUCTION = 3  # each rung's schedule is 3x the last's; a third of its trials go on to the next
# Trials that spend the budget (`--trials`); a dead trial's retry counts in its place, and a
# configuration over --max-gflop-per-image is never trained, so it counts for nothing.
COUNTED = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING}
SPENT_FAILURES = ("diverged", "failed")
OVER_BUDGET = "over budget"
MAX_OVER_BUDGET = 50
WAIT_SECONDS = 2  # between looks at other workers' running trials, once all are started


@dataclasses.dataclass(frozen=True)
class Search:
    out: Path  # the search folder
    base: Experiment  # the searched experiment: fixed flags, fidelity and execution applied
    space: Space  # less the knobs that flags fix
    fixed: dict[str, Any]  # the recipe settings that flags fix
    trials: int
    timeout: float | None = None  # seconds after which no new trial starts
    max_gflop: float | None = None  # training GFLOP per image
    pruner: str = "halving"
    min_epochs: int = 3  # the first rung's complete schedule
    sampler: str = "tpe"
    storage: str | None = None  # None: the journal file in `out`
    name: str = "search"  # the Optuna study's name

    def definition(self) -> dict[str, Any]:
        """What makes a search this search: a folder holding another is refused."""
        recipe = {s: dataclasses.asdict(getattr(self.base, s)) for s in RECIPE_SECTIONS}
        return json.loads(json.dumps({
            "experiment": self.base.name, "recipe": recipe, "space": self.space.to_dict(),
            "objective": OBJECTIVE, "val_split": self.base.data.val_split,
            "data": self.base.data.data, "max_gflop_per_image": self.max_gflop,
            "pruner": self.pruner, "min_epochs": self.min_epochs, "sampler": self.sampler}))

    @property
    def rungs(self) -> tuple[int, ...]:
        """The epochs of each complete schedule a trial may train: `min_epochs` x 3^k while
        that is at most half of `epochs`, then `epochs` (3, 9, 25 for 3 and 25); one rung,
        `epochs`, without a pruner."""
        epochs = self.base.train.epochs
        if self.pruner == "none":
            return (epochs,)
        lower = itertools.takewhile(lambda e: e <= epochs / 2,
                                    (self.min_epochs * REDUCTION**k for k in itertools.count()))
        return (*lower, epochs)

    def tracking(self, run_name: str, **tags: str) -> Tracking:
        """A trial's run in the trackers: of the MLflow experiment named after the search."""
        return Tracking(self.out, self.name, run_name, tags)

    def run_folder(self, trial: optuna.trial.FrozenTrial | optuna.Trial) -> RunFolder:
        """The trial's folder, held while it runs: its rungs' run folders are inside it."""
        return RunFolder(self.out / trial.user_attrs.get("run",
                                                         f"trials/trial-{trial.number:04d}"))

    def defaults(self) -> dict[str, Any]:
        """Every recipe setting of the searched experiment: what a knob's `when` sees of the
        knobs that are not drawn."""
        return {name: getattr(getattr(self.base, section), name)
                for name, section in SECTION_OF.items() if section in RECIPE_SECTIONS}


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def outcome(trial: optuna.trial.FrozenTrial) -> str:
    """What became of a trial: completed, pruned after a rung's schedule, over budget, diverged,
    failed (with the error), stopped (by SIGTERM or Ctrl-C), or dead: failed by Optuna's
    heartbeat check, or by the journal's."""
    said = trial.user_attrs.get("outcome", "")
    if trial.state == TrialState.FAIL and said in ("", "running"):
        return "dead (its process ended)"
    return said


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    if outcome(trial).startswith(OVER_BUDGET):
        return False
    return trial.state in COUNTED or (trial.state == TrialState.FAIL
                                      and outcome(trial).startswith(SPENT_FAILURES))


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler()
        # group: the conditional knobs (nesterov, clipping) are modelled with those they need.
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True)


def make_pruner(name: str, min_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner, asked only at the end of a rung's complete schedule, with the rung's epochs
    as the step: halving keeps the best third of the trials that reached a rung (Optuna's
    asynchronous successive halving, whose rungs are min_epochs x 3^k); median, those at least
    as good as the median there."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs,
                                                  reduction_factor=REDUCTION)


def open_study(search: Search, storage: Storage, classes: int) -> optuna.Study:
    """The search's study: created with its first trials queued (`paper_rows`), or loaded and
    checked to be this search."""
    # The search prints its own line for every trial, a failed one too: Optuna's warnings of
    # those (with a traceback each) would only repeat it.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with storage.claim():
        study = optuna.create_study(
            study_name=search.name, storage=storage.optuna, direction="maximize",
            sampler=make_sampler(search.sampler),
            pruner=make_pruner(search.pruner, search.min_epochs),
            load_if_exists=True)
        stored = study.user_attrs.get("definition")
        if stored is None:
            study.set_user_attr("definition", search.definition())
            for name, params in paper_rows(search, classes)[:search.trials]:
                study.enqueue_trial(params, user_attrs={"paper_row": name})
        else:
            difference = first_difference(with_new_settings(stored), search.definition())
            if difference:
                raise UsageError(f"{search.out} holds another search ({difference}); "
                                 "choose another --out, or rerun it as it was started")
    return study


def paper_rows(search: Search, classes: int) -> list[tuple[str, dict[str, Any]]]:
    """The trials queued first, with their knobs: the searched experiment (the reference every
    draw is measured against), then the paper's rows, each where the space expresses it and the
    budget admits it. The flags' settings hold for them too: a row that then equals an earlier
    one is left out."""
    paper = PRESETS.groups()["paper"]
    queued = [] if search.base.name in paper else [(search.base.name, search.base)]
    queued += [(name, PRESETS.get(name).replace(**search.fixed)) for name in paper]
    rows, seen = [], set()
    for name, row in queued:
        params = search.space.params_of(row, search.base, search.fixed)
        if params is None or json.dumps(params, sort_keys=True) in seen:
            continue
        exp = trial_experiment(search, params)
        if search.max_gflop and training_flops(exp.model, classes) / 1e9 > search.max_gflop:
            continue
        seen.add(json.dumps(params, sort_keys=True))
        rows.append((name, params))
    return rows


def with_new_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """A definition as an earlier version stored it, with the settings added since at their
    defaults, which change nothing it searched: a long search goes on after an upgrade."""
    defaults = json.loads(json.dumps({s: dataclasses.asdict(SECTIONS[s]())
                                      for s in RECIPE_SECTIONS}))
    recipe = stored.get("recipe", {})
    return {**stored, "recipe": {s: {**defaults[s], **recipe.get(s, {})}
                                 for s in RECIPE_SECTIONS}}


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first place where two definitions differ, as `where: old, not new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else f"{path}: {old!r}, not {new!r}"


def trial_experiment(search: Search, drawn: dict[str, Any]) -> Experiment:
    """The searched experiment with a trial's knobs (`Space.experiment`)."""
    return search.space.experiment(search.base, drawn)


class NotTrained(Exception):
    """A trial that ends without a value: over the budget, diverged or failed (its outcome)."""


class Objective:
    """One trial: its folder held, the claim released, its knobs drawn, and its rungs trained
    (or resumed) until the pruner stops it or the last is done. The folder stays held in `held`
    until the caller closes it, after Optuna has been told the trial's end: a trial whose folder
    is free is taken for dead, and one freed before it was told was failed by another worker
    while it finished (Optuna then refused the finished trial's result)."""

    def __init__(self, search: Search, claim: Claim, classes: int,
                 held: contextlib.ExitStack) -> None:
        self.search, self.claim, self.classes, self.held = search, claim, classes, held

    def __call__(self, trial: optuna.Trial) -> float:
        folder = self.search.run_folder(trial)
        trial.set_user_attr("run", str(folder.path.relative_to(self.search.out)))
        trial.set_user_attr("outcome", "running")  # a retry's copy said "dead"
        self.held.enter_context(folder.hold())
        self.claim.done()  # only now: a trial with a free folder is a dead one
        try:
            return self._run(trial, folder)
        except Interrupted:  # its checkpoint written: not dead, and retried however often
            trial.set_user_attr("outcome", STOPPED)
            raise

    def _run(self, trial: optuna.Trial, folder: RunFolder) -> float:
        search = self.search
        drawn = search.space.draw(trial, search.defaults())
        try:
            exp = trial_experiment(search, drawn)
        except UsageError as e:
            return self._end(trial, f"failed: {e}")
        gflop = training_flops(exp.model, self.classes) / 1e9
        trial.set_user_attr("gflop_per_image", gflop)
        if search.max_gflop and gflop > search.max_gflop:
            # Pruned, not failed: TPE ranks a pruned trial that reported nothing below every
            # other, and so learns where the budget lies; it never sees a failed one.
            return self._end(trial, f"{OVER_BUDGET}: {gflop:.3f} GFLOP per image, more than "
                                    f"--max-gflop-per-image {search.max_gflop:g}; not trained",
                             optuna.TrialPruned(OVER_BUDGET))
        seconds = 0.0
        for epochs in search.rungs:
            summary = self._rung(trial, folder, exp.replace(epochs=epochs))
            seconds += summary.get("train_seconds") or 0.0
            trial.set_user_attr("epochs", summary.get("epochs"))
            trial.set_user_attr("seconds", seconds)  # all its rungs, resumed or not
            if summary["status"] == "failed":  # out of memory, say: this trial, not the search
                return self._end(trial, f"failed: {summary.get('error', 'no reason recorded')}")
            if summary["status"] != "completed":
                return self._end(trial, f"diverged in epoch {summary.get('diverged_epoch')} of "
                                        f"its {epochs}-epoch schedule")
            if epochs == search.rungs[-1]:
                break
            trial.set_user_attr(rung_name(epochs), {  # for a retry elsewhere (`_rung`)
                "val_top1": summary["val_top1"], "train_seconds": summary.get("train_seconds")})
            trial.report(summary["val_top1"], epochs)
            if trial.should_prune():
                return self._end(trial, f"pruned after its {epochs}-epoch schedule",
                                 optuna.TrialPruned(f"pruned by the {search.pruner} pruner"))
        return self._end(trial, "completed", value=float(summary["val_top1"]))

    def _rung(self, trial: optuna.Trial, folder: RunFolder, exp: Experiment) -> dict:
        """One rung's complete schedule, in its own run folder inside the trial's: trained,
        resumed, or read back where a retried trial had finished it: from the folder, or,
        where the folder did not come with the journal (another machine), from the storage.
        Each rung is its own schedule from scratch, so a rung that ended need never run again."""
        epochs = exp.train.epochs
        rung = RunFolder(folder.path / rung_name(epochs))
        name = str(rung.path.relative_to(self.search.out))
        trial.set_user_attr("rung", name)
        ended = trial.user_attrs.get(rung_name(epochs))  # a retry's copy of what its trial ended
        if ended is not None and rung.state() == "absent":
            return {"status": "completed", "epochs": epochs, **ended}
        tracking = self.search.tracking(name.removeprefix("trials/"), trial=str(trial.number),
                                        rung_epochs=str(exp.train.epochs))
        with rung.hold(), rung.log_lines() as log:  # the rung's lines, in its folder
            return run_in_folder(exp, rung, tracking=tracking, log=log)

    def _end(self, trial: optuna.Trial, what: str, error: Exception | None = None,
             value: float | None = None) -> float:
        """The trial's outcome, in Optuna and on its tracked runs; its value, or the error
        that tells Optuna it has none (NotTrained, TrialPruned)."""
        trial.set_user_attr("outcome", what)
        if "mlflow" in self.search.base.execution.log:
            rungs = self.search.run_folder(trial).path.glob("epochs-*")
            tag_runs(map(RunFolder, sorted(rungs)), {"resnet_study.outcome": what},
                     self.search.tracking(""), _warn)
        if value is not None:
            return value
        raise error or NotTrained(what)


def rung_name(epochs: int) -> str:
    """A rung's run folder in its trial's, and the trial's record of it once it has ended."""
    return f"epochs-{epochs:03d}"


def work(search: Search, deadline: float | None = None) -> None:
    """One worker: take trials until the search has as many as asked for (or the deadline
    passes). Any number of workers, here or on other machines, share one search this way.

    SIGTERM or SIGINT during a trial's training checkpoints it and stops (`Interrupted`); at
    any other moment (Optuna's storage, a trial's start) it stops the worker before its next
    trial, so that no write to the storage is cut. A stopped trial stays running in the storage,
    and the next invocation retries it from its checkpoint."""
    storage = open_storage(search.storage, search.out, search.name)
    classes = len(load_images(search.base.data.data, progress=False).classes)
    study = open_study(search, storage, classes)
    over_budget = 0  # draws in a row that cost too much: a space that cannot be searched
    with StopSignal() as signals:
        while deadline is None or time.time() < deadline:
            if signals.signal_name is not None:
                raise Interrupted(f"stopped by {signals.signal_name} between trials")
            ran = _next_trial(search, storage, study, classes)
            if ran == "done":
                return
            if ran != "waited":
                over_budget = over_budget + 1 if outcome(ran).startswith(OVER_BUDGET) else 0
            if over_budget >= MAX_OVER_BUDGET:
                raise UsageError(f"{MAX_OVER_BUDGET} configurations in a row cost more than "
                                 f"--max-gflop-per-image {search.max_gflop:g}: raise it, or take "
                                 "the costly choices (width, say) out of the space")


def _next_trial(search: Search, storage: Storage, study: optuna.Study,
                classes: int) -> optuna.trial.FrozenTrial | str:
    """The next trial of the search, run by this worker (not another worker's); "waited" when
    the search is full but trials still run (one may be dead, its retry left to take); "done"
    when nothing is left to run or wait for."""
    ran: list[optuna.trial.FrozenTrial] = []
    with storage.claim() as claim:
        storage.retry_dead_trials(study, search.run_folder)
        trials = study.get_trials(deepcopy=False)
        if (sum(map(counted, trials)) < search.trials
                or any(t.state == TrialState.WAITING for t in trials)):
            with contextlib.ExitStack() as held:  # the trial's folder, until it is told
                study.optimize(Objective(search, claim, classes, held), n_trials=1,
                               catch=(NotTrained,), gc_after_trial=False,
                               callbacks=[lambda _, trial: ran.append(trial)])
            return ran[-1]
    if not any(t.state == TrialState.RUNNING for t in trials):
        return "done"
    time.sleep(WAIT_SECONDS)
    return "waited"
