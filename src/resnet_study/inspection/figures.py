"""The figures of one inspected model: feature maps, stem filters, Grad-CAM overlays,
activation statistics per block, and a t-SNE map beside the per-class accuracy. Every text from
the run or its data (run, class and block names) goes through `plots.literal`."""

from __future__ import annotations

import math

import matplotlib.lines
import numpy as np

from ..plots import literal, plt


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
    ax.set_title(literal(f"{title} ({maps.shape[1]} channels, {side}x{side}; the {len(top)} "
                         "most active)"), fontsize=9, pad=18)
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
    ax.set_title(literal(f"{title}: the stem's {n} learned {k}x{k} filters (RGB, each scaled "
                         "to its own range)"), fontsize=9)
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
        axes[0, c].set_title(literal(f"true {true[c]}"), fontsize=7)
        axes[1, c].imshow(image)
        axes[1, c].imshow(cams[c], cmap="jet", alpha=0.45, interpolation="bilinear")
        axes[1, c].set_title(literal(f"pred {predicted[c]}"), fontsize=7)
    fig.suptitle(literal(title), fontsize=9)
    return fig


ACTIVATION_PANELS = [("variance", "output variance"), ("dead_fraction", "ReLUs that never fire"),
                     ("residual_ratio", "|residual| / |shortcut|")]


def activations_figure(rows_by_label: dict[str, list[dict]], title: str):
    """Per block: output variance, dead ReLU fraction, residual/shortcut norm; a line per run or
    experiment (blocks named on the axis where all lines have the same blocks)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for rows in rows_by_label.values():
        for ax, (key, _) in zip(axes, ACTIVATION_PANELS, strict=True):
            ax.plot(range(len(rows)), [r[key] for r in rows], marker="o", markersize=3)
    lengths = {len(rows) for rows in rows_by_label.values()}
    names = [r["block"] for r in next(iter(rows_by_label.values()))] if len(lengths) == 1 else []
    for ax, (key, ylabel) in zip(axes, ACTIVATION_PANELS, strict=True):
        ax.set_ylabel(ylabel)
        ax.set_xlabel("block" if names else "block (in order)")
        if names:
            step = max(1, len(names) // 8)
            ax.set_xticks(range(0, len(names), step), [literal(n) for n in names[::step]],
                          rotation=45, fontsize=7)
        if key == "variance":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if rows_by_label:  # below the block names; given, as the axes drop labels starting "_"
        fig.legend(axes[0].lines, [literal(label) for label in rows_by_label],
                   loc="upper center", bbox_to_anchor=(0.5, -0.1),
                   ncol=min(len(rows_by_label), 3), fontsize=8, frameon=False)
    fig.suptitle(literal(title))
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
        left.legend(handles, [literal(colour_names[i]) for i in present], fontsize=6,
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
    right.set_yticks(range(n), [literal(classes[i]) for i in order],
                     fontsize=7 if n <= 20 else 3)
    right.set_xlabel("test accuracy on these images")
    right.set_xlim(0, 1)
    right.set_title("per-class accuracy", fontsize=9)
    fig.suptitle(literal(title), fontsize=10)
    fig.tight_layout()
    return fig
