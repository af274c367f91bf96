"""Table 1, the paper's figures and the statistics it lacked, from a study directory.

Everything is computed from the runs' own files (summary.json, metrics.csv, predictions.npz);
only completed runs count. Each output says when it comes from a `--quick` study.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
matplotlib.rcParams["svg.hashsalt"] = "resnet-study"  # same results, byte-identical SVGs
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from .config import BASE_EXPERIMENT, EXPERIMENTS, Experiment, UsageError  # noqa: E402
from .data import PAD, DeviceLoader, ImageSet, load_images, normalization  # noqa: E402

PAPER = tomllib.loads(resources.files(__package__).joinpath("paper.toml").read_text())
FIGURES = {  # the paper's own groupings of loss curves
    "figure5": ("Initial learning rate", ["resnet18-lr0.1", "resnet18-lr0.01",
                                          "resnet18-lr0.001"]),
    "figure6": ("SGD, Adam and Adam + gradient clipping", ["resnet18-lr0.01", "resnet18-adam",
                                                           "resnet18-adam-clip"]),
    "figure7": ("Without batch norm, with dropout", ["resnet18-lr0.01", "resnet18-no-bn",
                                                     "resnet18-dropout"]),
    "figure8": ("Wide blocks, 3x3 shortcuts, pre-activation",
                ["resnet18-lr0.01", "resnet18-wide", "resnet18-3x3-shortcut",
                 "resnet18-preact"]),
    "figure9": ("New Wide ResNet-18, pre-trained and base",
                ["new-wide-resnet18", "resnet18-pretrained", "resnet18-lr0.01"]),
}
QUICK_NOTE = ("QUICK profile: few epochs on a subset. A smoke test of the pipeline, "
              "not the paper's protocol; do not compare with the paper's numbers.")


@dataclass
class Run:
    experiment: Experiment
    summary: dict
    metrics: dict[str, np.ndarray]  # column -> per-epoch values
    dir: Path


def collect(root: Path) -> dict[str, list[Run]]:
    """Completed runs by experiment, in the paper's order; partial and failed ones are left out."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a study directory")
    found: dict[str, list[Run]] = {}
    for summary_path in sorted(root.glob("*/seed-*/summary.json")):
        run_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        if summary.get("status") != "completed":
            continue
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        metrics = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
        exp = Experiment.from_dict(json.loads((run_dir / "config.json").read_text()))
        found.setdefault(exp.name, []).append(Run(exp, summary, metrics, run_dir))
    if not found:
        raise UsageError(f"{root} holds no completed runs; run `resnet-study study` first")
    return {name: found[name] for name in _paper_order(found)}


def _paper_order(names) -> list[str]:
    order = list(EXPERIMENTS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def unfinished(root: Path) -> list[dict]:
    """The study's runs without a result (failed, diverged, interrupted), each with its reason."""
    out = []
    for run_dir in sorted(p for p in root.glob("*/seed-*") if p.is_dir()):
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        status = summary.get("status", "interrupted")
        if status == "completed":
            continue
        reason = summary.get("error") or (
            f"non-finite loss in epoch {summary.get('diverged_epoch')}" if status == "diverged"
            else "no result yet; rerun the study command to resume it")
        out.append({"experiment": run_dir.parent.name,
                    "run": f"{run_dir.parent.name}/{run_dir.name}",
                    "status": status, "reason": reason})
    return out


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}min {round(seconds % 60)}s"


# --- Table 1 ----------------------------------------------------------------------------------

