"""The report's figures: the paper's loss curves with seed bands, its data figures, and the
class confusion it lacked. Each is saved as SVG (byte-stable) and PNG (embedded in the page)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only; never a window
matplotlib.rcParams["svg.hashsalt"] = "resnet-study"  # same results, byte-identical SVGs
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..data.loader import PAD, DeviceLoader, normalization  # noqa: E402
from ..data.sources import ImageSet  # noqa: E402
from .runs import Run, combined_profile  # noqa: E402


class Panel(NamedTuple):
    """A figure of loss curves: its label, its title, its runs, and the runs any one of which
    it needs to be drawn (by default, any of its own)."""

    label: str
    title: str
    names: list[str]
    needs: tuple[str, ...] = ()


REFERENCES = ["resnet18-lr0.01", "new-wide-resnet18"]  # the literature panels' yardsticks
FIGURES = {  # the paper's own groupings of loss curves, then the literature rows'
    "figure5": Panel("Figure 5", "Initial learning rate",
                     ["resnet18-lr0.1", "resnet18-lr0.01", "resnet18-lr0.001"]),
    "figure6": Panel("Figure 6", "SGD, Adam and Adam + gradient clipping",
                     ["resnet18-lr0.01", "resnet18-adam", "resnet18-adam-clip"]),
    "figure7": Panel("Figure 7", "Without batch norm, with dropout",
                     ["resnet18-lr0.01", "resnet18-no-bn", "resnet18-dropout"]),
    "figure8": Panel("Figure 8", "Wide blocks, 3x3 shortcuts, pre-activation",
                     ["resnet18-lr0.01", "resnet18-wide", "resnet18-3x3-shortcut",
                      "resnet18-preact"]),
    "figure9": Panel("Figure 9", "New Wide ResNet-18, pre-trained and base",
                     ["new-wide-resnet18", "resnet18-pretrained", "resnet18-lr0.01"]),
    "literature": Panel("Literature rows, paper's protocol", "WRN-16-8 and ResNet-110 under "
                        "the paper's recipe, against the base model and the New Wide ResNet-18",
                        [*REFERENCES, "wrn-16-8-paper-recipe", "resnet-110-paper-recipe"],
                        ("wrn-16-8-paper-recipe", "resnet-110-paper-recipe")),
    "literature-published": Panel("Literature rows, published recipes", "WRN-16-8 and "
                                  "ResNet-110 with their published recipes, against the base "
                                  "model and the New Wide ResNet-18",
                                  [*REFERENCES, "wrn-16-8", "resnet-110"],
                                  ("wrn-16-8", "resnet-110")),
}


def save(fig, out: Path, name: str, svg: bool = True) -> str:
    """Write `name`.png (and `name`.svg for plots); return the PNG as base64 for the page."""
    if svg:
        fig.savefig(out / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    (out / f"{name}.png").write_bytes(buf.getvalue())
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def protocol_mark(profiles: set[str]) -> str:
    """The title suffix of a figure drawn from runs off the paper's protocol."""
    return {"quick": " [QUICK profile]", "custom": " [custom settings, not the paper's protocol]",
            "paper": ""}[combined_profile(profiles)]


def curves_figure(results: dict[str, list[Run]], names: list[str], title: str):
    """Train and validation loss, and top-1, per epoch: mean over seeds, min-max band. A legend
    entry names its runs' departures from the preset."""
    panels = [("train_loss", "training loss"), ("test_loss", "validation loss"),
              ("test_top1", "top-1 accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    profiles = set()
    for name in names:
        runs = results.get(name)
        if not runs:
            continue
        profiles |= {r.experiment.profile for r in runs}
        settings = sorted({r.experiment.settings for r in runs} - {"paper"})
        label = f"{name} (n={len(runs)})" + (f" [{'; '.join(settings)}]" if settings else "")
        for ax, (key, _) in zip(axes, panels, strict=True):
            epochs = min(len(r.metrics[key]) for r in runs)
            values = np.stack([r.metrics[key][:epochs] for r in runs])
            x = np.arange(1, epochs + 1)
            line, = ax.plot(x, values.mean(0), label=label)
            ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    for ax, (key, label) in zip(axes, panels, strict=True):
        low, high = ax.dataLim.intervaly
        if key.endswith("loss") and low > 0 and high / low > 20:
            ax.set_yscale("log")  # one diverging run must not flatten the others
            label += " (log scale)"
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the panels, where long labels (overrides) cover no curve
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(labels), 2), fontsize=8, frameon=False)
    fig.suptitle(title + protocol_mark(profiles))
    return fig


