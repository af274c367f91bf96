"""Figures as files: matplotlib without a window, byte-stable SVGs, and `save`, which writes a
figure as PNG (and SVG) and returns the PNG for a self-contained page."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only; never a window
matplotlib.rcParams["svg.hashsalt"] = "resnet-study"  # same results, byte-identical SVGs
import matplotlib.pyplot as plt  # noqa: E402


class Figure(NamedTuple):
    """A figure of the report's page: its file name, its caption, its PNG as base64."""

    name: str
    caption: str
    png: str


def save(fig, out: Path, name: str, svg: bool = True) -> str:
    """Write `name`.png (and `name`.svg for plots); return the PNG as base64 for the page."""
    if svg:
        fig.savefig(out / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    (out / f"{name}.png").write_bytes(buf.getvalue())
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
