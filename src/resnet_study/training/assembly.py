"""Everything a training run is made of, built in one place.

`train`, `bench`, the study's memory probe and the GPU check all train through an `Assembly`:
the device and precision, torchrun's ranks, the device-resident splits, the network and its
stepped form (DDP, `torch.compile`), the optimiser, scheduler and grad scaler, and the step
(`step.make_step`: eager, compiled, or replayed as a CUDA graph).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import Experiment
from ..data.splits import Splits, make_splits
from ..errors import UsageError
from ..models import build_model
from ..ranks import Ranks, init_ranks
from .checkpoint import check_fits, set_rng_state
from .device import (
    autocast_dtype,
    precision_name,
    reset_peak_memory,
    resolve_device,
    set_determinism,
)
from .step import GraphStep, Step, make_optimizer, make_scheduler, make_step


@dataclasses.dataclass
class Assembly:
    experiment: Experiment
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None: float32
    ranks: Ranks
    splits: Splits | None  # None where the caller brings its own batches
    model: nn.Module  # the plain module: evaluation and checkpoints
    step_model: nn.Module  # what the step runs: the module, DDP's wrapper, or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    log: Callable[[str], None]
    step: Step | None = None  # (x, y, grad_scale) -> loss; set by `assemble`
    ema: AveragedModel | None = None  # the weights' moving average, with --ema-horizon

    @property
    def evaluated(self) -> nn.Module:
        """What evaluation runs: the moving average where there is one, else the network."""
        return self.model if self.ema is None else self.ema.module

    @property
    def precision(self) -> str:
        return precision_name(self.amp)

    @property
    def graph(self) -> GraphStep | None:
        return self.step if isinstance(self.step, GraphStep) else None

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the training state."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}


def ema_decay(horizon: float, steps: int) -> float:
    """The per-step decay whose average reaches back `horizon` of a run of `steps` steps (its
    time constant, 1 / (1 - decay) steps); 0, the last weights alone, where that is under one."""
    return max(0.0, 1.0 - 1.0 / (horizon * steps))


def _wrap(model: nn.Module, exp: Experiment, device: torch.device, ranks: Ranks) -> nn.Module:
    """The stepped module: DDP under torchrun (SyncBatchNorm with --sync-bn), compiled with
    --compile."""
    cfg = exp.execution
    if ranks.world > 1:
        if cfg.sync_bn and device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
                             "kernel); on CPU, train without it")
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


def assemble(exp: Experiment, *, model: nn.Module | None = None,
             steps_per_epoch: int | None = None, checkpoint: dict | None = None,
             log: Callable[[str], None] = lambda msg: None, progress: bool = False) -> Assembly:
    """A run of `exp`: its data, and its network built for the data's classes (with its
    pretrained weights, unless `checkpoint` restores the training state); or, given `model`,
    that network without data (`steps_per_epoch` then says how long the schedule's epoch is).
    `steps_per_epoch` also shortens the schedule of a run with data (the benchmark's)."""
    cfg, execution = exp.train, exp.execution
    ranks, device = init_ranks(resolve_device(execution.device))
    amp = autocast_dtype(execution.precision, device)
    set_determinism(cfg.seed, execution.deterministic)
    reset_peak_memory(device)
    splits = None
    if model is None:
        splits = make_splits(exp, device, progress=progress, ranks=ranks)
        model = build_model(exp.model if checkpoint is None else
                            dataclasses.replace(exp.model, pretrained=None),
                            len(splits.images.classes))
    memory_format = (torch.channels_last if execution.channels_last
                     else torch.contiguous_format)
    model = model.to(device, memory_format=memory_format)
    steps = steps_per_epoch or len(splits.train)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if checkpoint is not None:
        check_fits(checkpoint["model"], model, exp, "the checkpoint to resume from")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
    parts = Assembly(exp, device, amp, ranks, splits, model, _wrap(model, exp, device, ranks),
                     optimizer, scheduler, scaler, steps, log)
    if cfg.ema_horizon:
        parts.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(
                                      ema_decay(cfg.ema_horizon, steps * cfg.epochs)),
                                  use_buffers=True)
        if checkpoint is not None:
            parts.ema.load_state_dict(checkpoint["ema"])
    parts.step = make_step(parts)
    return parts
