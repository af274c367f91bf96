"""What the input pipeline costs: the training loop against the bare step on a ready batch.

Both rates come from one process, the same model, optimiser and precision, and alternate
timed windows so that a noisy machine slows both alike; each is the median over windows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import torch

from .config import Experiment
from .models import build_model
from .train import (
    autocast_dtype,
    make_optimizer,
    make_scheduler,
    make_splits,
    resolve_device,
    train_step,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], int], batches: int, device: torch.device) -> float:
    """Images per second over `batches` calls of `step` (which returns its batch size)."""
    _sync(device)
    start = time.perf_counter()
    images = sum(step() for _ in range(batches))
    _sync(device)
    return images / (time.perf_counter() - start)


def bench(exp: Experiment, *, batches: int = 10, windows: int = 5, warmup: int = 3) -> dict:
    cfg = exp.train
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    splits = make_splits(exp.data, cfg, device, progress=False)
    model = build_model(exp.model, len(splits.images.classes))
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last
                     else torch.contiguous_format)
    optimizer = make_optimizer(model, cfg)
    # A long schedule, so the LR stays sane however many steps the benchmark takes.
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10_000)
    step_model = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> int:
        train_step(step_model, optimizer, scheduler, scaler, x, y, cfg, device, amp)
        return len(y)

    ready_x, ready_y = next(splits.train.epoch(0))

    def batches_forever() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            yield from splits.train.epoch(epoch)
            epoch += 1

    stream = batches_forever()
    runs = {"compute": lambda: step(ready_x, ready_y), "project": lambda: step(*next(stream))}
    for run in runs.values():
        _rate(run, warmup, device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(windows):
        for name, run in runs.items():
            rates[name].append(_rate(run, batches, device))
    result = {name: statistics.median(r) for name, r in rates.items()}
    result["project_over_compute"] = result["project"] / result["compute"]
    result.update(experiment=exp.name, device=str(device), batch_size=cfg.batch_size,
                  precision="fp32" if amp is None else str(amp).removeprefix("torch."),
                  batches_per_window=batches, windows=windows)
    return result
