"""The device-resident splits a run trains and tests on: the data set loaded, validation and
subset carved out, every split a `DeviceLoader` on the run's device."""

from __future__ import annotations

import dataclasses

import torch

from ..config import DataConfig, Experiment, TrainConfig, UsageError
from ..training.device import Ranks
from .loader import DeviceLoader, normalization, split
from .sources import ImageSet
from .store import load_images


@dataclasses.dataclass
class Splits:
    images: ImageSet
    train: DeviceLoader
    test: DeviceLoader
    val: DeviceLoader | None


def check_sizes(cfg: DataConfig, train_cfg: TrainConfig, available: int, world: int = 1) -> int:
    """The number of images a run trains on, out of the `available` training images; refuses
    settings that leave too few (a study checks every run this way before starting any)."""
    if cfg.val_split >= available:
        raise UsageError(f"val_split {cfg.val_split} leaves no training images "
                         f"(the training set has {available})")
    n = available - cfg.val_split
    n = min(n, cfg.subset) if cfg.subset is not None else n
    if train_cfg.batch_size > n:
        raise UsageError(f"batch_size {train_cfg.batch_size} is larger than the {n} training "
                         "images")
    if train_cfg.batch_size < world:
        raise UsageError(f"batch_size {train_cfg.batch_size} (the global batch) is smaller "
                         f"than the {world} processes")
    return n


def make_splits(exp: Experiment, device: torch.device, progress: bool = True,
                ranks: Ranks = Ranks()) -> Splits:
    """Load the images, carve out validation and subset, and put every split on the device."""
    cfg, train_cfg, execution = exp.data, exp.train, exp.execution
    images = load_images(cfg.data, progress=progress)
    check_sizes(cfg, train_cfg, len(images.train_labels), ranks.world)
    x, y = images.train_images, images.train_labels
    val = None
    if cfg.val_split:
        val, (x, y) = split(x, y, cfg.val_split, seed=train_cfg.seed)
    if cfg.subset is not None and cfg.subset < len(y):
        (x, y), _ = split(x, y, cfg.subset, seed=train_cfg.seed)
    test = images.test_images, images.test_labels
    if cfg.test_subset is not None and cfg.test_subset < len(test[1]):
        test, _ = split(*test, cfg.test_subset, seed=0)  # one test set for all seeds
    mean, std = normalization(x, cfg.normalize)
    common = dict(batch_size=train_cfg.batch_size, device=device, mean=mean, std=std,
                  channels_last=execution.channels_last)
    evaluation = dict(common, batch_size=execution.eval_batch_size, augment=False)
    return Splits(
        images=images,
        train=DeviceLoader(x, y, augment=True, padding_mode=cfg.padding_mode,
                           seed=train_cfg.seed, rank=ranks.rank, world=ranks.world, **common),
        test=DeviceLoader(*test, **evaluation),
        val=None if val is None else DeviceLoader(*val, **evaluation),
    )