def table_rows(results: dict[str, list[Run]], without_result: list[dict] = ()) -> list[dict]:
    """One row per experiment in the paper's order; one whose runs all failed gets n = 0."""
    rows = []
    for name in _paper_order({*results, *(u["experiment"] for u in without_result)}):
        runs = results.get(name)
        if not runs:
            exp = EXPERIMENTS.get(name)
            rows.append({"experiment": name, "row": exp.row if exp else name, "n": 0,
                         "params": None, "epochs": None, "train_seconds": None,
                         "top1_mean": None, "top1_std": None,
                         "paper_top1": PAPER["experiments"].get(name, {}).get("top1"),
                         "difference": None})
            continue
        top1 = np.array([r.summary["test_top1"] for r in runs])
        paper = PAPER["experiments"].get(name, {})
        rows.append({
            "experiment": name, "row": runs[0].experiment.row, "params": runs[0].summary["params"],
            "epochs": runs[0].summary["epochs"],
            "train_seconds": float(np.mean([r.summary["train_seconds"] for r in runs])),
            "top1_mean": float(top1.mean()), "top1_std": float(top1.std(ddof=1)) if len(top1) > 1
            else float("nan"), "n": len(top1),
            "paper_top1": paper.get("top1"),
            "difference": float(top1.mean()) - paper["top1"] if paper else None})
    return rows


def table_cells(rows: list[dict]) -> list[list[str]]:
    """Table 1 as text cells, the measured rows then the paper's literature rows."""
    cells = []
    for r in rows:
        paper = "" if r["paper_top1"] is None else f"{r['paper_top1']:.4f}"
        if not r["n"]:
            cells.append([r["row"], "", "", "no completed run", "0", paper, ""])
            continue
        std = "" if math.isnan(r["top1_std"]) else f" ± {r['top1_std']:.4f}"
        diff = "" if r["difference"] is None else f"{r['difference']:+.4f}"
        cells.append([r["row"], f"{r['params']:,}", _minutes(r["train_seconds"]),
                      f"{r['top1_mean']:.4f}{std}", str(r["n"]), paper, diff])
    return cells + [[lit["row"], "", "", "", "", f"{lit['top1']:.4f}", ""]
                    for lit in PAPER["literature"]]


