"""What a search leaves in its folder: trials.csv, Optuna's own figures, a self-contained page
(index.html), and best.toml, the best trial as an experiment entry for `study --experiments`.
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
import optuna.visualization.matplotlib as vis
from optuna.trial import TrialState

from ..config import (
    EXECUTION_FIELDS,
    RECIPE_SECTIONS,
    SECTION_OF,
    differences,
    get_experiment,
    one_line,
)
from ..data.sources import ImageSet
from ..experiment_files import NAME
from ..files import write_csv, write_json, write_text
from ..plots import Figure, plt, save
from ..report.page import STYLE, figure_html
from .space import FIDELITY
from .trials import OBJECTIVE, Search, counted, outcome, settings

FIGURES = {  # name: (Optuna's figure, caption)
    "history": (vis.plot_optimization_history, "Optimisation history: each trial's validation "
                "top-1, and the best so far."),
    "importances": (vis.plot_param_importances, "Parameter importances (fANOVA) for the "
                    "validation top-1, over the completed trials."),
    "parallel": (vis.plot_parallel_coordinate, "Parallel coordinates: each completed trial's "
                 "knobs and its validation top-1."),
    "intermediate": (vis.plot_intermediate_values, "Validation top-1 after each epoch, per "
                     "trial: where the pruner stopped the pruned ones."),
}
WHY = ("The search chooses on images held out of the training set, never on the test set: a "
       "choice read off the test set makes its test accuracy a biased estimate of how well the "
       "chosen model does on new images. best.toml takes the choice to `study`, which measures "
       "it on the test set with several seeds, apart from the choosing.")


def write_outputs(search: Search, study: optuna.Study, images: ImageSet) -> dict:
    """Write the folder's outputs from the study as it stands; return its summary."""
    trials = study.get_trials(deepcopy=False)
    write_json(search.out / "search.json", search.definition())
    rows = [_row(search, t) for t in trials]
    knobs = [k.name for k in search.space.knobs]
    write_csv(search.out / "trials.csv", rows,
              ["number", "state", "value", "epochs", "seconds", "gflop_per_image", "outcome",
               "paper_row", "retry_of", "run", *knobs], "\n")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value) if done else None
    figures, notes = _figures(study, search.out)
    if best is not None:
        write_text(search.out / "best.toml", best_toml(search, best, images))
    else:
        notes.append("No trial has completed yet: no best.toml.")
    summary = {"search": str(search.out), "trials": sum(map(counted, trials)),
               "asked": search.trials, "best": None if best is None else best.number,
               "best_value": None if best is None else best.value,
               **{s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}}
    write_text(search.out / "index.html", _page(search, rows, best, figures, notes, images))
    return summary


def _row(search: Search, t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    retried = t.system_attrs.get("failed_trial")
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "epochs": t.user_attrs.get("epochs", max(t.intermediate_values, default=None)),
            "seconds": t.user_attrs.get("seconds"),
            "gflop_per_image": t.user_attrs.get("gflop_per_image"),
            "outcome": outcome(t), "paper_row": t.user_attrs.get("paper_row"),
            "retry_of": retried, "run": t.user_attrs.get("run"), **t.params}


def _figures(study: optuna.Study, out: Path) -> tuple[list[Figure], list[str]]:
    figures, notes = [], []
    for name, (plot, caption) in FIGURES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            notes.append(f"{caption.split(':')[0]} not drawn: {one_line(e)}")
            plt.close("all")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        # One axis a knob: the parallel coordinates need room for all of them.
        fig.set_size_inches(max(8.0, 1.1 * len(fig.axes)) if name == "parallel" else 8.0, 4.8)
        figures.append(Figure(f"search-{name}", caption, save(fig, out, f"search-{name}")))
    return figures, notes


def best_toml(search: Search, best: optuna.trial.FrozenTrial, images: ImageSet) -> str:
    """The best trial as an entry of an experiments file: the settings in which it departs
    from the searched experiment, less the search's fidelity (epochs, subset, validation)."""
    name = f"{search.out.name}-best"
    name = name if NAME.fullmatch(name) else "search-best"
    trial_exp = search.base.replace(**settings(search.space, best.params))
    changed: dict[str, dict[str, Any]] = {}
    for key, _, value in differences(get_experiment(search.base.name), trial_exp,
                                     RECIPE_SECTIONS):
        if key not in FIDELITY | EXECUTION_FIELDS:
            changed.setdefault(SECTION_OF[key], {})[key] = value
    d = search.base.data
    fidelity = (f"{search.base.train.epochs} epochs on "
                f"{d.subset if d.subset else 'all the'} training images of {images.name}")
    notes = (f"Chosen by `resnet-study search` in {search.out} (trial {best.number}): "
             f"validation top-1 {best.value:.4f} on {d.val_split} images held out of the "
             f"training set, after {fidelity}. Not measured on the test set.")
    fidelity_flags = " ".join([f"--epochs {search.base.train.epochs}",
                               *([f"--subset {d.subset}"] if d.subset else [])])
    lines = [f"# {notes}", "# Confirm it on the test set with seeds, beside the base model (add "
             f"{fidelity_flags} for the search's fidelity):",
             f"#   resnet-study study {name} {search.base.name} --experiments "
             f"{search.out / 'best.toml'} --data {d.data} --seeds 3",
             "", f'["{name}"]', f"extends = {_toml(search.base.name)}",
             f"row = {_toml(f'Best of search {search.out.name}')}", f"notes = {_toml(notes)}",
             'group = "search"']
    for section, values in changed.items():
        lines += ["", f'["{name}".{section}]', *(f"{k} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _page(search: Search, rows: list[dict], best, figures: list[Figure], notes: list[str],
          images: ImageSet) -> str:
    e = html.escape
    d = search.base.data
    knobs = [k.name for k in search.space.knobs]
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>resnet-study search: "
             f"{e(str(search.out))}</title><style>{STYLE}</style></head><body>",
             f"<h1>Search {e(search.out.name)}</h1>",
             f"<p>Objective: {e(OBJECTIVE)}, on {d.val_split:,} images held out of the training "
             f"set of <b>{e(images.name)}</b>; {search.base.train.epochs} epochs on "
             f"{f'{d.subset:,}' if d.subset else 'all the remaining'} training images per trial. "
             f"Sampler {e(search.sampler)}, pruner {e(search.pruner)}"
             + (f" (from epoch {search.min_epochs})" if search.pruner != "none" else "")
             + f"; searched experiment "
             f"{e(search.base.name)}"
             + (f"; at most {search.max_gflop:g} training GFLOP per image" if search.max_gflop
                else "") + ".</p>",
             f"<p>Trials: {', '.join(f'{n} {e(s.lower())}' for s, n in states.items())} "
             f"({search.trials} asked for).</p>", f"<p><i>{e(WHY)}</i></p>"]
    if best is not None:
        parts.append(f"<h2>Best trial: {best.number}</h2><p>Validation top-1 "
                     f"{best.value:.4f}. Its knobs: "
                     + ", ".join(f"<code>{e(k)} = {e(str(v))}</code>" for k, v in
                                 best.params.items())
                     + ". As an experiment: <code>best.toml</code>.</p>")
    parts += ["<h2>Figures</h2>", *(f"<p><i>{e(n)}</i></p>" for n in notes),
              *(figure_html(f.caption, f.png) for f in figures)]
    head = ["number", "state", "value", "epochs", "seconds", "outcome", "paper_row", *knobs]
    parts.append("<h2>Trials</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(_cell(r.get(h)))}</td>" for h in head) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
