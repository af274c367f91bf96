"""Table 1, the paper's figures and the statistics it lacked, from a study directory.

Everything is computed from the runs' own files (summary.json, metrics.csv, predictions.npz,
read by `runs`); only completed runs count, and every other run is listed with its reason.
A run that departs from the paper's protocol (`--quick`, or any overridden setting) is marked
as such, with its overrides named, in every output, and is not compared with the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ..catalogue import PRESETS
from ..config import BASE_EXPERIMENT, PAPER
from ..data.sources import ImageSet
from ..data.store import load_images
from ..errors import UsageError
from ..files import write_csv, write_rows, write_text
from ..labels import (
    LITERATURE,
    combined_profile,
    combined_settings,
    protocol_notes,
    settings_cell,
    title_mark,
)
from ..plots import Figure, save
from . import page
from .escape import markdown_escape, tex_escape
from .figures import (
    FIGURES,
    confusion_figure,
    curves_figure,
    figure2,
    figure3,
)
from .inside import Inside, study_section
from .runs import Run, paper_order, scan


@dataclass
class Report:
    index: Path  # the page
    completed: int  # runs in the table
    without_result: list[dict]  # {experiment, run, status, reason} of every other run


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}min {round(seconds % 60)}s"


CRLF = "\r\n"  # the report's CSV files have always had the csv module's own line ends


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(markdown_escape(c) for c in cells) + " |"


# --- Table 1 ----------------------------------------------------------------------------------

def _settings(runs: list[Run]) -> str:
    return combined_settings(r.experiment for r in runs)


def table_rows(results: dict[str, list[Run]], without_result: list[dict] = ()) -> list[dict]:
    """One row per experiment in the paper's order; one whose runs all failed gets n = 0."""
    rows = []
    for name in paper_order({*results, *(u["experiment"] for u in without_result)}):
        runs = results.get(name)
        paper = PAPER["experiments"].get(name) or LITERATURE.get(name, ({},))[0]
        if not runs:
            exp = PRESETS.experiments.get(name)
            rows.append({"experiment": name, "row": exp.row if exp else name, "n": 0,
                         "params": None, "epochs": None, "train_seconds": None,
                         "top1_mean": None, "top1_std": None, "paper_top1": paper.get("top1"),
                         "difference": None, "profile": "", "settings": "", "extends": ""})
            continue
        top1 = np.array([r.summary["test_top1"] for r in runs])
        tta = [r.summary.get("test_top1_tta") for r in runs]
        profile = combined_profile({r.experiment.profile for r in runs})
        rows.append({
            "experiment": name, "row": runs[0].experiment.row, "params": runs[0].summary["params"],
            "epochs": runs[0].summary["epochs"],
            "train_seconds": float(np.mean([r.summary["train_seconds"] for r in runs])),
            "top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=1)) if len(top1) > 1
            else float("nan"), "n": len(top1),
            "paper_top1": paper.get("top1"),
            "difference": float(top1.mean()) - paper["top1"] if paper and profile == "paper"
            else None,
            "profile": profile, "settings": _settings(runs),
            "extends": runs[0].experiment.extends,
            "tta_mean": float(np.mean(tta)) if None not in tta else None})
    return rows


def unmeasured_literature(rows: list[dict]) -> list[dict]:
    """The paper's literature rows that no experiment of the study re-measured."""
    names = {r["experiment"] for r in rows}
    return [lit for lit in PAPER["literature"]
            if not {lit["published"], lit["paper_recipe"]} & names]


def table_cells(rows: list[dict]) -> list[list[str]]:
    """Table 1 as text cells: the measured rows (literature rows with their measurements), then
    the literature rows the study did not re-measure, with the paper's number alone. Where any
    run tested with flips, they get a column after the protocol's single view."""
    flips = _with_flips(rows)
    cells = []
    for r in rows:
        paper = "" if r["paper_top1"] is None else f"{r['paper_top1']:.4f}"
        tta = [] if not flips else ["" if r.get("tta_mean") is None else f"{r['tta_mean']:.4f}"]
        if not r["n"]:
            cells.append([r["row"], "", "", "no completed run", *tta, "0", paper, "", ""])
            continue
        std = "" if math.isnan(r["top1_std"]) else f" ± {r['top1_std']:.4f}"
        diff = "" if r["difference"] is None else f"{r['difference']:+.4f}"
        cells.append([r["row"], f"{r['params']:,}", _minutes(r["train_seconds"]),
                      f"{r['top1_mean']:.4f}{std}", *tta, str(r["n"]), paper, diff,
                      settings_cell(r["experiment"], r["extends"], r["settings"])])
    return cells + [[lit["row"], "", "", "", *([""] if flips else []), "", f"{lit['top1']:.4f}",
                     "", "literature (not re-measured)"] for lit in unmeasured_literature(rows)]