def write_tables(rows: list[dict], out: Path, quick: bool, dataset: str) -> None:
    note = f"{QUICK_NOTE} " if quick else ""
    note += f"Measured on {dataset}; the paper's column is CIFAR-100."
    columns = ["experiment", "row", "params", "epochs", "train_seconds", "top1_mean", "top1_std",
               "n", "paper_top1", "difference"]
    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + ["profile"], extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "profile": "quick" if quick else "paper"})
        for lit in PAPER["literature"]:
            writer.writerow({"row": lit["row"], "paper_top1": lit["top1"], "profile": "literature"})

    epochs = next(r["epochs"] for r in rows if r["n"])
    head = ["Method", "Total parameters", f"Training time ({epochs} epochs, mean)",
            "Top-1 (mean ± sd)", "n", "Paper top-1", "Difference"]
    body = table_cells(rows)
    md = [f"*{note}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(line) + " |" for line in body]
    (out / "table1.md").write_text("\n".join(md) + "\n")

    def tex(s: str) -> str:
        return s.replace("±", r"$\pm$").replace("%", r"\%").replace("_", r"\_")

    lines = [r"% " + note, r"\begin{tabular}{lrrrrrr}", r"\hline",
             " & ".join(tex(h) for h in head) + r" \\", r"\hline"]
    lines += [" & ".join(tex(c) for c in line) + r" \\" for line in body]
    lines += [r"\hline", r"\end{tabular}"]
    (out / "table1.tex").write_text("\n".join(lines) + "\n")


# --- statistics -------------------------------------------------------------------------------

def compare_with_base(results: dict[str, list[Run]]) -> list[dict]:
    """Welch's t-test and 95% CI for each modification's mean top-1 minus the base model's."""
    if BASE_EXPERIMENT not in results:
        return []
    base = np.array([r.summary["test_top1"] for r in results[BASE_EXPERIMENT]])
    out = []
    for name, runs in results.items():
        if name == BASE_EXPERIMENT:
            continue
        x = np.array([r.summary["test_top1"] for r in runs])
        diff = float(x.mean() - base.mean())
        row = {"experiment": name, "difference": diff, "n": len(x), "n_base": len(base),
               "method": "Welch t-test", "ci_low": None, "ci_high": None, "p_value": None}
        if len(x) < 2 or len(base) < 2:
            row["method"] = "none (needs 2+ seeds each)"
            row["sentence"] = (f"{name}: {diff * 100:+.2f} points; too few seeds to tell it "
                               "from seed noise.")
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
        row["sentence"] = (f"{name}: {diff * 100:+.2f} points against the base model "
                           f"(95% CI {row['ci_low'] * 100:+.2f} to {row['ci_high'] * 100:+.2f}, "
                           f"p = {p:.3g}, n = {len(x)} vs {len(base)}): {verdict}.")
        out.append(row)
    return out


# --- figures ----------------------------------------------------------------------------------

def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    (out / f"{name}.png").write_bytes(buf.getvalue())
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def curves_figure(results: dict[str, list[Run]], names: list[str], title: str, quick: bool):
    """Train and validation loss, and top-1, per epoch: mean over seeds, min-max band."""
    panels = [("train_loss", "training loss"), ("test_loss", "validation loss"),
              ("test_top1", "top-1 accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in names:
        runs = results.get(name)
        if not runs:
            continue
        for ax, (key, _) in zip(axes, panels, strict=True):
            epochs = min(len(r.metrics[key]) for r in runs)
            values = np.stack([r.metrics[key][:epochs] for r in runs])
            x = np.arange(1, epochs + 1)
            line, = ax.plot(x, values.mean(0), label=f"{name} (n={len(runs)})")
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
    axes[0].legend(fontsize=8)
    fig.suptitle(title + (" [QUICK profile]" if quick else ""))
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


# --- per class --------------------------------------------------------------------------------

def per_class(runs: list[Run], images: ImageSet) -> dict[str, np.ndarray] | None:
    """Per-class and per-group accuracy averaged over seeds, and the group confusion matrix.

    Groups are CIFAR-100's superclasses when the data has them, else the classes themselves.
    """
    preds = [np.load(r.dir / "predictions.npz") for r in runs
             if (r.dir / "predictions.npz").is_file()]
    if not preds:
        return None
    labels = preds[0]["labels"]
    if images.superclasses is not None:
        fine_to_group = np.zeros(len(images.classes), dtype=np.int64)
        fine_to_group[images.train_labels] = images.train_coarse
        groups = images.superclasses
    else:
        fine_to_group, groups = np.arange(len(images.classes)), images.classes
    n_cls, n_grp = len(images.classes), len(groups)
    class_acc = np.zeros(n_cls)
    group_acc = np.zeros(n_grp)
    confusion = np.zeros((n_grp, n_grp))
    for p in preds:
        predicted = p["predicted"]
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


# --- the report -------------------------------------------------------------------------------

def report(root: Path) -> Path:
    """Write `root/report/` and return the path of its index.html."""
    results = collect(root)
    out = root / "report"
    out.mkdir(exist_ok=True)
    first = next(iter(results.values()))[0].experiment
    quick = any(r.experiment.profile == "quick" for runs in results.values() for r in runs)
    images = load_images(first.data.data, progress=False)

    profile = "quick" if quick else "paper"  # a column of every CSV, so no row loses it
    without_result = unfinished(root)
    rows = table_rows(results, without_result)
    write_tables(rows, out, quick, images.name)
    comparisons = compare_with_base(results)
    with open(out / "statistics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["experiment", "difference", "ci_low", "ci_high",
                                               "p_value", "n", "n_base", "method", "sentence",
                                               "profile"])
        writer.writeheader()
        writer.writerows({**c, "profile": profile} for c in comparisons)

    figures: list[tuple[str, str, str]] = []  # (name, caption, base64 png)
    if images.superclasses is not None:
        figures.append(("figure2", "Figure 2: the first image of the first 10 superclasses.",
                        _save(figure2(images), out, "figure2")))
        figure2_note = ""
    else:
        figure2_note = (f"Figure 2 needs CIFAR-100's superclasses; {images.name} has none, "
                        "so it was not drawn.")
    figures.append(("figure3", "Figure 3: one augmented training mini-batch.",
                    _save(figure3(images, first.data.padding_mode), out, "figure3")))
    for fig_id, (title, names) in FIGURES.items():
        if any(n in results for n in names):
            caption = f"Figure {fig_id[-1]}: {title} (mean over seeds; band: min to max)."
            missing = [n for n in names if n not in results]
            if missing:
                caption += f" Not drawn, no completed run: {', '.join(missing)}."
            figures.append((fig_id, caption, _save(curves_figure(results, names, title, quick),
                                                   out, fig_id)))

    best = max((r for r in rows if r["n"]), key=lambda r: r["top1_mean"])["experiment"]
    classes = {name: per_class(results[name], images)
               for name in dict.fromkeys([BASE_EXPERIMENT, best]) if name in results}
    classes = {k: v for k, v in classes.items() if v is not None}
    group_word = "superclass" if images.superclasses is not None else "class"
    if classes:
        _write_per_class(classes, images, out, group_word, profile)
        name, pc = list(classes.items())[-1]
        figures.append(("confusion", f"Confusion between {group_word}es, {name} "
                        "(rows: true, normalised).",
                        _save(confusion_figure(pc["confusion"], pc["groups"],
                                               f"{name}: {group_word} confusion"
                                               + (" [QUICK profile]" if quick else "")),
                              out, "confusion")))

    index = out / "index.html"
    index.write_text(_html(rows, comparisons, figures, classes, quick, images.name, root,
                           figure2_note, group_word, without_result))
    return index


def _write_per_class(classes: dict, images: ImageSet, out: Path, group_word: str,
                     profile: str) -> None:
    names = list(classes)
    tables = [("class", images.classes, "class")]
    if group_word == "superclass":
        tables.append(("superclass", images.superclasses, "group"))
    for label, keys, field in tables:
        with open(out / f"per_{label}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([label, *names, "profile"])
            for i, key in enumerate(keys):
                w.writerow([key, *(f"{classes[n][field][i]:.4f}" for n in names), profile])


def _html(rows, comparisons, figures, classes, quick, dataset, root, figure2_note,
          group_word, without_result) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>resnet-study report: "
             f"{e(str(root))}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             ".quick{background:#fde2e2;border:2px solid #c00;padding:1em;font-weight:bold}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Improved ResNet-18 study: re-measured</h1><p>Study <code>{e(str(root))}</code>, "
             f"data <b>{e(dataset)}</b>. The paper's accuracies are CIFAR-100, one run each.</p>"]
    if quick:
        parts.append(f"<p class='quick'>{e(QUICK_NOTE)}</p>")
    head = ["Method", "Parameters", "Time (mean)", "Top-1 mean ± sd", "n", "Paper", "Difference"]
    parts.append("<h2>Table 1</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>"
              for line in table_cells(rows)]
    parts.append("</table>")
    if without_result:
        parts.append("<h2>Runs without a result</h2><p>Left out of the table, the statistics "
                     "and the figures.</p><table><tr><th>run</th><th>status</th>"
                     "<th style='text-align:left'>reason</th></tr>")
        parts += [f"<tr><td>{e(u['run'])}</td><td>{e(u['status'])}</td>"
                  f"<td style='text-align:left'>{e(u['reason'])}</td></tr>"
                  for u in without_result]
        parts.append("</table>")
    if comparisons:
        parts.append("<h2>Against the base model</h2><p>Difference in mean top-1, 95% "
                     "confidence interval and p-value from Welch's t-test over seeds.</p><ul>")
        parts += [f"<li>{e(c['sentence'])}</li>" for c in comparisons]
        parts.append("</ul>")
    parts.append("<h2>Figures</h2>")
    if figure2_note:
        parts.append(f"<p><i>{e(figure2_note)}</i></p>")
    for _, caption, png in figures:
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    if classes:
        names = list(classes)
        groups = next(iter(classes.values()))["groups"]
        parts.append(f"<h2>Per-{group_word} test accuracy</h2><table><tr><th>{group_word}</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for i, g in enumerate(groups):
            parts.append(f"<tr><td>{e(g)}</td>" + "".join(
                f"<td>{classes[n]['group'][i]:.3f}</td>" for n in names) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