def figure2(images: ImageSet):
    """The first training image of each of the first 10 superclasses (CIFAR-100 only)."""
    fig, axes = plt.subplots(1, 10, figsize=(12, 1.8))
    for coarse, ax in enumerate(axes):
        i = int(np.flatnonzero(images.train_coarse == coarse)[0])
        ax.imshow(images.train_images[i].transpose(1, 2, 0))
        ax.set_title(images.classes[images.train_labels[i]], fontsize=8)
        ax.axis("off")
    return fig


def figure3(images: ImageSet, padding_mode: str, seed: int = 0):
    """The start of the first training mini-batch, cropped and flipped exactly as in training
    (before normalisation, so that it is viewable)."""
    mean, std = normalization(images.train_images, "channel")
    loader = DeviceLoader(images.train_images, images.train_labels, batch_size=64, device="cpu",
                          mean=mean, std=std, augment=True, padding_mode=padding_mode, seed=seed)
    g = loader.generator(0)
    first = torch.randperm(loader.num_images, generator=g)[:64]  # as DeviceLoader.epoch draws
    x = loader.augment_batch(first, g)[0].numpy()
    fig, axes = plt.subplots(8, 8, figsize=(7, 7))
    for img, ax in zip(x, axes.ravel(), strict=False):
        ax.imshow(img.transpose(1, 2, 0))
        ax.axis("off")
    fig.suptitle(f"A training mini-batch: random 32x32 crops of {PAD}-pixel {padding_mode}-padded "
                 "images, half of them flipped", fontsize=9)
    return fig


