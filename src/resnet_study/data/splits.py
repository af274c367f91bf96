"""The device-resident splits a run trains and tests on: the data set loaded, validation and
subset carved out, every split a `DeviceLoader` on the run's device."""

from __future__ import annotations

import dataclasses

import torch

from ..config import Experiment
from ..errors import UsageError
from ..ranks import Ranks
from .loader import DeviceLoader, Mixing, normalization, split
from .sources import ImageSet
from .store import load_images


@dataclasses.dataclass
class Splits:
    images: ImageSet
    train: DeviceLoader
    test: DeviceLoader | None  # None: never evaluated (execution.test_split off)
    val: DeviceLoader | None


def check_sizes(exp: Experiment, available: int, world: int = 1) -> int:
    """The number of images a run trains on, out of the `available` training images; refuses
    settings that ask for more images than there are, or leave too few (a study checks every
    run this way before starting any). `--quick`'s subset is a cap, not a request."""
    cfg, batch_size = exp.data, exp.train.batch_size
    if cfg.val_split >= available:
        raise UsageError(f"val_split {cfg.val_split} leaves no training images "
                         f"(the training set has {available})")
    if not exp.execution.test_split and not cfg.val_split:
        raise UsageError("with test_split off a run needs a val_split to evaluate on")
    n = available - cfg.val_split
    if cfg.subset is not None and cfg.subset > n and not exp.quick:
        raise UsageError(f"subset {cfg.subset} is larger than the {n} training images there "
                         "are" + (f" (after val_split {cfg.val_split})" if cfg.val_split else ""))
    n = min(n, cfg.subset) if cfg.subset is not None else n
    if batch_size > n:
        raise UsageError(f"batch_size {batch_size} is larger than the {n} training images")
    if batch_size < 2 * world:
        raise UsageError(f"batch_size {batch_size} (the global batch) gives a process fewer "
                         f"than the 2 images batch norm needs ({world} process(es))")
    return n


def make_splits(exp: Experiment, device: torch.device, progress: bool = True,
                ranks: Ranks = Ranks()) -> Splits:
    """Load the images, carve out validation and subset, and put every split on the device."""
    cfg, train_cfg, execution = exp.data, exp.train, exp.execution
    images = load_images(cfg.data, progress=progress)
    check_sizes(exp, len(images.train_labels), ranks.world)
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
                           seed=train_cfg.seed, rank=ranks.rank, world=ranks.world,
                           mix=Mixing(train_cfg.mixup, train_cfg.cutmix, len(images.classes)),
                           **common),
        test=DeviceLoader(*test, **evaluation) if execution.test_split else None,
        val=None if val is None else DeviceLoader(*val, **evaluation),
    )
