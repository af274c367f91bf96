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
)
from ..data.sources import ImageSet
from ..errors import one_line
from ..experiment_files import NAME
from ..files import write_csv, write_json, write_text
from ..plots import Figure, plt, save
from ..report.page import STYLE, figure_html
from .space import FIDELITY
from .trials import OBJECTIVE, Search, counted, outcome, trial_experiment


def _judged_after(t: optuna.trial.FrozenTrial) -> int | None:
    """The epochs of the last schedule the trial ran to its end."""
    return t.user_attrs.get("epochs", max(t.intermediate_values, default=None))


def _schedule_ends(t: optuna.trial.FrozenTrial) -> dict[int, float]:
    """Validation top-1 at the end of each complete schedule the trial ran: each rung's
    intermediate value, and a completed trial's own value at its last rung."""
    points = dict(t.intermediate_values)
    if t.state == TrialState.COMPLETE:
        points[_judged_after(t)] = t.value
    return points


def _rungs(study: optuna.Study):
    """Each trained trial's validation top-1 at the end of each schedule it ran, the best one in
    colour: Optuna's own figure gives each trial a legend entry (unreadable past a dozen) and
    leaves out the last rung, whose value is the trial's value rather than an intermediate."""
    ran = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    best = max((t for t in ran if t.state == TrialState.COMPLETE), key=lambda t: t.value,
               default=None)
    trials = [(t, sorted(points.items())) for t in ran if (points := _schedule_ends(t))]
    if not trials:
        raise ValueError("no trial has reached the end of a schedule yet")
    fig, ax = plt.subplots()
    for t, points in trials:
        mine = t is best
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, linewidth=2 if mine else 0.8,
                color="C0" if mine else "0.65", zorder=3 if mine else 1,
                label=f"trial {t.number} (best, {t.value:.4f})" if mine else None)
    ax.set_xticks(sorted({epochs for _, points in trials for epochs, _ in points}))
    ax.set(xlabel="epochs of the rung's complete schedule", ylabel="validation top-1",
           title="Validation top-1 at each rung's end")
    if best is not None:
        ax.legend(loc="lower right")
    return ax


FIGURES = {  # name: (the figure drawn from the study: Optuna's or _rungs, caption)
    "history": (vis.plot_optimization_history, "Optimisation history: each trial's validation "
                "top-1, and the best so far."),
    "importances": (vis.plot_param_importances, "Parameter importances (Optuna's default "
                    "evaluator, PED-ANOVA) for the validation top-1, over the completed trials."),
    "parallel": (vis.plot_parallel_coordinate, "Parallel coordinates: each completed trial's "
                 "knobs and its validation top-1."),
    "intermediate": (_rungs, "Validation top-1 at the end of each rung's "
                     "complete schedule (its epochs on the axis), per trial: where the pruner "
                     "stopped the pruned ones, and how far the best one went."),
}
_MAX_PARALLEL = 8  # knobs the parallel coordinates can show and still be read
_MIN_RANKED = 10  # completed trials below which the knobs are not ranked
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
            "epochs": _judged_after(t),
            "seconds": t.user_attrs.get("seconds"),
            "gflop_per_image": t.user_attrs.get("gflop_per_image"),
            "outcome": outcome(t), "paper_row": t.user_attrs.get("paper_row"),
            "retry_of": retried, "run": t.user_attrs.get("rung", t.user_attrs.get("run")),
            **t.params}


def _epochs(rungs: tuple[int, ...]) -> str:
    """3, 9 then 25."""
    return " then ".join(filter(None, [", ".join(map(str, rungs[:-1])), str(rungs[-1])]))