def _with_flips(rows: list[dict]) -> bool:
    return any(r.get("tta_mean") is not None for r in rows)


def table_head(rows: list[dict]) -> list[str]:
    epochs = {r["epochs"] for r in rows if r["n"]}
    time = f"Training time ({epochs.pop()} epochs, mean)" if len(epochs) == 1 else (
        "Training time (mean)")
    flips = ["Top-1 with flips (mean)"] if _with_flips(rows) else []
    return ["Method", "Total parameters", time, "Top-1 (mean ± sd)", *flips, "n",
            "Paper top-1", "Difference", "Settings"]


def write_tables(rows: list[dict], out: Path, dataset: str) -> None:
    """Table 1 three ways: table1.csv for programs (every number in full), table1.md and
    table1.tex to read and to paste into a paper, the runs' text escaped in each."""
    profiles = {r["profile"] for r in rows}
    note = " ".join([*protocol_notes(profiles),
                     f"Measured on {dataset}; the paper's column is CIFAR-100."])
    columns = ["experiment", "row", "params", "epochs", "train_seconds", "top1_mean", "top1_std",
               *(["tta_mean"] if _with_flips(rows) else []), "n", "paper_top1", "difference",
               "profile", "settings"]
    literature = [{"row": lit["row"], "paper_top1": lit["top1"], "profile": "literature",
                   "settings": "literature (not re-measured)"}
                  for lit in unmeasured_literature(rows)]
    write_csv(out / "table1.csv", [*rows, *literature], columns, CRLF)

    head = table_head(rows)
    body = table_cells(rows)
    md = [f"*{markdown_escape(note)}*", "", _markdown_row(head), "|" + "---|" * len(head)]
    md += [_markdown_row(line) for line in body]
    write_text(out / "table1.md", "\n".join(md) + "\n")

    lines = [r"% " + " ".join(note.splitlines()),
             r"\begin{tabular}{l" + "r" * (len(head) - 2) + "l}", r"\hline",
             " & ".join(tex_escape(h) for h in head) + r" \\", r"\hline"]
    lines += [" & ".join(tex_escape(c) for c in line) + r" \\" for line in body]
    lines += [r"\hline", r"\end{tabular}"]
    write_text(out / "table1.tex", "\n".join(lines) + "\n")


# --- statistics -------------------------------------------------------------------------------

def compare_with_base(results: dict[str, list[Run]], against: str = BASE_EXPERIMENT
                      ) -> list[dict]:
    """Welch's t-test and 95% CI for each experiment's mean top-1 minus that of `against`: the
    base model, or the experiment `report --base` names."""
    if against not in results:
        return []
    base = np.array([r.summary["test_top1"] for r in results[against]])
    base_settings = _settings(results[against])
    whom = "the base model" if against == BASE_EXPERIMENT else against
    out = []
    for name, runs in results.items():
        if name == against:
            continue
        x = np.array([r.summary["test_top1"] for r in runs])
        diff = float(x.mean() - base.mean())
        settings = _settings(runs)
        row = {"experiment": name, "against": against, "difference": diff, "n": len(x),
               "n_base": len(base),
               "method": "Welch t-test", "ci_low": None, "ci_high": None, "p_value": None,
               "settings": settings}
        caveat = ("" if settings == base_settings else
                  f" The two ran under different settings ({settings} against {base_settings}).")
        if len(x) < 2 or len(base) < 2:
            row["method"] = "none (needs 2+ seeds each)"
            row["sentence"] = (f"{name}: {diff * 100:+.2f} points; too few seeds to tell it "
                               f"from seed noise.{caveat}")
            out.append(row)
            continue
        va, vb = x.var(ddof=1) / len(x), base.var(ddof=1) / len(base)
        se = math.sqrt(va + vb)
        if se == 0:
            p, half = (1.0 if diff == 0 else 0.0), 0.0
        else:
            # Welch-Satterthwaite degrees of freedom, shared by the test and the interval.
            df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(base) - 1))
            p = float(2 * stats.t.sf(abs(diff) / se, df))
            half = float(stats.t.ppf(0.975, df) * se)
        row.update(ci_low=diff - half, ci_high=diff + half, p_value=p)
        verdict = ("distinguishable from seed noise" if p < 0.05
                   else "not distinguishable from seed noise")
        row["sentence"] = (f"{name}: {diff * 100:+.2f} points against {whom} "
                           f"(95% CI {row['ci_low'] * 100:+.2f} to {row['ci_high'] * 100:+.2f}, "
                           f"p = {p:.3g}, n = {len(x)} vs {len(base)}): {verdict}.{caveat}")
        out.append(row)
    return out


