"""Figures as files: matplotlib without a window, byte-stable SVGs, text drawn as written, and
`save`, which writes a figure as PNG (and SVG) and returns the PNG for a self-contained page."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import NamedTuple

import matplotlib

from .files import write_bytes

matplotlib.use("Agg")  # files only; never a window
matplotlib.rcParams["svg.hashsalt"] = "resnet-study"  # same results, byte-identical SVGs
# Not rcParams["text.parse_math"] = False, though it would keep every string off mathtext: the
# log axes' tick labels are mathtext ($\mathdefault{10^{-2}}$) and would be drawn as that source.
# The text the figures are given is made literal instead, by `literal`, wherever it is given.
import matplotlib.pyplot as plt  # noqa: E402


class Figure(NamedTuple):
    """A figure of the report's page: its file name, its caption, its PNG as base64."""

    name: str
    caption: str
    png: str


def literal(text: str) -> str:
    """`text` as matplotlib draws it as written, never as mathtext. Run names, class names and
    settings come from the user's files: an even number of `$` in one makes matplotlib parse it
    as math, and `$\\frac{a}$` then stops `savefig` (and with it the report) with a ValueError.
    An escaped `\\$` is drawn as `$`, and is never math, whatever else the text holds."""
    return str(text).replace("$", r"\$")


def save(fig, out: Path, name: str, svg: bool = True) -> str:
    """Write `name`.png (and `name`.svg for plots); return the PNG as base64 for the page. Each
    is rendered in memory and written atomically (`files`): a full disk or a kill leaves the
    last complete figure, and a link at the file's name is replaced, never written through."""
    try:
        # The tight box found once for both files: `bbox_inches="tight"` draws the whole figure
        # once more per file to find it, a third of the time a report spends on figures.
        tight = fig.get_tightbbox(fig.canvas.get_renderer()).padded(
            matplotlib.rcParams["savefig.pad_inches"])
        if svg:
            buf = io.BytesIO()
            fig.savefig(buf, format="svg", bbox_inches=tight, metadata={"Date": None})
            write_bytes(out / f"{name}.svg", buf.getvalue())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches=tight)
        write_bytes(out / f"{name}.png", buf.getvalue())
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