def confusion_figure(confusion: np.ndarray, groups: list[str], title: str):
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(confusion, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


# --- inside a trained model (`inspect`) -------------------------------------------------------

def _scaled(a: np.ndarray) -> np.ndarray:
    """To 0..1 over its own range (a constant map becomes 0)."""
    low, high = a.min(), a.max()
    return (a - low) / (high - low) if high > low else np.zeros_like(a, dtype=np.float64)


def _tile(a: np.ndarray, size: int) -> np.ndarray:
    """An HxW map (scaled, through viridis) or an HxWx3 image, enlarged to `size` by repetition."""
    rgb = plt.get_cmap("viridis")(_scaled(a))[..., :3] if a.ndim == 2 else a
    return rgb.repeat(size // rgb.shape[0], 0).repeat(size // rgb.shape[1], 1)


def _mosaic(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Rows of equal RGB tiles as one image, white between them: one imshow for a whole grid."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.ones((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def feature_map_figure(images: np.ndarray, maps: np.ndarray, channels: int, title: str):
    """Rows: the images (NxHxWx3 uint8); columns: the image, then the `channels` most active
    channels of `maps` (NxCxhxw) on them, each map scaled to its own range."""
    top = maps.mean(axis=(0, 2, 3)).argsort()[::-1][:channels].tolist()
    size = images.shape[1]
    rows = [[_tile(image / 255, size)] + [_tile(m[c], size) for c in top]
            for image, m in zip(images, maps, strict=True)]
    fig, ax = plt.subplots(figsize=(1.2 * (len(top) + 1), 1.2 * len(images)))
    ax.imshow(_mosaic(rows), interpolation="nearest")
    ax.set_xticks([(size + 2) * k + size / 2 for k in range(len(top) + 1)],
                  ["image", *(f"ch {c}" for c in top)], fontsize=7)
    ax.set_yticks([])
    ax.xaxis.tick_top()
    side = maps.shape[-1]
    ax.set_title(f"{title} ({maps.shape[1]} channels, {side}x{side}; the {len(top)} most "
                 "active)", fontsize=9, pad=18)
    return fig


def filter_figure(weight: np.ndarray, title: str):
    """A stem's filters (out x 3 x k x k), each as an RGB patch scaled to its own range."""
    weight = weight.transpose(0, 2, 3, 1)
    n, k = len(weight), weight.shape[1]
    cols = min(16, n)
    tiles = [_tile(_scaled(w), 4 * k) for w in weight]
    fig, ax = plt.subplots(figsize=(cols * 0.6, math.ceil(n / cols) * 0.6 + 0.4))
    ax.imshow(_mosaic([tiles[i:i + cols] for i in range(0, n, cols)]), interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{title}: the stem's {n} learned {k}x{k} filters (RGB, each scaled to its "
                 "own range)", fontsize=9)
    return fig


def cam_figure(images: np.ndarray, cams: np.ndarray, true: list[str], predicted: list[str],
               title: str):
    """Each image above its Grad-CAM overlay (cams: NxHxW in 0..1)."""
    n = max(len(images), 1)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for c, image in enumerate(images):
        axes[0, c].imshow(image)
        axes[0, c].set_title(f"true {true[c]}", fontsize=7)
        axes[1, c].imshow(image)
        axes[1, c].imshow(cams[c], cmap="jet", alpha=0.45, interpolation="bilinear")
        axes[1, c].set_title(f"pred {predicted[c]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


ACTIVATION_PANELS = [("variance", "output variance"), ("dead_fraction", "ReLUs that never fire"),
                     ("residual_ratio", "|residual| / |shortcut|")]


def activations_figure(rows_by_label: dict[str, list[dict]], title: str):
    """Per block: output variance, dead ReLU fraction, residual/shortcut norm; a line per run or
    experiment (blocks named on the axis where all lines have the same blocks)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, rows in rows_by_label.items():
        for ax, (key, _) in zip(axes, ACTIVATION_PANELS, strict=True):
            ax.plot(range(len(rows)), [r[key] for r in rows], marker="o", markersize=3,
                    label=label)
    lengths = {len(rows) for rows in rows_by_label.values()}
    names = [r["block"] for r in next(iter(rows_by_label.values()))] if len(lengths) == 1 else []
    for ax, (key, ylabel) in zip(axes, ACTIVATION_PANELS, strict=True):
        ax.set_ylabel(ylabel)
        ax.set_xlabel("block" if names else "block (in order)")
        if names:
            step = max(1, len(names) // 8)
            ax.set_xticks(range(0, len(names), step), names[::step], rotation=45, fontsize=7)
        if key == "variance":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below the block names
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                   ncol=min(len(labels), 3), fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def embedding_figure(xy: np.ndarray, colour: np.ndarray, colour_names: list[str],
                     labels: np.ndarray, predicted: np.ndarray, classes: list[str], title: str):
    """A 2-D map of features coloured by `colour` (class or superclass), beside the accuracy
    per class on the same images."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2),
                                      gridspec_kw={"width_ratios": [1.1, 1]})
    scatter = left.scatter(xy[:, 0], xy[:, 1], c=colour, s=4,
                           cmap="tab20" if len(colour_names) > 10 else "tab10")
    if len(colour_names) <= 20:
        present = sorted(set(colour.tolist()))
        handles = [matplotlib.lines.Line2D([], [], marker="o", linestyle="", markersize=4,
                                           color=scatter.cmap(scatter.norm(v)))
                   for v in present]
        left.legend(handles, [colour_names[i] for i in present], fontsize=6,
                    loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    left.set_title(f"t-SNE of the penultimate features ({len(labels)} test images)", fontsize=9)
    left.set_xticks([])
    left.set_yticks([])
    n = len(classes)
    totals = np.bincount(labels, None, n)
    accuracy = np.divide(np.bincount(labels, predicted == labels, n), totals,
                         out=np.full(n, np.nan), where=totals > 0)
    order = np.argsort(np.nan_to_num(accuracy, nan=-1))
    right.barh(range(n), accuracy[order], height=0.8)
    right.set_yticks(range(n), [classes[i] for i in order], fontsize=7 if n <= 20 else 3)
    right.set_xlabel("test accuracy on these images")
    right.set_xlim(0, 1)
    right.set_title("per-class accuracy", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
