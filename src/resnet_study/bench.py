"""How fast the project trains, against its own ceiling and against the pipeline users write today.

Three rates from one process, on the same data, batch size, optimiser and device:
- compute: the project's training step on one ready batch (the ceiling for this model here);
- project: the project's training loop (device-resident data, batched augmentation, step);
- reference: the pipeline of the paper and most public CIFAR code: a map-style `Dataset` of
  PIL images with torchvision transforms, a `DataLoader` with a worker per core, float32 NCHW,
  torchvision's `resnet18`, a default SGD and `loss.item()` every step.
Timed windows alternate between the three so that a noisy machine slows all alike; each rate is
the median over windows, and every window starts only after warm-up steps of its own.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import Experiment
from .data.loader import normalization
from .models import training_flops
from .training.assembly import assemble
from .training.device import (
    peak_memory_mib,
)

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, by device
# name; the first match counts. Elsewhere (CPUs, other cards, fp32) the peak is not stated.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


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


class ReferenceDataset(torch.utils.data.Dataset):
    """What `torchvision.datasets.CIFAR100` does per item: an HWC uint8 array made a PIL image,
    then the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC, as the official files hold it
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_loader(images: np.ndarray, labels: np.ndarray, batch_size: int,
                     device: torch.device) -> torch.utils.data.DataLoader:
    from torchvision import transforms

    # Per-channel statistics on the 0..1 scale, as public CIFAR code hard-codes them.
    mean, std = normalization(images, "channel")
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((mean.flatten() / 255).tolist(), (std.flatten() / 255).tolist()),
    ])
    return torch.utils.data.DataLoader(
        ReferenceDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
        num_workers=len(os.sched_getaffinity(0)), pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=True)


def _forever(epochs: Callable[[int], Iterator]) -> Iterator:
    epoch = 0
    while True:
        yield from epochs(epoch)
        epoch += 1


def bench(exp: Experiment, *, batches: int = 10, windows: int = 5, warmup: int = 3,
          reference: bool = True) -> dict:
    # The run's schedule as one epoch of exactly the steps the benchmark takes.
    steps = windows * 2 * (warmup + batches)
    parts = assemble(exp.replace(epochs=1), steps_per_epoch=steps,
                     log=lambda msg: print(msg, file=sys.stderr))
    cfg, device, splits = parts.experiment.train, parts.device, parts.splits
    num_classes = len(splits.images.classes)

    def step(x: torch.Tensor, y: torch.Tensor) -> int:
        parts.step(x, y, 1.0)
        return len(y)

    ready_x, ready_y = next(splits.train.epoch(0))
    stream = _forever(splits.train.epoch)
    runs: dict[str, Callable[[], int]] = {"compute": lambda: step(ready_x, ready_y),
                                          "project": lambda: step(*next(stream))}
    if reference:
        runs["reference"] = _reference_step(exp, splits, num_classes, device, steps)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(windows):
        for name, run in runs.items():
            # Warm-up steps of its own. The reference's workers prefetch while the other
            # windows run, so its window starts with full queues: a bias in its favour.
            _rate(run, warmup, device)
            rates[name].append(_rate(run, batches, device))
    result: dict = {name: statistics.median(r) for name, r in rates.items()}
    if reference:
        result["project_over_reference"] = result["project"] / result["reference"]
    result["project_over_compute"] = result["project"] / result["compute"]
    # Model FLOPs (the convolutions' nominal work, forward and backward) per image, whatever
    # kernels the device ran: achieved TFLOP/s against the device's peak is the roofline view.
    gflop = training_flops(exp.model, num_classes) / 1e9
    peak = peak_tflops(device, parts.precision)
    tflops = {name: result[name] * gflop / 1e3 for name in ("compute", "project")}
    result.update(gflop_per_image=gflop, compute_tflops=tflops["compute"],
                  project_tflops=tflops["project"], peak_tflops=peak,
                  project_fraction_of_peak=tflops["project"] / peak if peak else None)
    graph = parts.graph
    result.update(experiment=exp.name, device=str(device), batch_size=cfg.batch_size,
                  precision=parts.precision,
                  cuda_graph=graph is not None and graph.graph is not None,
                  capture_seconds=graph.capture_seconds if graph else 0.0,
                  batches_per_window=batches, windows=windows,
                  peak_memory_mib=peak_memory_mib(device))
    return result


def _reference_step(exp: Experiment, splits, num_classes: int, device: torch.device,
                    steps: int) -> Callable[[], int]:
    from torchvision.models import resnet18

    cfg = exp.train
    loader = reference_loader(splits.images.train_images, splits.images.train_labels,
                              cfg.batch_size, device)
    stream = _forever(lambda _: iter(loader))
    model = resnet18(num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=1,
                                                    steps_per_epoch=steps)

    def step() -> int:
        inputs, targets = next(stream)
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()  # the running-loss print of most training scripts
        return len(targets)

    return step
