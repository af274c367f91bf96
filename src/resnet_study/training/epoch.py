"""One epoch of training and the evaluation after it.

The loop keeps the device busy: data and augmentation already live on the device
(`data.loader.DeviceLoader`), and the loss is read back to the host only every `LOG_EVERY`
steps (for the progress bar and the divergence check), never once per step. An epoch returns an
`EpochResult`, or raises `Diverged` (a non-finite loss) or `StopRequested` (a signal arrived;
it carries where the epoch stood, so that a resumed run finishes it exactly).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.loader import DeviceLoader
from .device import autocast

if TYPE_CHECKING:
    from .assembly import Assembly

LOG_EVERY = 20  # steps between host reads of the loss


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader, amp: torch.dtype | None,
             tta: bool = False) -> dict[str, Any]:
    """Mean loss, top-1 and top-5 accuracy over a whole split (sums kept on the device),
    and the top-1 prediction for every image, in the split's order; with `tta`, also top-1
    with each image's mirror image (`top1_tta`), the two views' softmaxes averaged."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros(3, device=device, dtype=torch.int64)
    predictions = []
    for x, y in loader.epoch(0):
        with autocast(device, amp):
            logits = model(x)
            mirrored = model(x.flip(3)).float() if tta else None
        logits = logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        both = (logits.softmax(1) + mirrored.softmax(1)).argmax(1) == y if tta else hits[:, 0]
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), both.sum()])
        predictions.append(top[:, 0])
    model.train(was_training)
    n = loader.num_images
    top1, top5, top1_tta = (correct.double() / n).tolist()
    return {"loss": loss.item() / n, "top1": top1, "top5": top5,
            "predictions": torch.cat(predictions).cpu().numpy(),
            **({"top1_tta": top1_tta} if tta else {})}


