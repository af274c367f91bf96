"""The experiment trackers a run writes to beside its folder (`--log tensorboard,mlflow`).

Each is a `Callback`. TensorBoard writes the run folder's `tensorboard/` (where the optional
extra is installed). MLflow makes each run an MLflow run, in an MLflow experiment per study or
search (`Tracking`): its whole recipe as params, its label as tags, every epoch's metrics with
the epoch as step, config.json and summary.json as artifacts, and its end as the run's status.
A resumed run goes on in the MLflow run it started. The store is MLflow's own
(`MLFLOW_TRACKING_URI`), else a SQLite file inside the study's, search's or run's folder.

A tracker that fails mid-run (store unwritable, disk full) costs the run nothing: one warning
line, and the run's folder stays the record (`Guarded`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import SECTIONS, Experiment
from ..errors import UsageError, one_line
from .callbacks import Callback, RunStart, Stop
from .run_folder import RunFolder

TRACKERS = ("tensorboard", "mlflow")
# A run's end as MLflow's run status; "interrupted" is a signal's stop, resumed later.
MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED"}


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where the command that trains a run wants it tracked."""

    root: Path  # the study's, search's or single run's folder
    experiment: str  # MLflow's experiment: that folder's name
    run_name: str  # "resnet18-adam/seed-0", "trial-0003/epochs-009"
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, root: Path, run_name: str, **tags: str) -> Tracking:
        """A run of a study or search in `root`, whose experiment is named after it."""
        return cls(Path(root), Path(root).resolve().name, run_name, tags)

    @classmethod
    def of_run(cls, out: Path, exp: Experiment) -> Tracking:
        """The `train` command's run in `out`: a run of the experiment named after its recipe,
        its store inside `out`."""
        return cls(Path(out), exp.name, Path(out).resolve().name)

    @property
    def uri(self) -> str:
        return (os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.root / 'mlflow.db').resolve()}")

    @property
    def artifact_location(self) -> str | None:
        """A new experiment's artifacts: beside its SQLite store; on a user's server, the
        server's choice."""
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return None
        return (self.root / "mlflow-artifacts").resolve().as_uri()


def check(names: Iterable[str], tracking: Tracking) -> None:
    """Before any run starts: MLflow importable, its store reachable and the experiment made,
    so that a study's or search's workers only add runs to it (never race to create its
    tables). One line (UsageError) otherwise."""
    if "mlflow" not in names:
        return
    client = _client(tracking.uri)
    try:
        tracking.root.mkdir(parents=True, exist_ok=True)
        _experiment_id(client, tracking)
    except Exception as e:
        raise UsageError(f"--log mlflow: cannot use the tracking store {tracking.uri} "
                         f"({one_line(e)}); set MLFLOW_TRACKING_URI to one you can write, or "
                         "leave mlflow out of --log") from None


def trackers(exp: Experiment, tracking: Tracking, log: Callable[[str], None]) -> list[Callback]:
    """The run's trackers, as `--log` names them, each guarded."""
    made = {"tensorboard": TensorBoard, "mlflow": lambda: MLflow(tracking)}
    return [Guarded(made[name](), name, log) for name in exp.execution.log]


def tag_runs(folders: Iterable[RunFolder], tags: dict[str, str], tracking: Tracking,
             log: Callable[[str], None]) -> None:
    """Add tags to the MLflow runs of these run folders (a search's trial outcome, known only
    after its runs end); a failure is one warning line."""
    ids = [i for i in (f.tracker_runs().get("mlflow") for f in folders) if i]
    if not ids:
        return
    try:
        client = _client(tracking.uri)
        for run_id in ids:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
    except Exception as e:
        log(f"warning: mlflow could not tag runs {', '.join(ids)} ({one_line(e)})")


class Guarded(Callback):
    """A tracker whose first failure is one warning line, after which it is left out: the run
    goes on. A tracker never stops a run."""

    def __init__(self, tracker: Callback, name: str, log: Callable[[str], None]) -> None:
        self.tracker, self.name, self.log = tracker, name, log
        self.broken = False

    def _call(self, method: str, *args) -> None:
        if self.broken:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as e:
            self.broken = True
            self.log(f"warning: {self.name} stopped tracking this run ({one_line(e)}); "
                     "training goes on, and the run's folder is its record")

    def on_start(self, run: RunStart) -> None:
        self._call("on_start", run)

    def on_epoch(self, experiment: Experiment, row: dict) -> Stop | None:
        self._call("on_epoch", experiment, row)
        return None

    def on_end(self, summary: dict) -> None:
        self._call("on_end", summary)


class TensorBoard(Callback):
    """Every metric of every epoch, into the run folder's tensorboard/; nothing where the
    optional extra is not installed (the default `--log` names it)."""

    def __init__(self) -> None:
        self.writer = None

    def on_start(self, run: RunStart) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(str(run.folder.path / "tensorboard"))

    def on_epoch(self, experiment: Experiment, row: dict) -> None:
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(key, value, int(row["epoch"]))
            self.writer.flush()

    def on_end(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow(Callback):
    def __init__(self, tracking: Tracking) -> None:
        self.tracking = tracking
        self.client = None
        self.run_id: str | None = None
        self.folder: RunFolder | None = None

    def on_start(self, run: RunStart) -> None:
        self.client, self.folder = _client(self.tracking.uri), run.folder
        started = run.folder.tracker_runs().get("mlflow")
        if started is not None and self._in_store(started):
            self.run_id = started
            self.client.update_run(started, status="RUNNING")
            return
        exp = run.experiment
        tags = {"resnet_study.experiment": exp.name, "resnet_study.settings": exp.settings,
                "resnet_study.folder": str(run.folder.path.resolve()),
                **{f"resnet_study.{k}": str(v) for k, v in run.facts.items()},
                **self.tracking.tags}
        self.run_id = self.client.create_run(_experiment_id(self.client, self.tracking),
                                             run_name=self.tracking.run_name,
                                             tags=tags).info.run_id
        run.folder.write_tracker_run("mlflow", self.run_id)
        self.client.log_batch(self.run_id, params=_params(exp))

    def on_epoch(self, experiment: Experiment, row: dict) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(row["epoch"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in row.items() if k != "epoch"])

    def on_end(self, summary: dict) -> None:
        for name in ("config.json", "summary.json"):
            if (self.folder.path / name).is_file():
                self.client.log_artifact(self.run_id, str(self.folder.path / name))
        self.client.set_tag(self.run_id, "resnet_study.status", summary.get("status", ""))
        self.client.set_terminated(self.run_id,
                                   MLFLOW_STATUS.get(summary.get("status"), "FAILED"))

    def _in_store(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # another store, or a run deleted there
            return False
        return True


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError("--log mlflow needs MLflow: pip install 'resnet-study[mlflow]' (or "
                         "mlflow itself)") from None
    for name in ("mlflow", "alembic"):  # their INFO lines on making a store's tables
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, tracking: Tracking) -> str:
    """The experiment's id, made if it is not there (by another worker at the same moment:
    then the one it made)."""
    found = client.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(tracking.experiment,
                                         artifact_location=tracking.artifact_location)
    except Exception:
        found = client.get_experiment_by_name(tracking.experiment)
        if found is None:
            raise
        return found.experiment_id


def _params(exp: Experiment) -> list:
    """The whole recipe and its execution, one param a setting: `train.lr`, `model.width`."""
    from mlflow.entities import Param

    d = exp.to_dict()
    return [Param(f"{section}.{key}", str(value))
            for section in SECTIONS for key, value in d[section].items()]