# --- per class --------------------------------------------------------------------------------

def per_class(runs: list[Run], images: ImageSet) -> dict[str, np.ndarray] | None:
    """Per-class and per-group accuracy averaged over seeds, and the group confusion matrix.

    Groups are CIFAR-100's superclasses when the data has them, else the classes themselves.
    Runs whose predictions do not fit the data set's classes (another data set) are left out.
    """
    n_cls = len(images.classes)
    preds = [r.predictions for r in runs if r.predictions is not None
             and r.predictions["labels"].size
             and max(r.predictions["labels"].max(), r.predictions["predicted"].max()) < n_cls]
    if not preds:
        return None
    fine_to_group, groups = images.groups()
    n_grp = len(groups)
    class_acc = np.zeros(n_cls)
    group_acc = np.zeros(n_grp)
    confusion = np.zeros((n_grp, n_grp))
    for p in preds:
        labels, predicted = p["labels"], p["predicted"]
        hit = predicted == labels
        class_acc += np.bincount(labels, hit, n_cls) / np.maximum(np.bincount(labels, None,
                                                                              n_cls), 1)
        true_g, pred_g = fine_to_group[labels], fine_to_group[predicted]
        group_acc += np.bincount(true_g, true_g == pred_g, n_grp) / np.maximum(
            np.bincount(true_g, None, n_grp), 1)
        np.add.at(confusion, (true_g, pred_g), 1)
    confusion /= np.maximum(confusion.sum(1, keepdims=True), 1)
    return {"class": class_acc / len(preds), "group": group_acc / len(preds),
            "confusion": confusion, "groups": groups}


def _write_per_class(classes: dict, results: dict[str, list[Run]], images: ImageSet, out: Path,
                     group_word: str, profile: str) -> None:
    """One column per model, headed by its name and, if any, its departures from the preset."""
    names = list(classes)
    heads = [n if _settings(results[n]) == "paper" else f"{n} [{_settings(results[n])}]"
             for n in names]
    tables = [("class", images.classes, "class")]
    if group_word == "superclass":
        tables.append(("superclass", images.superclasses, "group"))
    for label, keys, field in tables:
        write_rows(out / f"per_{label}.csv", [[label, *heads, "profile"], *(
            [key, *(f"{classes[n][field][i]:.4f}" for n in names), profile]
            for i, key in enumerate(keys))], CRLF)


# --- the report -------------------------------------------------------------------------------

