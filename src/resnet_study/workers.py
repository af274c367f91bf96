"""One pool of worker processes, for the study's runs and the search's workers alike.

Each worker is a spawned process (CUDA cannot be forked) holding one device and its share of
the cores. It leaves the terminal's process group, so that a Ctrl-C reaches the parent alone,
which passes SIGTERM or SIGINT on to every worker once: each worker's run writes a checkpoint
and stops, jobs not yet started stay unstarted, and the parent raises `Interrupted` (the
command exits 75: rerun it to go on). Should the parent die without passing anything on
(SIGKILL), each worker notices and stops its run the same way.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing.synchronize import Event as EventType
from typing import Any, TypeVar

from .errors import Interrupted
from .training.device import share_cores
from .training.epoch import StopSignal

Job = TypeVar("Job")


@dataclasses.dataclass(frozen=True)
class Worker:
    """What a job sees of the worker running it: its device, and a line back to the parent."""

    device: str
    messages: Any  # a multiprocessing queue

    def tell(self, message: Any) -> None:
        """Send `message` to the parent's `on_message`, while the job goes on."""
        self.messages.put(message)


def run_jobs(work: Callable[[Job, Worker], Any], jobs: Sequence[Job], devices: Sequence[str], *,
             on_done: Callable[[Job, Any], None],
             on_message: Callable[[Any], None] = lambda message: None) -> None:
    """`work(job, worker)` for each job, in one worker per entry of `devices`, as many at once.
    `on_done(job, result)` hears each finished job in this process; a job whose worker raised
    hears the exception as its result. A job the stop ended, or never started, is not heard.
    `work` must be a module-level function (it is pickled to the workers)."""
    ctx = mp.get_context("spawn")
    queue, messages, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    for device in devices:
        queue.put(device)

    def pass_on(signum: int) -> None:
        if not stop.is_set():  # once: a second signal would stop the runs without checkpoints
            stop.set()
            for child in mp.active_children():
                os.kill(child.pid, signum)

    with (StopSignal(pass_on) as signals,
          ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_worker,
                              initargs=(queue, messages, stop, len(devices))) as pool):
        pending: dict[Future, Job] = {pool.submit(_call, work, job): job for job in jobs}
        while pending:
            finished, _ = wait(pending, timeout=1, return_when=FIRST_COMPLETED)
            while not messages.empty():
                on_message(messages.get())
            for f in finished:
                job = pending.pop(f)
                result = _result(f, stopped=signals.signal_name is not None)
                if result is not _Stopped:
                    on_done(job, result)
    if signals.signal_name is not None:
        raise Interrupted(f"stopped by {signals.signal_name}; the runs in progress wrote "
                          "checkpoints")


class _Stopped:
    """The result of a job the stop ended, or that never started (a class, so that it is
    itself after pickling)."""


_worker: Worker | None = None
_stop: EventType | None = None


def _init_worker(devices: Any, messages: Any, stop: EventType, workers: int) -> None:
    global _worker, _stop
    _worker, _stop = Worker(devices.get(), messages), stop
    share_cores(workers)
    os.setpgrp()
    threading.Thread(target=_stop_when_orphaned, daemon=True).start()


def _stop_when_orphaned() -> None:
    """SIGTERM stops the worker's run with a checkpoint, after which the worker exits, having
    no one to report to (an idle worker it just ends)."""
    mp.parent_process().join()
    os.kill(os.getpid(), signal.SIGTERM)


def _call(work: Callable[[Job, Worker], Any], job: Job) -> Any:
    if _stop.is_set():
        return _Stopped
    try:
        return work(job, _worker)
    finally:
        if not mp.parent_process().is_alive():
            os._exit(1)


def _result(f: Future, stopped: bool) -> Any:
    """The job's result, the exception its worker raised, or _Stopped."""
    try:
        return f.result()
    except Interrupted:  # the parent's signal, passed on
        return _Stopped
    except Exception as e:  # the worker itself died (killed for memory), or the job raised
        return _Stopped if stopped else e
