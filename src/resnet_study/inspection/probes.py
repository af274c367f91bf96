"""Inside a trained model: the analysis the paper names as its future work ("visualize the
output of each feature map and statistical comparisons to observe the variance of the outputs").

`inspect_run` reads a run's checkpoint and writes `RUN_DIR/inspect/`: feature maps of the stem
and of every stage for a fixed set of test images, the stem's filters, Grad-CAM overlays for
right and wrong predictions, per-block activation statistics over the test images, and a t-SNE
map of the penultimate features beside the run's per-class accuracy. Every figure comes from
hooks on the network's own modules, so it works for every architecture the project builds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..files import atomic_open, write_csv, write_json
from ..models import BasicBlock
from ..plots import save
from ..training.checkpoint import LoadedRun, load_run
from ..training.device import autocast
from . import figures
from .anatomy import MIN_CAM_SIZE, Anatomy, anatomy

DEFAULT_IMAGES = 2000  # test images for the statistics, the embedding and the CAM candidates
GRID_IMAGES = 8  # images in every picture grid: the first sampled image of each of 8 classes
GRID_CHANNELS = 8  # feature maps shown per stage: its most active channels on those images
MEASURES = ["mean", "variance", "dead_fraction", "residual_ratio"]
STAT_COLUMNS = ["block", "stage", "channels", "height", "width", *MEASURES]


@dataclass
class BlockStats:
    """Running sums over the test images for one residual block."""

    total: float = 0.0
    squares: float = 0.0
    count: int = 0
    fired: torch.Tensor | None = None  # per unit between the two convs: ever above zero?
    ratios: list[float] = field(default_factory=list)  # per image: |residual| / |shortcut|
    shape: tuple[int, ...] = ()
    shortcut: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    def row(self, name: str) -> dict:
        mean = self.total / self.count
        return {"block": name, "stage": name.split(".")[0], "channels": self.shape[0],
                "height": self.shape[1], "width": self.shape[2], "mean": mean,
                "variance": self.squares / self.count - mean**2,
                "dead_fraction": float((~self.fired).float().mean()),
                "residual_ratio": float(np.mean(self.ratios)) if self.ratios else float("nan")}


def _residual_end(block: nn.Module) -> nn.Module:
    """The module whose output is the block's residual branch, just before the sum."""
    return block.bn2 if isinstance(block, BasicBlock) else block.conv2


def watch_blocks(parts: Anatomy) -> tuple[dict[str, BlockStats], list]:
    """Hooks that fill one `BlockStats` per block as images pass (eval mode, no gradients).

    The block's output gives the mean and variance; the input of its second conv, after the
    ReLU between the convs, gives the units that never fire; the residual branch (before the
    sum) against the shortcut (the input, or the projection or zero-padding of it) gives how
    much the block changes what passes through it. Where the block's parts are not known (a
    user's network), its output alone: mean, variance and the units that never fire there."""
    stats: dict[str, BlockStats] = {}
    handles = []
    for name, block in parts.blocks:
        s = stats[name] = BlockStats()
        if not parts.residual:
            handles.append(block.register_forward_hook(_watch_output(s)))
            continue

        def on_input(module, args, s=s, block=block):
            if block.downsample is None:
                s.shortcut = args[0]

        def on_shortcut(module, args, out, s=s):
            s.shortcut = out

        def on_residual(module, args, out, s=s):
            s.residual = out

        def on_inner(module, args, s=s):
            fired = (args[0] > 0).any(dim=0)
            s.fired = fired if s.fired is None else s.fired | fired

        def on_output(module, args, out, s=s):
            out = out.float()
            s.total += float(out.sum(dtype=torch.float64))
            s.squares += float((out.double() ** 2).sum())
            s.count += out.numel()
            s.shape = tuple(out.shape[1:])
            r = s.residual.float().flatten(1).norm(dim=1)
            k = s.shortcut.float().flatten(1).norm(dim=1)
            s.ratios.extend((r / k.clamp_min(1e-12)).tolist())

        handles += [block.register_forward_pre_hook(on_input),
                    _residual_end(block).register_forward_hook(on_residual),
                    block.conv2.register_forward_pre_hook(on_inner),
                    block.register_forward_hook(on_output)]
        if block.downsample is not None:
            handles.append(block.downsample.register_forward_hook(on_shortcut))
    return stats, handles