class StopSignal:
    """Turns SIGTERM and SIGINT into a request the training loop honours after its current
    step; a second signal stops at once (KeyboardInterrupt). `on_signal`, if given, hears each
    signal first (a study passes it on to its workers)."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signal_name: str | None = None
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # only it can take signals
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
            # A signal that an enclosing StopSignal took (a search worker's, while its trial
            # was starting) is this one's too: the run stops at its first step.
            outer = getattr(self._previous[signal.SIGTERM], "__self__", None)
            if isinstance(outer, StopSignal) and self.signal_name is None:
                self.signal_name = outer.signal_name
        return self

    def _handle(self, signum: int, frame) -> None:
        if self._on_signal is not None:
            self._on_signal(signum)
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class EpochProgress:
    """Where an epoch stood when a stop was requested: enough to finish it exactly."""

    step: int  # batches done
    loss_sum: float
    seen: int
    seconds: float


@dataclasses.dataclass
class EpochResult:
    row: dict[str, float]  # the epoch's metrics.csv row
    predictions: np.ndarray | None  # the test split's top-1 predictions after it, if tested


class Diverged(Exception):
    """The training loss, the weights or the evaluation loss became non-finite."""


class StopRequested(Exception):
    """A signal asked the run to stop; `progress` is where the epoch stood."""

    def __init__(self, progress: EpochProgress) -> None:
        super().__init__(f"stopped at step {progress.step}")
        self.progress = progress


def run_epoch(parts: Assembly, epoch: int, stop: StopSignal | None = None,
              partial: dict | None = None, progress: bool = True) -> EpochResult:
    """Epoch `epoch` of `parts.step` (from `partial`, where a stopped run left it), then the
    test split (and validation split) on the plain module."""
    loader, ranks = parts.splits.train, parts.ranks
    done = EpochProgress(**partial) if partial else EpochProgress(0, 0.0, 0, 0.0)
    # Sums over all ranks are kept by rank 0 alone, so that reducing them again is exact.
    loss_sum = torch.tensor(done.loss_sum if ranks.main else 0.0, device=parts.device,
                            dtype=torch.float64)
    seen = done.seen if ranks.main else 0
    start = time.perf_counter() - done.seconds
    bar = tqdm(total=len(loader), initial=done.step,
               desc=f"epoch {epoch + 1}/{parts.experiment.train.epochs}", unit="batch",
               leave=False, disable=not progress, dynamic_ncols=True)

    def totals() -> tuple[float, int]:
        total, count = ranks.sum(loss_sum.item(), seen)
        return total, int(count)

    def stop_now(step: int) -> bool:
        """Whether to stop before `step`. One process checks every step; under torchrun the
        ranks, which must stop at the same step, agree at the epoch's first step and every
        LOG_EVERY steps after it (one small all-reduce)."""
        if stop is None:
            return False
        if ranks.world == 1:
            return stop.signal_name is not None
        return ((step - done.step) % LOG_EVERY == 0
                and ranks.sum(float(stop.signal_name is not None))[0] > 0)

    with bar:
        for step, (x, y) in enumerate(loader.epoch(epoch, start=done.step), start=done.step):
            if stop_now(step):
                raise StopRequested(EpochProgress(step, *totals(), time.perf_counter() - start))
            global_batch = min(loader.batch_size, loader.num_images - step * loader.batch_size)
            share = len(y) * ranks.world / global_batch if ranks.world > 1 else 1.0
            loss_sum += parts.step(x, y, share) * len(y)
            if parts.ema is not None:  # eager, after a replayed graph too
                parts.ema.update_parameters(parts.model)
            seen += len(y)
            bar.update()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == len(loader):
                total, count = totals()  # the one host sync every LOG_EVERY steps
                if not math.isfinite(total):
                    raise Diverged(f"non-finite loss in epoch {epoch + 1}")
                bar.set_postfix(loss=f"{total / count:.3f}",
                                img_s=f"{count / (time.perf_counter() - start):,.0f}")
    if not _finite(parts.model):  # the loss above came before the epoch's last update
        raise Diverged(f"non-finite weights after epoch {epoch + 1}")
    train_seconds = time.perf_counter() - start
    total, seen = totals()
    result = _evaluated(parts, epoch, total / seen, seen, start, train_seconds)
    # Finite weights can still be large enough to overflow the network's output.
    if not all(math.isfinite(v) for k, v in result.row.items() if k.endswith("_loss")):
        raise Diverged(f"non-finite evaluation loss after epoch {epoch + 1}")
    return result


def _finite(model: torch.nn.Module) -> bool:
    """Whether every parameter and buffer is finite: one host sync (which also waits for the
    device to finish the epoch)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _evaluated(parts: Assembly, epoch: int, train_loss: float, seen: int, start: float,
               train_seconds: float) -> EpochResult:
    splits = parts.splits
    row: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss}
    measured = {}  # each split's evaluation; their .item() calls sync the device
    # Flips are tested once, after the last epoch: every epoch they would add a forward pass
    # of the test split (3-4% of a run's time on this CPU) for a figure only the summary reports.
    tta = parts.experiment.train.tta and epoch + 1 == parts.experiment.train.epochs
    for name, loader in (("test", splits.test), ("val", splits.val)):
        if loader is not None:
            measured[name] = evaluate(parts.evaluated, loader, parts.amp,
                                      tta=tta and name == "test")
    if "test" in measured:
        row.update({f"test_{k}": measured["test"][k] for k in ("loss", "top1", "top5")})
        row.update({"test_top1_tta": measured["test"]["top1_tta"]} if tta else {})
    row.update(lr=parts.scheduler.get_last_lr()[0], epoch_seconds=time.perf_counter() - start,
               eval_seconds=time.perf_counter() - start - train_seconds,
               images_per_second=seen / train_seconds)
    if "val" in measured:
        row.update({f"val_{k}": measured["val"][k] for k in ("loss", "top1", "top5")})
    return EpochResult(row, measured["test"]["predictions"] if "test" in measured else None)
