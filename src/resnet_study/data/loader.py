"""Batches on the device: the whole split held as one tensor where the model runs, cropped,
flipped and normalised a batch at a time with tensor ops, so training never touches the CPU per
batch; and the seeded carving of validation and subset splits, and the normalisation's moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .tree import SIZE, DataError

PAD = 4  # random-crop padding on each side, as in the ResNet paper's CIFAR recipe


# --- splits and normalization -----------------------------------------------------------------

def split(images: np.ndarray, labels: np.ndarray, n: int,
          seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """First pair: n images drawn at random (seeded); second pair: the rest. Both keep the
    original order. Serves --val-split (held out = first pair) and --subset (train = first)."""
    if not 0 <= n <= len(images):
        raise DataError(f"cannot take {n} images from a set of {len(images)}")
    chosen = np.zeros(len(images), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(images))[:n]] = True
    return (images[chosen], labels[chosen]), (images[~chosen], labels[~chosen])


def normalization(train_images: np.ndarray, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) on the 0..255 scale for `(x - mean) / std`: mean is the training set's mean
    image (mode 'pixel', as in the paper) or its channel means (mode 'channel'), shape (3, 32, 32)
    or (3, 1, 1); std is always per channel, shape (3, 1, 1)."""
    if mode not in ("pixel", "channel"):
        raise ValueError(f"normalization mode must be pixel or channel, not {mode!r}")
    # uint8 pixels: a 256-bin histogram per channel gives exact moments without a float copy
    values = np.arange(256, dtype=np.float64)
    hist = np.stack([np.bincount(train_images[:, c].ravel(), minlength=256) for c in range(3)])
    p = hist / hist.sum(axis=1, keepdims=True)
    channel_mean = p @ values
    std = np.sqrt((p * (values - channel_mean[:, None]) ** 2).sum(axis=1))
    mean = (train_images.mean(axis=0, dtype=np.float64) if mode == "pixel"
            else channel_mean.reshape(3, 1, 1))
    return (torch.tensor(mean, dtype=torch.float32),
            torch.tensor(std.reshape(3, 1, 1), dtype=torch.float32))


# --- batches on the device --------------------------------------------------------------------

@dataclass(frozen=True)
class Mixing:
    """mixup and CutMix of a training batch with a shuffled copy of itself (the Beta
    distribution's a for each; 0 = off), and the classes its soft targets span."""

    mixup: float = 0.0
    cutmix: float = 0.0
    classes: int = 0

    @property
    def on(self) -> bool:
        return bool(self.mixup or self.cutmix)