def _figures(study: optuna.Study, out: Path) -> tuple[list[Figure], list[str]]:
    figures, notes = [], []
    for name, (plot, caption) in FIGURES.items():
        kwargs: dict[str, Any] = {}
        if name == "parallel":  # over the knobs that say something, and few enough to read
            params, caption = _parallel_knobs(study, caption)
            if not params:
                notes.append(caption)
                continue
            kwargs["params"] = params
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
                ax = plot(study, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            notes.append(f"{caption.split(':')[0]} not drawn: {one_line(e)}")
            plt.close("all")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        # One axis a knob drawn: the parallel coordinates need room for each of them.
        fig.set_size_inches(max(8.0, 1.1 * len(fig.axes)) if name == "parallel" else 8.0, 4.8)
        figures.append(Figure(f"search-{name}", caption, save(fig, out, f"search-{name}")))
    return figures, notes


def _parallel_knobs(study: optuna.Study, caption: str) -> tuple[list[str], str]:
    """The knobs the parallel coordinates are drawn over, and the caption that says which and
    why: past ten axes the lines cannot be followed, and a knob that kept one value in every
    completed trial only takes room. Empty, with the reason, when no knob varied."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and -float("inf") < t.value < float("inf")]
    seen: dict[str, set[str]] = {}  # each knob's values, in the order the trials drew them
    for t in done:
        for k, v in t.params.items():
            seen.setdefault(k, set()).add(repr(v))  # repr: True and 1 are two values
    varying = [k for k, values in seen.items() if len(values) > 1]
    kept = len(seen) - len(varying)
    left_out = (f"; {kept} that kept one value {'is' if kept == 1 else 'are'} left out"
                if kept else "")
    if not varying:
        return [], (f"Parallel coordinates not drawn: no knob took two values among the "
                    f"{len(done)} completed trials.")
    head = caption.rstrip(".")
    if len(varying) <= _MAX_PARALLEL:
        chosen, which = varying, f"the {len(varying)} knobs that varied{left_out}"
    else:
        ranked, unranked = _ranked(study, varying, len(done))
        chosen = ranked[:_MAX_PARALLEL]
        which = (f"the {_MAX_PARALLEL} most important (by Optuna's parameter importances)"
                 if unranked is None else f"the first {_MAX_PARALLEL} ({unranked})")
        which += f" of the {len(varying)} knobs that varied{left_out}"
    chosen = sorted(chosen)  # Optuna draws its axes in this order, left to right
    return chosen, f"{head}, over {which}. Left to right: {', '.join(chosen)}."


def _ranked(study: optuna.Study, varying: list[str], done: int) -> tuple[list[str], str | None]:
    """The varying knobs, the most important first, by the measure of the importances figure
    (Optuna's default, PED-ANOVA); or as they came, with the reason, where importances cannot
    rank them: Optuna raises, or calls every knob equal, or the trials are too few for any
    ranking to mean something (PED-ANOVA compares the best tenth of them with the rest)."""
    if done < _MIN_RANKED:
        return varying, f"only {done} completed trials: too few to rank them by importance"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few trials: Optuna warns, and is told below
            importance = optuna.importance.get_param_importances(study, params=varying)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return varying, f"importances not computed: {one_line(e)}"
    if len(set(importance.values())) <= 1:
        return varying, "Optuna's importances call every knob equal"
    return sorted(varying, key=lambda k: (-importance.get(k, 0.0), varying.index(k))), None


def best_toml(search: Search, best: optuna.trial.FrozenTrial, images: ImageSet) -> str:
    """The best trial as an entry of an experiments file: the settings in which it departs
    from the searched experiment, less the search's fidelity (epochs, subset, validation)."""
    name = f"{search.out.name}-best"
    name = name if NAME.fullmatch(name) else "search-best"
    trial_exp = trial_experiment(search, best.params)
    changed: dict[str, dict[str, Any]] = {}
    for key, _, value in differences(search.base.origin or search.base, trial_exp,
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


def _title(search: Search) -> str:
    """What the page is about: the experiment searched around, and the folder when its name
    says more than the default's (`search`) or the experiment's name again."""
    folder = search.out.resolve().name
    title = f"Search around {search.base.name}"
    if folder.casefold() in ("", "search", search.base.name.casefold()):
        return title
    return f"{title} \u2014 {folder}"


# The trials table: small type, numbers kept on one line, the knobs and outcome free to wrap.
_TRIALS_STYLE = (".trials{font-size:12px}.trials td{white-space:nowrap;vertical-align:top}"
                 ".trials .outcome,.trials .knobs{white-space:normal;text-align:left}"
                 ".trials td.outcome{min-width:8em;max-width:20em}"
                 ".trials td.knobs{min-width:30em}")
_TRIALS_HEAD = ["number", "state", "value", "epochs", "seconds", "outcome", "paper row", "knobs"]


def _page(search: Search, rows: list[dict], best, figures: list[Figure], notes: list[str],
          images: ImageSet) -> str:
    e = html.escape
    d = search.base.data
    title = _title(search)
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)} "
             f"(resnet-study)</title><style>{STYLE}{_TRIALS_STYLE}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p>Folder <code>{e(str(search.out))}</code>. "
             f"Objective: {e(OBJECTIVE)}, on {d.val_split:,} images held out of the training "
             f"set of <b>{e(images.name)}</b>; complete one-cycle schedules of "
             f"{_epochs(search.rungs)} epochs on "
             f"{f'{d.subset:,}' if d.subset else 'all the remaining'} training images, each "
             f"trial judged at the end of each. Sampler {e(search.sampler)}, pruner "
             f"{e(search.pruner)}"
             + f"; searched experiment "
             f"{e(search.base.name)}"
             + (f"; at most {search.max_gflop:g} training GFLOP per image" if search.max_gflop
                else "") + ".</p>",
             f"<p>Trials: {', '.join(f'{n} {e(s.lower())}' for s, n in states.items())} "
             f"({search.trials} asked for).</p>", f"<p><i>{e(WHY)}</i></p>"]
    if best is not None:
        parts.append(f"<h2>Best trial: {best.number}</h2><p>Validation top-1 "
                     f"{best.value:.4f}. Its knobs: "
                     + ", ".join(f"<code>{e(k)} = {e(_cell(v))}</code>" for k, v in
                                 best.params.items())
                     + ". As an experiment: <code>best.toml</code>.</p>")
    parts += ["<h2>Figures</h2>", *(f"<p><i>{e(n)}</i></p>" for n in notes),
              *(figure_html(f.caption, f.png) for f in figures)]
    parts += _trials_table(rows, [k.name for k in search.space.knobs])
    parts.append("</body></html>")
    return "\n".join(parts)


