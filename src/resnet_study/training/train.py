"""The paper's training recipe: one-cycle LR per batch, checkpoints every epoch, exact resume.

The loop keeps the device busy: data and augmentation already live on the device
(`data.DeviceLoader`), the loss is read back to the host only every `LOG_EVERY` steps
(for the progress bar and the divergence check), never once per step, and on a GPU the step
itself can replay as one CUDA graph (`step.GraphStep`, `--cuda-graphs`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import Experiment, Interrupted, TrainConfig, UsageError
from ..data.loader import DeviceLoader
from ..data.splits import Splits, make_splits
from ..files import atomic_open, write_csv, write_json
from ..models import build_model, count_params
from .checkpoint import (
    check_same_experiment,
    load_checkpoint,
    read_summary,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .device import (
    Ranks,
    autocast,
    autocast_dtype,
    init_ranks,
    peak_memory_mib,
    precision_name,
    reset_peak_memory,
    resolve_device,
    set_determinism,
)
from .step import GraphStep, Step, make_optimizer, make_scheduler, make_step

LOG_EVERY = 20  # steps between host reads of the loss
METRICS = ["epoch", "train_loss", "test_loss", "test_top1", "test_top5", "lr", "epoch_seconds",
           "eval_seconds", "images_per_second"]
VAL_METRICS = ["val_loss", "val_top1", "val_top5"]
EXIT_DIVERGED = 3


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader,
             amp: torch.dtype | None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy over a whole split (sums kept on the device),
    and the top-1 prediction for every image, in the split's order."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros(2, device=device, dtype=torch.int64)
    predictions = []
    for x, y in loader.epoch(0):
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        predictions.append(top[:, 0])
    model.train(was_training)
    n = loader.num_images
    top1, top5 = (correct.double() / n).tolist()
    return {"loss": loss.item() / n, "top1": top1, "top5": top5,
            "predictions": torch.cat(predictions).cpu().numpy()}


# --- the run ----------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(out / "tensorboard"))


class StopRequest:
    """Turns SIGTERM and SIGINT into a request the training loop honours after its current
    step; a second signal stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only it can take signals
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def protocol_note(exp: Experiment) -> str:
    """What a run's log says when it is not the paper's protocol, naming the departures."""
    return "" if exp.profile == "paper" else f" [{exp.settings}; not the paper's protocol]"