def _watch_output(s: BlockStats):
    def on_output(module, args, out):
        out = out.float()
        s.total += float(out.sum(dtype=torch.float64))
        s.squares += float((out.double() ** 2).sum())
        s.count += out.numel()
        s.shape = tuple(out.shape[1:])
        fired = (out > 0).any(dim=0)
        s.fired = fired if s.fired is None else s.fired | fired
    return on_output


def sample_test_images(num_images: int, n: int) -> np.ndarray:
    """`n` of a test split's images, drawn with a fixed seed and kept in their order: the same
    images for every run of a data set, and every class (test sets are often sorted by class)."""
    return np.sort(np.random.default_rng(0).permutation(num_images)[:n])


def _batches(run: LoadedRun, sample: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The sampled test images, normalised as in training, a test batch at a time."""
    loader = run.splits.test
    for idx in torch.as_tensor(sample, device=loader.device).split(loader.batch_size):
        yield loader.normalize(loader.images[idx]), loader.labels[idx]


@dataclass
class Pass:
    """What one pass over the test images collects."""

    stats: dict[str, BlockStats]
    features: np.ndarray  # penultimate features (the fc's input), one row per image
    predicted: np.ndarray
    labels: np.ndarray
    maps: dict[str, torch.Tensor]  # stem and stage outputs of the grid images
    sizes: dict[str, int]  # each stage's map size


def parts_of(run: LoadedRun, sample: np.ndarray) -> Anatomy:
    x, _ = next(_batches(run, sample[:2]))
    with autocast(run.device, run.amp):
        return anatomy(run.model, not run.experiment.model.user_network, x)


@torch.no_grad()
def collect(run: LoadedRun, sample: np.ndarray, grid: np.ndarray, parts: Anatomy) -> Pass:
    """One pass over the `sample`d test images; `grid` are positions in the sample."""
    model = run.model
    stats, handles = watch_blocks(parts)
    features, predicted, labels, maps, sizes = [], [], [], {}, {}
    grid_set = set(grid.tolist())
    offset = 0
    current: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out=None):
            tensor = args[0] if out is None else out
            current[name] = tensor
            sizes[name] = tensor.shape[-1]
        return hook

    if parts.stages:  # the first stage's input is the stem's output
        handles.append(model.get_submodule(parts.stages[0]).register_forward_pre_hook(
            keep("stem")))
    for stage in parts.stages:
        handles.append(model.get_submodule(stage).register_forward_hook(keep(stage)))
    handles.append(parts.classifier.register_forward_pre_hook(
        lambda module, args: features.append(args[0].float().cpu().numpy())))
    try:
        for x, y in _batches(run, sample):
            with autocast(run.device, run.amp):
                logits = model(x)
            predicted.append(logits.argmax(1).cpu().numpy())
            labels.append(y.cpu().numpy())
            rows = [i - offset for i in range(offset, offset + len(y)) if i in grid_set]
            for name, tensor in current.items():
                if rows:
                    maps.setdefault(name, []).append(tensor[rows].float().cpu())
            offset += len(y)
    finally:
        for h in handles:
            h.remove()
    return Pass(stats, np.concatenate(features), np.concatenate(predicted),
                np.concatenate(labels), {k: torch.cat(v) for k, v in maps.items()}, sizes)


def first_per_class(labels: np.ndarray, where: np.ndarray | None = None,
                    k: int = GRID_IMAGES) -> np.ndarray:
    """Positions of the first image (where `where` holds) of each of the first `k` classes
    among the sample's `labels`: a picture grid that spans classes, and for the feature maps
    the same images for every run of a data set, so that runs compare."""
    firsts: dict[int, int] = {}
    for i in np.flatnonzero(np.ones(len(labels), bool) if where is None else where):
        firsts.setdefault(int(labels[i]), int(i))
    return np.array([firsts[c] for c in sorted(firsts)[:k]], dtype=np.int64)


def cam_layer(sizes: dict[str, int]) -> tuple[str, str]:
    """Grad-CAM's layer and why: the deepest stage whose maps still have `MIN_CAM_SIZE` pixels a
    side. The paper's 7x7 stem leaves layer4 1x1 and layer3 2x2 on a 32x32 image: a map with no
    or four pixels says nothing about where; layer2's 4x4 is the finest that still carries
    meaning, deep enough to respond to objects rather than edges."""
    names = [s for s in sizes if s != "stem"]
    usable = [s for s in names if sizes[s] >= MIN_CAM_SIZE] or names[:1]
    layer = usable[-1]
    return layer, (f"{layer} ({sizes[layer]}x{sizes[layer]}): the deepest stage whose maps are "
                   f"at least {MIN_CAM_SIZE}x{MIN_CAM_SIZE} (stage sizes: "
                   + ", ".join(f"{s} {sizes[s]}x{sizes[s]}" for s in names) + ")")


def grad_cam(run: LoadedRun, layer: str, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Captum's LayerGradCam on `layer`, upsampled to the image, in float32: (N, H, W) in 0..1."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = run.model
    cam = LayerGradCam(model, model.get_submodule(layer))
    with torch.enable_grad():
        attribution = cam.attribute(x.float().requires_grad_(), target=target,
                                    relu_attributions=True)
    upsampled = LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]),
                                             interpolate_mode="bilinear")[:, 0]
    peak = upsampled.flatten(1).amax(1).clamp_min(1e-12)
    return (upsampled / peak[:, None, None]).detach().cpu().numpy()


# --- the command ------------------------------------------------------------------------------

def inspect_run(run_dir: Path, images: int = DEFAULT_IMAGES, data: str | None = None,
                device: str | None = None, progress: bool = False,
                pictures: bool = True) -> dict:
    """Write `run_dir/inspect/` (everything is read and checked before anything is written);
    returns its summary, also written as inspect/summary.json. Without `pictures`, only the
    activation statistics: what a report needs of a run it does not picture, and a fraction of
    the time (Grad-CAM, t-SNE and the figures are most of it)."""
    if images < 2:
        raise UsageError(f"--images must be >= 2, not {images}")
    start = time.perf_counter()
    run = load_run(Path(run_dir), data, device, progress=progress)
    test = run.splits.test
    sample = sample_test_images(test.num_images, min(images, test.num_images))
    out = Path(run_dir) / "inspect"
    summary = {"run": str(run_dir), "experiment": run.experiment.name, "epoch": run.epoch,
               "data": run.splits.images.name, "images": len(sample), "pictures": pictures}
    if pictures:
        seen = look(run, sample)
        out.mkdir(exist_ok=True)
        _write_figures(out, run, seen)
        rows = seen.rows
        with atomic_open(out / "embedding.csv") as f:
            np.savetxt(f, np.column_stack([seen.xy, seen.labels, seen.predicted]),
                       delimiter=",", header="x,y,label,predicted", comments="",
                       fmt=["%.4f", "%.4f", "%d", "%d"])
        summary |= {"grid_images": sample[seen.grid].tolist(), "cam_layer": seen.layer,
                    "cam_layer_reason": seen.layer_reason,
                    **({"not_done": seen.notes} if seen.notes else {}),
                    "accuracy_on_these_images": float((seen.predicted == seen.labels).mean())}
    else:
        parts = parts_of(run, sample)
        p = collect(run, sample, np.zeros(0, dtype=np.int64), parts)
        rows = [s.row(block) for block, s in p.stats.items()]
        summary |= {"not_done": parts.notes} if parts.notes else {}
        out.mkdir(exist_ok=True)
        summary["accuracy_on_these_images"] = float((p.predicted == p.labels).mean())
    write_csv(out / "activations.csv", rows, STAT_COLUMNS)
    summary["seconds"] = time.perf_counter() - start
    write_json(out / "summary.json", summary)
    return summary


@dataclass
class Seen:
    """What one pass over a run's sampled test images found, ready to be drawn."""

    labels: np.ndarray  # per sampled image
    predicted: np.ndarray
    grid: np.ndarray  # positions in the sample of the picture grid
    picks: dict[str, np.ndarray]  # correct, wrong: positions of Grad-CAM's images
    pictures: dict[str, np.ndarray]  # uint8 NHWC: the grid, the correct and the wrong picks
    maps: dict[str, np.ndarray]  # per stage: the grid's feature maps
    layer: str  # Grad-CAM's
    layer_reason: str
    cams: dict[str, np.ndarray]  # correct, wrong: (N, H, W) in 0..1
    rows: list[dict]  # activation statistics per block (STAT_COLUMNS)
    xy: np.ndarray  # the t-SNE map of the penultimate features
    first_conv: nn.Conv2d  # its filters are drawn
    notes: list[str]  # what could not be done, and why


def look(run: LoadedRun, sample: np.ndarray) -> Seen:
    """Everything `inspect` draws, for the images at `sample` of the run's test set."""
    from sklearn.manifold import TSNE

    test = run.splits.test

    def at(positions: np.ndarray) -> torch.Tensor:
        """The uint8 NHWC images at these positions of the sample."""
        return test.images[torch.as_tensor(sample[positions], device=test.device)]

    grid = first_per_class(test.labels.cpu().numpy()[sample])
    parts = parts_of(run, sample)
    p = collect(run, sample, grid, parts)
    layer, why = cam_layer(p.sizes) if parts.cam is None else (parts.cam, parts.cam_reason)
    picks = {"correct": first_per_class(p.labels, p.predicted == p.labels),
             "wrong": first_per_class(p.labels, p.predicted != p.labels)}
    cams = {kind: grad_cam(run, layer, test.normalize(at(idx)),
                           torch.as_tensor(p.predicted[idx], device=test.device))
            if len(idx) else np.zeros((0, 32, 32)) for kind, idx in picks.items()}
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(sample) - 1) / 3),
              random_state=0).fit_transform(p.features)
    return Seen(labels=p.labels, predicted=p.predicted, grid=grid, picks=picks,
                pictures={kind: at(idx).cpu().numpy()
                          for kind, idx in {"grid": grid, **picks}.items()},
                maps={stage: maps.numpy() for stage, maps in p.maps.items()},
                layer=layer, layer_reason=why, cams=cams,
                rows=[s.row(block) for block, s in p.stats.items()], xy=xy,
                first_conv=parts.first_conv, notes=parts.notes)


