"""The report's section "Inside the models": every completed run's inspection (`inspection`,
run once and kept in the run's folder), activation statistics per block averaged over seeds for
each experiment against the base model, and the base and best models' picture grids."""

from __future__ import annotations

import base64
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BASE_EXPERIMENT
from ..errors import one_line
from ..files import write_csv
from ..inspection import probes
from ..inspection.probes import MEASURES
from ..plots import Figure, save
from ..training.run_folder import RunFolder
from .runs import Run

PICTURES = ("feature_maps_layer1", "cam_correct", "cam_wrong", "embedding")  # on the page


@dataclass
class Inside:
    """The report's section on the inside of the models: what `report` renders."""

    sentences: list[str]  # each experiment's statistics against the base model's
    figures: list[Figure]
    notes: list[str]  # runs left out, and why


def _inspected(run: Run, pictures: bool, log: Callable[[str], None]) -> list[dict] | str:
    """The run's activation rows, inspecting it first where it has no inspection as recent as
    its checkpoint, or none with pictures where they are wanted; or why there are none."""
    checkpoint = RunFolder(run.directory).checkpoint
    folder = run.directory / "inspect"
    stats = folder / "activations.csv"
    if not checkpoint.exists():
        return "no checkpoint"

    def fresh(path: Path) -> bool:  # written since the checkpoint
        return path.exists() and path.stat().st_mtime >= checkpoint.stat().st_mtime

    if run.experiment.model.user_network and not fresh(stats):  # the report runs no user code
        return (f"a network of your own ({run.experiment.model.family}), which the report "
                f"never imports: run `resnet-study inspect {run.directory}` first")
    if (not fresh(stats) or pictures and not fresh(folder / f"{PICTURES[0]}.png")
            and not run.experiment.model.user_network):
        log(f"report: inspecting {run.directory.parent.name}/{run.directory.name}")
        try:
            probes.inspect_run(run.directory, pictures=pictures)
        except Exception as e:  # data gone, out of memory: the report goes on without it
            return one_line(e)
    with open(stats, newline="") as f:
        return [{k: (v if k in ("block", "stage") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def study_section(results: dict[str, list[Run]], out: Path, best: str | None,
                  log: Callable[[str], None]) -> Inside:
    """Every completed run with a checkpoint, inspected (cached in its folder): activation
    statistics per block, averaged over seeds, for each experiment against the base model
    (report/activations.csv and figures), and the picture grids of the base and best models'
    first runs (the only runs whose pictures it draws)."""
    inside = Inside([], [], [])
    by_experiment: dict[str, list[dict]] = {}
    pictured = {runs[0].directory for name, runs in results.items()
                if runs and name in (BASE_EXPERIMENT, best)}
    for name, runs in results.items():
        per_run = []
        for run in runs:
            rows = _inspected(run, run.directory in pictured, log)
            if isinstance(rows, str):
                inside.notes.append(f"{run.directory.parent.name}/{run.directory.name} not "
                                    f"inspected: {rows}")
            else:
                per_run.append(rows)
        if per_run:
            by_experiment[name] = [
                {"experiment": name, "block": rows[0]["block"], "n": len(per_run),
                 **{key: float(np.mean([r[key] for r in rows])) for key in MEASURES}}
                for rows in zip(*per_run, strict=True)]
    if not by_experiment:
        return inside
    write_csv(out / "activations.csv", [r for rows in by_experiment.values() for r in rows],
              ["experiment", "block", "n", *MEASURES])
    layouts: dict[tuple, dict[str, list[dict]]] = {}
    for name, rows in by_experiment.items():
        layouts.setdefault(tuple(r["block"] for r in rows), {})[name] = rows
    for i, (layout, group) in enumerate(layouts.items()):
        fig_id = "activations" if i == 0 else f"activations-{len(layout)}-blocks"
        caption = (f"Activations per block, mean over seeds: output variance, ReLUs that never "
                   f"fire, and the residual branch's norm against the shortcut's "
                   f"({len(layout)}-block networks).")
        inside.figures.append(Figure(fig_id, caption, save(probes.figures.activations_figure(
            group, f"Activations per block ({len(layout)} blocks)"), out, fig_id)))
    base = by_experiment.get(BASE_EXPERIMENT)
    for name, rows in by_experiment.items():
        inside.sentences.append(_sentence(name, rows, base))
    for label, name in (("base model", BASE_EXPERIMENT), ("best model", best)):
        folder = results[name][0].directory / "inspect" if name in results else None
        if folder is None or not folder.is_dir() or (label == "best model"
                                                      and name == BASE_EXPERIMENT):
            continue
        for picture in PICTURES:
            path = folder / f"{picture}.png"
            if path.exists():
                inside.figures.append(Figure(f"{name}-{picture}", f"{label.capitalize()}, {name} "
                                       f"({folder.parent.name}): {picture.replace('_', ' ')}.",
                                       base64.b64encode(path.read_bytes()).decode()))
    return inside


def _means(rows: list[dict]) -> tuple[float, float, float]:
    """Output variance, dead fraction and residual ratio, each averaged over the blocks."""
    return tuple(float(np.mean([r[key] for r in rows]))
                 for key in ("variance", "dead_fraction", "residual_ratio"))


def _sentence(name: str, rows: list[dict], base: list[dict] | None) -> str:
    """An experiment's statistics in one line, against the base model's where it has them."""
    variance, dead, ratio = _means(rows)
    residual = (f"|residual| / |shortcut| {ratio:.2f}" if not np.isnan(ratio) else
                "|residual| / |shortcut| not measured (a network of your own)")
    text = (f"{name} (n = {rows[0]['n']:.0f}): output variance {variance:.3g}, ReLUs that never "
            f"fire {dead:.1%}, {residual} (means over its {len(rows)} blocks)")
    if base is None or name == BASE_EXPERIMENT:
        return text + "."
    b_variance, b_dead, b_ratio = _means(base)
    return (text + f"; the base model: {b_variance:.3g}, {b_dead:.1%}, {b_ratio:.2f} "
            f"(variance x{variance / b_variance:.2g}).")