class DeviceLoader:
    """One split, resident on the device, served as normalized float batches.

    Each epoch's order, crops and flips come from a generator seeded by (seed, epoch) alone, so
    a resumed run sees exactly the batches it would have seen, with no loader state to save.
    Training loaders (augment=True) crop a random 32x32 window out of a copy padded by 4 pixels
    and flip it horizontally with probability 1/2; shuffle follows augment unless given.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 device: torch.device | str, mean: torch.Tensor, std: torch.Tensor,
                 augment: bool, padding_mode: str = "reflect", seed: int = 0,
                 shuffle: bool | None = None, channels_last: bool = True,
                 rank: int = 0, world: int = 1, mix: Mixing = Mixing()) -> None:
        if padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be reflect or zeros, not {padding_mode!r}")
        self.device = torch.device(device)
        images = torch.from_numpy(images)
        if augment:  # pad once, on the host, rather than every batch
            mode = "reflect" if padding_mode == "reflect" else "constant"
            images = torch.nn.functional.pad(images, (PAD,) * 4, mode=mode)
        # Stored NHWC: a crop is then one gather of whole pixels, and the batch comes out in
        # channels_last order, the format the model runs fastest in, with no transpose.
        self.images = images.permute(0, 2, 3, 1).contiguous().to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device, torch.int64)
        self.mean = mean.to(self.device, torch.float32).permute(1, 2, 0)  # HWC, as the images
        self.std = std.to(self.device, torch.float32).permute(1, 2, 0)
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = augment if shuffle is None else shuffle
        self.seed = seed
        self.mix = mix if augment else Mixing()
        self.channels_last = channels_last
        self.num_images = len(labels)
        # Distributed training: every rank draws the whole global batch (order, crops, flips)
        # and keeps its own slice of it, so the ranks together see what one process would.
        self.rank, self.world = rank, world
        # Batch norm in training needs two values per channel: a training epoch's last batch
        # that would leave a rank fewer than two images joins the batch before it instead.
        remainder = self.num_images % batch_size
        self.fold_last = (augment and 0 < remainder < 2 * world
                          and self.num_images > batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size) - self.fold_last

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        batches = list(order.split(self.batch_size))
        if self.fold_last:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def generator(self, epoch: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch `start` on (a run resumed mid-epoch), exactly as an
        uninterrupted epoch would have served them."""
        if not self.mix.on:
            for x, y in self._pixels(epoch, start):
                yield self.normalize(x), y
            return
        # The shares and boxes come from the host, seeded by (seed, epoch) as the crops are,
        # drawn for the batches a resumed epoch skips too: it mixes as the uninterrupted one.
        draws = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1]))
        for _ in range(start):
            self._mix_draws(draws)
        for (x, y), (partner, partner_y) in self._pixels(epoch, start, pairs=True):
            yield self._mixed(self.normalize(x), self.normalize(partner), y, partner_y,
                              *self._mix_draws(draws))

    def pixels(self, epoch: int, batch: int = 0) -> torch.Tensor:
        """Batch `batch` of epoch `epoch` as training sees it, before normalisation: uint8
        (B, 3, 32, 32) images, for pictures of what the network is shown."""
        return next(self._pixels(epoch, batch))[0].permute(0, 3, 1, 2)

    def _pixels(self, epoch: int, start: int, pairs: bool = False) -> Iterator:
        """(images, labels) per batch from batch `start` on; with `pairs`, ((images, labels),
        (partners, their labels)), each image's partner drawn from the whole global batch."""
        g = self.generator(epoch)
        n = self.num_images
        order = (torch.randperm(n, generator=g, device=self.device) if self.shuffle
                 else torch.arange(n, device=self.device))
        for i, idx in enumerate(self._batches(order)):
            draws = self._draws(len(idx), g) if self.augment else None
            partner = torch.randperm(len(idx), generator=g, device=self.device) if pairs else None
            if i < start:  # the draws above keep the generator where the epoch had it
                continue
            mine = slice(len(idx) * self.rank // self.world,
                         len(idx) * (self.rank + 1) // self.world)
            batch = self._served(idx, draws, mine)
            yield (batch, self._served(idx, draws, partner[mine])) if pairs else batch

    def _served(self, idx: torch.Tensor, draws: tuple | None,
                at: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at positions `at` of the batch `idx`, cropped and flipped as
        the batch's draws say."""
        x = (self._crop_and_flip(idx[at], *(d[at] for d in draws)) if self.augment
             else self.images[idx[at]])
        return x, self.labels[idx[at]]

    def _mix_draws(self, rng: np.random.Generator) -> tuple[float, tuple[int, ...] | None]:
        """A batch's share of its own images and, for CutMix, the box (top, bottom, left,
        right) where the partners show."""
        m = self.mix
        cut = m.cutmix > 0 and (m.mixup == 0 or rng.random() < 0.5)
        share = float(rng.beta(*(2 * [m.cutmix if cut else m.mixup])))
        if not cut:
            return share, None
        side = SIZE * math.sqrt(1 - share)
        cy, cx = rng.integers(0, SIZE, 2)
        box = tuple(int(np.clip(c + d * side / 2, 0, SIZE)) for c in (cy, cx) for d in (-1, 1))
        return share, box

    def _mixed(self, x: torch.Tensor, partner: torch.Tensor, y: torch.Tensor,
               partner_y: torch.Tensor, share: float,
               box: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch mixed with its partners, and the soft targets in the pixels' shares."""
        if box is None:
            x = x.mul_(share).add_(partner, alpha=1 - share)
        else:
            top, bottom, left, right = box
            x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
            share = 1 - (bottom - top) * (right - left) / SIZE**2  # the box as it was cut
        classes = self.mix.classes
        target = torch.nn.functional.one_hot(y, classes).float().mul_(share)
        target.add_(torch.nn.functional.one_hot(partner_y, classes).float(), alpha=1 - share)
        return x, target

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images as the network takes them: normalised float NCHW, in the loader's
        memory format."""
        x = x.float().sub_(self.mean).div_(self.std).permute(0, 3, 1, 2)
        return x if self.channels_last else x.contiguous()

    def augment_batch(self, idx: torch.Tensor,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        """Crop and flip the padded images `idx`: uint8 (B, 3, 32, 32) images, the crop offsets
        dx, dy in [0, 8] and the flip flags, for tests to check."""
        dx, dy, flip = self._draws(len(idx), g)
        return self._crop_and_flip(idx, dx, dy, flip).permute(0, 3, 1, 2), dx, dy, flip

    def _draws(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        dev = self.device
        dx = torch.randint(0, 2 * PAD + 1, (b,), generator=g, device=dev)
        dy = torch.randint(0, 2 * PAD + 1, (b,), generator=g, device=dev)
        flip = torch.randint(0, 2, (b,), generator=g, device=dev).bool()
        return dx, dy, flip

    def _crop_and_flip(self, idx: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                       flip: torch.Tensor) -> torch.Tensor:
        """The crop and flip as one gather of pixels out of the batch's padded NHWC images."""
        b = len(idx)
        step = torch.arange(SIZE, device=self.device)
        rows = dy[:, None] + step
        cols = dx[:, None] + torch.where(flip[:, None], SIZE - 1 - step, step)
        width = SIZE + 2 * PAD
        pixel = (rows[:, :, None] * width + cols[:, None, :]).view(b, SIZE * SIZE, 1)
        padded = self.images[idx].view(b, width * width, 3)
        return padded.gather(1, pixel.expand(b, SIZE * SIZE, 3)).view(b, SIZE, SIZE, 3)