def _write_figures(out: Path, run: LoadedRun, seen: Seen) -> None:
    """Pictures as PNG alone; plots as PNG and SVG."""
    name, classes = run.experiment.name, run.splits.images.classes
    for stage, maps in seen.maps.items():
        save(figures.feature_map_figure(seen.pictures["grid"], maps, GRID_CHANNELS,
                                        f"{name}: {stage} feature maps"),
             out, f"feature_maps_{stage}", svg=False)
    save(figures.filter_figure(seen.first_conv.weight.detach().float().cpu().numpy(), name),
         out, "stem_filters", svg=False)
    for kind, idx in seen.picks.items():
        save(figures.cam_figure(seen.pictures[kind], seen.cams[kind],
                                [classes[i] for i in seen.labels[idx]],
                                [classes[i] for i in seen.predicted[idx]],
                                f"{name}: Grad-CAM on {seen.layer}, {kind} predictions (red: "
                                "most weight for the predicted class)"),
             out, f"cam_{kind}", svg=False)
    save(figures.activations_figure({name: seen.rows}, f"{name}: activations per block "
                                                       f"({len(seen.labels)} test images)"),
         out, "activations")
    fine_to_group, group_names = run.splits.images.groups()
    save(figures.embedding_figure(seen.xy, fine_to_group[seen.labels], group_names, seen.labels,
                                  seen.predicted, classes,
                                  f"{name}: penultimate features and per-class accuracy"),
         out, "embedding")