def report(root: Path, inspect: bool = True, log=None, base: str = BASE_EXPERIMENT) -> Report:
    """Write `root/report/`: all that the study's readable runs give, and the list of the others.
    A damaged or failed run never stops it; a study with no completed run still gets its page.
    With `inspect`, every completed run with a checkpoint is inspected (`inspection`), once:
    its folder keeps the result, and the section "Inside the models" compares them. The
    statistics compare every experiment with `base`."""
    log = log or (lambda msg: print(msg, flush=True))  # progress: stdout (stderr: faults)
    results, without_result = scan(root)
    if base != BASE_EXPERIMENT and base not in results:
        raise UsageError(f"--base {base}: no completed run of it in {root}; choose one of: "
                         f"{', '.join(results) or 'none (no run has completed)'}")
    out = root / "report"
    out.mkdir(exist_ok=True)
    rows = table_rows(results, without_result)
    profile = combined_profile({r["profile"] for r in rows if r["n"]})
    comparisons = compare_with_base(results, base)
    write_csv(out / "statistics.csv", ({**c, "profile": profile} for c in comparisons),
              ["experiment", "against", "difference", "ci_low", "ci_high", "p_value", "n", "n_base",
               "method", "sentence", "settings", "profile"], CRLF)
    notes: list[str] = []  # what could not be drawn, and why
    images = _images(results, notes)
    dataset = images.name if images else (
        next(iter(results.values()))[0].summary.get("dataset", "?") if results
        else "unknown (no run completed)")
    write_tables(rows, out, dataset)
    figures = _figures(results, images, out, notes)
    completed = [r for r in rows if r["n"]]
    best = max(completed, key=lambda r: r["top1_mean"])["experiment"] if completed else None
    group_word = "superclass" if images is not None and images.superclasses is not None else (
        "class")
    classes = _classes(results, images, best, out, group_word, profile, figures)
    inside = (study_section(results, out, best, log) if inspect
              else Inside([], [], ["Not inspected (report --no-inspect)."]))
    index = out / "index.html"
    write_text(index, page.render(page.Page(
        root=root, dataset=dataset, rows=rows, head=table_head(rows), cells=table_cells(rows),
        comparisons=comparisons, figures=figures, notes=notes, classes=classes,
        group_word=group_word, without_result=without_result, inside=inside)))
    return Report(index, sum(len(runs) for runs in results.values()), without_result)


def _images(results: dict[str, list[Run]], notes: list[str]) -> ImageSet | None:
    """The study's data set, for the data figures and per-class results; None (and a note)
    where it is gone or unreachable: the table and the curves still stand."""
    if not results:
        return None
    data = next(iter(results.values()))[0].experiment.data.data
    try:
        return load_images(data, progress=False)
    except UsageError as e:
        notes.append(f"Figures 2 and 3 and the per-class results need the data set ({data}), "
                     f"which could not be read: {e}")
        return None


def _figures(results: dict[str, list[Run]], images: ImageSet | None, out: Path,
             notes: list[str]) -> list[Figure]:
    """Figures 2 and 3 (from the data) and the paper's curve figures, as far as the runs go."""
    figures = []
    if images is not None and images.superclasses is not None:
        figures.append(Figure("figure2", "Figure 2: the first image of the first 10 "
                              "superclasses.", save(figure2(images), out, "figure2")))
    elif images is not None:
        notes.append(f"Figure 2 needs CIFAR-100's superclasses; {images.name} has none, "
                     "so it was not drawn.")
    if images is not None:
        data = next(iter(results.values()))[0].experiment.data
        figures.append(Figure("figure3", "Figure 3: one augmented training mini-batch.",
                              save(figure3(images, data.padding_mode), out, "figure3")))
    for fig_id, (label, title, names, needs) in FIGURES.items():
        if any(n in results for n in needs or names):
            caption = f"{label}: {title} (mean over seeds; band: min to max)."
            missing = [n for n in names if n not in results]
            if missing:
                caption += f" Not drawn, no completed run: {', '.join(missing)}."
            figures.append(Figure(fig_id, caption,
                                  save(curves_figure(results, names, title), out, fig_id)))
    return figures


def _classes(results: dict[str, list[Run]], images: ImageSet | None, best: str | None,
             out: Path, group_word: str, profile: str, figures: list[Figure]) -> dict:
    """Per-class results of the base and the best model (per_class.csv, per_superclass.csv)
    and the best one's confusion figure."""
    if images is None or not results:
        return {}
    classes = {name: per_class(results[name], images)
               for name in dict.fromkeys([BASE_EXPERIMENT, best]) if name in results}
    classes = {k: v for k, v in classes.items() if v is not None}
    if classes:
        _write_per_class(classes, results, images, out, group_word, profile)
        name, pc = list(classes.items())[-1]
        mark = title_mark({r.experiment.profile for r in results[name]})
        figures.append(Figure("confusion", f"Confusion between {group_word}es, {name} "
                              "(rows: true, normalised).",
                              save(confusion_figure(pc["confusion"], pc["groups"],
                                                    f"{name}: {group_word} confusion{mark}"),
                                   out, "confusion")))
    return classes
