"""The report's page: one self-contained HTML file (figures embedded), for any browser."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from ..plots import Figure
from .inside import Inside

QUICK_NOTE = ("QUICK profile: few epochs on a subset. A smoke test of the pipeline, "
              "not the paper's protocol; do not compare with the paper's numbers.")
CUSTOM_NOTE = ("Rows whose settings are not 'paper' ran with settings other than their "
               "experiment's preset (named in the Settings column): not the paper's protocol, "
               "so no difference from the paper's number is given for them.")


def _figure(caption: str, png: str) -> str:
    e = html.escape
    return (f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{e(caption)}</figcaption></figure>")


@dataclass
class Page:
    """What the report's page shows, as `writer.report` computed it."""

    root: Path  # the study
    dataset: str
    rows: list[dict]  # Table 1's rows (`writer.table_rows`)
    head: list[str]  # and as text
    cells: list[list[str]]
    comparisons: list[dict]  # each experiment against the base model
    figures: list[Figure]
    notes: list[str]  # figures not drawn, and why
    classes: dict[str, dict]  # per-class results by experiment
    group_word: str  # superclass or class
    without_result: list[dict]  # runs left out, with their reasons
    inside: Inside


def render(p: Page) -> str:
    """The report's page as one HTML document."""
    e = html.escape
    rows, head, cells, comparisons, figures = p.rows, p.head, p.cells, p.comparisons, p.figures
    classes, dataset, root, notes, group_word = p.classes, p.dataset, p.root, p.notes, p.group_word
    without_result, inside = p.without_result, p.inside
    profiles = {r["profile"] for r in rows}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>resnet-study report: "
             f"{e(str(root))}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             ".quick{background:#fde2e2;border:2px solid #c00;padding:1em;font-weight:bold}"
             ".failed{background:#fff4d6;border:2px solid #c90;padding:1em}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Improved ResNet-18 study: re-measured</h1><p>Study <code>{e(str(root))}</code>, "
             f"data <b>{e(dataset)}</b>. The paper's accuracies are CIFAR-100, one run each.</p>"]
    if "quick" in profiles:
        parts.append(f"<p class='quick'>{e(QUICK_NOTE)}</p>")
    if "custom" in profiles:
        parts.append(f"<p class='quick'>{e(CUSTOM_NOTE)}</p>")
    if not any(r["n"] for r in rows):
        parts.append("<p class='failed'>No run of this study has completed: the runs below "
                     "say why.</p>")
    parts.append("<h2>Table 1</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>" for line in cells]
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
    if figures or notes:
        parts.append("<h2>Figures</h2>")
    parts += [f"<p><i>{e(note)}</i></p>" for note in notes]
    parts += [_figure(f.caption, f.png) for f in figures]
    if inside.sentences or inside.notes:
        parts.append("<h2>Inside the models</h2><p>Each run's checkpoint inspected "
                     "(<code>resnet-study inspect</code>, files in its <code>inspect/</code> "
                     "folder) on its test images: per residual block, the variance of its "
                     "output, the share of ReLUs between its convs that never fire, and the "
                     "norm of its residual branch against its shortcut's.</p><ul>")
        parts += [f"<li>{e(s)}</li>" for s in inside.sentences]
        parts.append("</ul>")
        parts += [f"<p><i>{e(note)}</i></p>" for note in inside.notes]
        parts += [_figure(f.caption, f.png) for f in inside.figures]
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