def _trials_table(rows: list[dict], knobs: list[str]) -> list[str]:
    """One row a trial, with its knobs in one cell (only those it drew: a conditional knob
    that was off is no value) so that the table keeps its width whatever the space's size;
    wide anyway (a long failure), it scrolls inside its own box, not the page."""
    e = html.escape
    parts = ["<h2>Trials</h2><div style='overflow-x:auto'><table class='trials'><tr>"
             + "".join(f"<th class='{h}'>{e(h)}</th>" if h in ("outcome", "knobs")
                       else f"<th>{e(h)}</th>" for h in _TRIALS_HEAD) + "</tr>"]
    for r in rows:
        drawn = ", ".join(f"{k}={_cell(r[k])}" for k in knobs if r.get(k) is not None)
        cells = [*(f"<td>{e(_cell(r.get(h)))}</td>"
                   for h in ("number", "state", "value", "epochs", "seconds")),
                 f"<td class='outcome'>{e(_cell(r.get('outcome')))}</td>",
                 f"<td>{e(_cell(r.get('paper_row')))}</td>",
                 f"<td class='knobs'>{e(drawn)}</td>"]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table></div>")
    return parts


def _cell(value: Any) -> str:
    """A value as the trials table shows it: floats to four significant digits, nothing for
    a value a trial does not have."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