def train(exp: Experiment, out: Path, *, resume: bool = False, quiet: bool = False,
          on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train one experiment into `out`; return the summary also written to summary.json.
    `on_epoch` sees each finished epoch's metrics row (a study times its first one)."""
    cfg = exp.train
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    if not resume and ckpt_path.exists():
        raise UsageError(f"{out} already holds a run; pass --resume to continue it "
                         "or choose another --out")
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_same_experiment(ckpt["experiment"], exp, ckpt_path)
        # Nothing left to train: every rank returns here, before joining torchrun's group.
        finished = read_summary(out) if ckpt["epoch"] >= cfg.epochs else None
        if finished and finished.get("status") == "completed":
            if os.environ.get("RANK", "0") == "0":
                print(f"{exp.name}: {out} is already trained to epoch {cfg.epochs} of "
                      f"{cfg.epochs}; nothing to resume", file=sys.stderr, flush=True)
            return finished  # as it was written
    ranks, device = init_ranks(resolve_device(cfg.device))
    amp = autocast_dtype(cfg.precision, device)
    set_determinism(cfg)
    reset_peak_memory(device)
    quiet = quiet or not ranks.main
    splits = make_splits(exp.data, cfg, device, progress=not quiet, ranks=ranks)
    num_classes = len(splits.images.classes)
    model = build_model(exp.model if ckpt is None else
                        dataclasses.replace(exp.model, pretrained=None), num_classes)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(splits.train))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    start_epoch, history, partial = 0, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history, partial = ckpt["epoch"], ckpt["history"], ckpt.get("partial")
    step_model = model
    if ranks.world > 1:
        if cfg.sync_bn and device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                             "kernel); on CPU, train without it")
        if cfg.sync_bn:
            step_model = nn.SyncBatchNorm.convert_sync_batchnorm(step_model)
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)

    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a process killed inside a write
            stale.unlink()
        write_json(out / "config.json", exp.to_dict())
    columns = METRICS + (VAL_METRICS if splits.val else [])
    params = count_params(model)
    log = ((lambda msg: None) if not ranks.main else
           (lambda msg: print(msg, file=sys.stderr, flush=True)) if quiet else tqdm.write)
    log(f"{exp.name}{protocol_note(exp)}: {params:,} parameters, "
        f"{splits.train.num_images:,} training images ({splits.images.name}), {device.type}, "
        f"{precision_name(amp)}, "
        f"epochs {start_epoch + 1}-{cfg.epochs} of {cfg.epochs}")
    train_step = make_step(model, step_model, optimizer, scheduler, scaler, cfg, device, amp,
                           len(splits.train), ranks.world, log)
    graph = train_step if isinstance(train_step, GraphStep) else None

    def summary(status: str, **extra: Any) -> dict:
        last = history[-1] if history else {}
        s = {"experiment": exp.name, "status": status, "params": params,
             "epochs": len(history), "test_top1": last.get("test_top1"),
             "test_top5": last.get("test_top5"),
             "train_seconds": sum(r["epoch_seconds"] for r in history),
             "images_per_second": (sum(r["images_per_second"] for r in history) / len(history)
                                   if history else None),
             "peak_memory_mib": peak_memory_mib(device),
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "precision": precision_name(amp),
             "torch": torch.__version__, "git_commit": git_commit(),
             "dataset": splits.images.name, "profile": exp.profile,
             "overrides": exp.overrides(), "processes": ranks.world,
             "cuda_graph": graph is not None and graph.graph is not None,
             "capture_seconds": graph.capture_seconds if graph else 0.0,
             **extra}
        if ranks.main:
            write_json(out / "summary.json", s)
        return s

    def checkpoint(epoch: int, partial: dict | None = None) -> None:
        if ranks.main:
            save_checkpoint(ckpt_path, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict(), rng=rng_state(), epoch=epoch,
                            history=history, partial=partial, experiment=exp.to_dict())

    tb = _tensorboard(out) if ranks.main else None
    model.train()
    try:
        with StopRequest() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                result = _train_epoch(train_step, scheduler, splits, cfg, epoch, device, amp, quiet,
                                      stop, partial, ranks, model)
                partial = None
                if isinstance(result, EpochProgress):  # stopped on request, mid-epoch
                    checkpoint(epoch, dataclasses.asdict(result))
                    log(f"{exp.name}: stopped by {stop.signal_name} in epoch {epoch + 1} after "
                        f"step {result.step}; checkpoint written")
                    raise Interrupted(f"stopped by {stop.signal_name}; checkpoint written in "
                                      f"{out} at epoch {epoch + 1}, step {result.step}")
                row, predictions, diverged = result
                if diverged:
                    log(f"{exp.name}: diverged in epoch {epoch + 1} (non-finite loss); "
                        "lower --lr or set --grad-clip")
                    return summary("diverged", diverged_epoch=epoch + 1)
                history.append(row)
                if epoch + 1 == cfg.epochs and ranks.main:  # for per-class analysis
                    with atomic_open(out / "predictions.npz") as f:
                        np.savez(f, predicted=predictions,
                                 labels=splits.test.labels.cpu().numpy())
                if ranks.main:
                    write_csv(out / "metrics.csv", history, columns)
                checkpoint(epoch + 1)
                if tb:
                    for k, v in row.items():
                        tb.add_scalar(k, v, epoch + 1)
                log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                    f"test loss {row['test_loss']:.4f}  top-1 {row['test_top1']:.4f}  "
                    f"top-5 {row['test_top5']:.4f}  {row['images_per_second']:,.0f} img/s  "
                    f"{row['epoch_seconds']:.1f} s")
                if on_epoch is not None and ranks.main:
                    on_epoch(row)
    except Exception as e:
        summary("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if tb:
            tb.close()
        if ranks.world > 1:
            dist.destroy_process_group()
    return summary("completed")


@dataclasses.dataclass
class EpochProgress:
    """Where an epoch stood when a stop was requested: enough to finish it exactly."""

    step: int  # batches done
    loss_sum: float
    seen: int
    seconds: float


def _train_epoch(train_step: Step, scheduler, splits: Splits, cfg: TrainConfig, epoch: int,
                 device: torch.device, amp, quiet: bool, stop: StopRequest | None,
                 partial: dict | None, ranks: Ranks, eval_model: nn.Module,
                 ) -> tuple[dict, np.ndarray | None, bool] | EpochProgress:
    """One epoch of `train_step` (`step.make_step`), then the test set on `eval_model` (the plain
    module); or where it stood if a stop was requested."""
    loader = splits.train
    done = EpochProgress(**partial) if partial else EpochProgress(0, 0.0, 0, 0.0)
    # Sums over all ranks are kept by rank 0 alone, so that reducing them again is exact.
    loss_sum = torch.tensor(done.loss_sum if ranks.main else 0.0, device=device,
                            dtype=torch.float64)
    seen = done.seen if ranks.main else 0
    start = time.perf_counter() - done.seconds
    bar = tqdm(total=len(loader), initial=done.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               unit="batch", leave=False, disable=quiet, dynamic_ncols=True)

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

    for step, (x, y) in enumerate(loader.epoch(epoch, start=done.step), start=done.step):
        if stop_now(step):
            bar.close()
            return EpochProgress(step, *totals(), time.perf_counter() - start)
        global_batch = min(loader.batch_size, loader.num_images - step * loader.batch_size)
        share = len(y) * ranks.world / global_batch if ranks.world > 1 else 1.0
        loss = train_step(x, y, share)
        loss_sum += loss * len(y)
        seen += len(y)
        bar.update()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == len(loader):
            total, count = totals()  # the one host sync every LOG_EVERY steps
            if not math.isfinite(total):
                bar.close()
                return {}, None, True
            bar.set_postfix(loss=f"{total / count:.3f}",
                            img_s=f"{count / (time.perf_counter() - start):,.0f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    bar.close()
    total, seen = totals()
    test = evaluate(eval_model, splits.test, amp)  # its .item() calls synchronise the device
    row = {"epoch": epoch + 1, "train_loss": total / seen, "test_loss": test["loss"],
           "test_top1": test["top1"], "test_top5": test["top5"],
           "lr": scheduler.get_last_lr()[0],
           "epoch_seconds": time.perf_counter() - start,
           "eval_seconds": time.perf_counter() - start - train_seconds,
           "images_per_second": seen / train_seconds}
    if splits.val:
        val = evaluate(eval_model, splits.val, amp)
        row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
    return row, test["predictions"], False

