"""The report's figures: the paper's loss curves with seed bands, its data figures, and the
class confusion it lacked. Each is saved as SVG (byte-stable) and PNG (embedded in the page).
Every text from the runs or the data (run, class and group names) goes through `plots.literal`."""

from __future__ import annotations

from typing import NamedTuple

import matplotlib.ticker
import numpy as np

from ..catalogue import PRESETS
from ..data.loader import PAD, DeviceLoader, normalization
from ..data.sources import ImageSet
from ..labels import title_mark
from ..plots import literal, plt
from .runs import Run


class Panel(NamedTuple):
    """A figure of loss curves: its label, its title, its runs, and the runs any one of which
    it needs to be drawn (by default, any of its own)."""

    label: str
    title: str
    names: list[str]
    needs: tuple[str, ...] = ()


REFERENCES = ["resnet18-lr0.01", "new-wide-resnet18"]  # the literature panels' yardsticks
IMPROVED, ABLATION = (PRESETS.groups()[g] for g in ("improved", "improved-ablation"))
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
    "improved": Panel("The improved ResNet-18", "This study's presets, against the paper's "
                      "rows run beside them",
                      [*IMPROVED, "resnet18-lr0.01", "resnet18-adam",
                       "new-wide-resnet18"],
                      tuple(IMPROVED)),
    "improved-ablation": Panel("What each part contributes", "The improved ResNet-18 with one "
                               "part taken away at a time",
                               [IMPROVED[0], *ABLATION],
                               tuple(ABLATION)),
}


def curves_figure(results: dict[str, list[Run]], names: list[str], title: str):
    """Train and validation loss, and top-1, per epoch: mean over seeds, min-max band. A legend
    entry names its runs' departures from the preset. Names and settings are the runs' own
    text, drawn `literal`."""
    panels = [("train_loss", "training loss"), ("test_loss", "validation loss"),
              ("test_top1", "top-1 accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    profiles = set()
    legend = []  # (line, label), given: the axes would drop a label starting "_"
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
            line, = ax.plot(x, values.mean(0))
            ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        legend.append((axes[0].lines[-1], literal(label)))
    for ax, (key, label) in zip(axes, panels, strict=True):
        low, high = ax.dataLim.intervaly
        if key.endswith("loss") and low > 0 and high / low > 20:
            ax.set_yscale("log")  # one diverging run must not flatten the others
            label += " (log scale)"
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if legend:  # below the panels, where long labels (overrides) cover no curve
        fig.legend(*zip(*legend, strict=True), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(legend), 2), fontsize=8, frameon=False)
    fig.suptitle(literal(title + title_mark(profiles)))
    return fig


def figure2(images: ImageSet):
    """The first training image of each of the first 10 superclasses (CIFAR-100 only)."""
    fig, axes = plt.subplots(1, 10, figsize=(12, 1.8))
    for coarse, ax in enumerate(axes):
        i = int(np.flatnonzero(images.train_coarse == coarse)[0])
        ax.imshow(images.train_images[i].transpose(1, 2, 0))
        ax.set_title(literal(images.classes[images.train_labels[i]]), fontsize=8)
        ax.axis("off")
    return fig


def figure3(images: ImageSet, padding_mode: str, seed: int = 0):
    """The first training mini-batch of 64, as the loader serves it in training (before
    normalisation, so that it is viewable)."""
    mean, std = normalization(images.train_images, "channel")
    loader = DeviceLoader(images.train_images, images.train_labels, batch_size=64, device="cpu",
                          mean=mean, std=std, augment=True, padding_mode=padding_mode, seed=seed)
    x = loader.pixels(epoch=0).numpy()
    fig, axes = plt.subplots(8, 8, figsize=(7, 7))
    for img, ax in zip(x, axes.ravel(), strict=False):
        ax.imshow(img.transpose(1, 2, 0))
        ax.axis("off")
    fig.suptitle(f"A training mini-batch: random 32x32 crops of {PAD}-pixel {padding_mode}-padded "
                 "images, half of them flipped", fontsize=9)
    return fig


def confusion_figure(confusion: np.ndarray, groups: list[str], title: str):
    """Rows: true group, columns: predicted. The groups are the data set's (its folders' names)
    and the title names a run: both drawn `literal`."""
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(confusion, cmap="viridis", vmin=0, vmax=1)
    names = [literal(g) for g in groups]
    ax.set_xticks(range(len(groups)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(groups)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(literal(title), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig
