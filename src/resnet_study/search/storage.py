"""Where a search keeps its trials: Optuna's journal file in the search folder (one machine, any
number of processes), or PostgreSQL (many machines), through Optuna's own storages.

Two things are added to what Optuna gives, both for several workers on one search:
- a *claim*, held while a worker takes its next trial, so that workers never start more trials
  than asked for (a file lock beside the journal; a PostgreSQL advisory lock on a server);
- on the journal, which has no heartbeat, a trial left RUNNING is known dead when no process
  holds its run folder's lock (`RunFolder`): a live trial holds it from before it leaves the
  claim until it is told. PostgreSQL trials use Optuna's heartbeat instead.
Either way the trial is queued again (`retry`): a stopped one however often, a dead one up to
MAX_RETRIES times.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ..errors import UsageError

HEARTBEAT_SECONDS = 10  # a PostgreSQL trial's heartbeat; one silent for GRACE_SECONDS is dead
GRACE_SECONDS = 60
MAX_RETRIES = 3  # of a trial whose process died, not of one stopped
STOPPED = "stopped"  # the outcome of a trial that SIGTERM or Ctrl-C stopped at a checkpoint


@dataclasses.dataclass
class Storage:
    optuna: optuna.storages.BaseStorage
    url: str | None  # None: the journal file
    folder: Path  # the search folder
    name: str  # the Optuna study's name

    @property
    def journal(self) -> bool:
        return self.url is None

    @contextlib.contextmanager
    def claim(self) -> Iterator[Claim]:
        """Held while this worker takes its next trial: no other worker takes one meanwhile."""
        claim = Claim()
        if self.journal:
            with open(self.folder / ".claim.lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                claim.release = lambda: fcntl.flock(f, fcntl.LOCK_UN)
                try:
                    yield claim
                finally:
                    claim.done()
            return
        with advisory_lock(self.url, self.name) as release:
            claim.release = release
            try:
                yield claim
            finally:
                claim.done()

    def retry_dead_trials(self, study: optuna.Study, run_folder) -> list[int]:
        """Fail each RUNNING trial whose process is gone and queue it again: on a server, those
        whose heartbeat stopped (Optuna's check); on the journal, those whose run folder no one
        holds. Call it under the claim, so that no live trial is between its start and its
        folder's lock."""
        if not self.journal:  # the heartbeat's own check, which queues the dead again
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            return []
        dead = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if run_folder(trial).running_elsewhere():
                continue
            trial_id = self.optuna.get_trial_id_from_study_id_trial_number(
                self.optuna.get_study_id_from_name(study.study_name), trial.number)
            if self.optuna.set_trial_state_values(trial_id, TrialState.FAIL):
                retry(study, self.optuna.get_trial(trial_id))
                dead.append(trial.number)
        return dead


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial whose process is gone again, with its parameters and user attributes
    (Optuna's retry). One stopped by SIGTERM or Ctrl-C (it wrote its checkpoint) however often:
    stopping and rerunning is how a search of many hours goes on across sessions. One that died
    (SIGKILL, a lost machine, a crash) up to MAX_RETRIES times, counted in its `deaths`."""
    if trial.user_attrs.get("outcome") != STOPPED:
        deaths = trial.user_attrs.get("deaths", 0) + 1
        if deaths > MAX_RETRIES:
            return
        trial = copy.copy(trial)
        trial.user_attrs = {**trial.user_attrs, "deaths": deaths}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback()(study, trial)


@contextlib.contextmanager
def advisory_lock(url: str, name: str) -> Iterator[Callable[[], None]]:
    """A PostgreSQL advisory lock named by `name`, held until released or left; it goes with
    its connection, so a dead worker's goes with it."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})

            def release() -> None:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()

            yield release
    finally:
        engine.dispose()


class Claim:
    """A claim's release, called once: by the trial as soon as it holds its run folder, or on
    leaving the claim."""

    def __init__(self) -> None:
        self.release = lambda: None
        self.released = False

    def done(self) -> None:
        if not self.released:
            self.released = True
            self.release()


def open_storage(url: str | None, folder: Path, name: str) -> Storage:
    """The storage `--storage` names (None: the journal file in `folder`), reachable, or one
    line that says what is wrong with it."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = folder / "journal.log"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return Storage(optuna.storages.JournalStorage(backend), None, folder, name)
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        raise UsageError("--storage: SQLite is not for parallel workers (Optuna's documentation "
                         "warns against it); leave --storage out for the journal file, or give "
                         "postgresql://...")
    if not scheme.startswith("postgresql"):
        raise UsageError(f"--storage takes postgresql://user:password@host:port/database, not "
                         f"{_masked(url)!r}; leave it out for the journal file in --out")
    import sqlalchemy

    try:  # Optuna creates its tables on first use; two workers doing so at once collide
        with advisory_lock(url, "resnet-study: Optuna's tables"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=retry,
                engine_kwargs={"pool_pre_ping": True})
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:
        reason = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
        raise UsageError(f"--storage {_masked(url)}: cannot open it ({reason})") from None
    return Storage(storage, url, folder, name)


def _masked(url: str) -> str:
    """The URL without its password, as every message shows it."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
