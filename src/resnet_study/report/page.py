"""The report's page: one self-contained HTML file (figures embedded), for any browser."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from ..config import BASE_EXPERIMENT
from ..labels import protocol_notes
from ..plots import Figure
from .inside import Inside


def figure_html(caption: str, png: str) -> str:
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
    comparisons: list[dict]  # each experiment against the base model (or report --base)
    figures: list[Figure]
    notes: list[str]  # figures not drawn, and why
    classes: dict[str, dict]  # per-class results by experiment
    group_word: str  # superclass or class
    without_result: list[dict]  # runs left out, with their reasons
    inside: Inside


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;"
         "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         ".quick{background:#fde2e2;border:2px solid #c00;padding:1em;font-weight:bold}"
         ".failed{background:#fff4d6;border:2px solid #c90;padding:1em}"
         "img{max-width:100%}")


def render(p: Page) -> str:
    """The report's page as one HTML document, in the order a reader checks a study: what it
    measured (Table 1, the runs left out, the statistics), then why (figures, inside the
    models, per class)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>resnet-study report: "
             f"{e(str(p.root))}</title><style>{STYLE}</style></head><body>",
             f"<h1>Improved ResNet-18 study: re-measured</h1><p>Study <code>{e(str(p.root))}"
             f"</code>, data <b>{e(p.dataset)}</b>. The paper's accuracies are CIFAR-100, one "
             "run each.</p>"]
    parts += [f"<p class='quick'>{e(note)}</p>"
              for note in protocol_notes(r["profile"] for r in p.rows)]
    if not any(r["n"] for r in p.rows):
        parts.append("<p class='failed'>No run of this study has completed: the runs below "
                     "say why.</p>")
    parts += _measured(p) + _figures(p) + _inside(p.inside) + _per_class(p)
    parts.append("</body></html>")
    return "\n".join(parts)


def _measured(p: Page) -> list[str]:
    e = html.escape
    parts = ["<h2>Table 1</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in p.head)
             + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>" for line in p.cells]
    parts.append("</table>")
    if p.without_result:
        parts.append("<h2>Runs without a result</h2><p>Left out of the table, the statistics "
                     "and the figures.</p><table><tr><th>run</th><th>status</th>"
                     "<th style='text-align:left'>reason</th></tr>")
        parts += [f"<tr><td>{e(u['run'])}</td><td>{e(u['status'])}</td>"
                  f"<td style='text-align:left'>{e(u['reason'])}</td></tr>"
                  for u in p.without_result]
        parts.append("</table>")
    if p.comparisons:
        against = p.comparisons[0]["against"]
        whom = "the base model" if against == BASE_EXPERIMENT else e(against)
        parts.append(f"<h2>Against {whom}</h2><p>Difference in mean top-1, 95% "
                     "confidence interval and p-value from Welch's t-test over seeds.</p><ul>")
        parts += [f"<li>{e(c['sentence'])}</li>" for c in p.comparisons]
        parts.append("</ul>")
    return parts


def _figures(p: Page) -> list[str]:
    parts = ["<h2>Figures</h2>"] if p.figures or p.notes else []
    parts += [f"<p><i>{html.escape(note)}</i></p>" for note in p.notes]
    return parts + [figure_html(f.caption, f.png) for f in p.figures]


def _inside(inside: Inside) -> list[str]:
    if not (inside.sentences or inside.notes):
        return []
    e = html.escape
    parts = ["<h2>Inside the models</h2><p>Each run's checkpoint inspected "
             "(<code>resnet-study inspect</code>, files in its <code>inspect/</code> "
             "folder) on its test images: per residual block, the variance of its "
             "output, the share of ReLUs between its convs that never fire, and the "
             "norm of its residual branch against its shortcut's.</p><ul>"]
    parts += [f"<li>{e(s)}</li>" for s in inside.sentences]
    parts.append("</ul>")
    parts += [f"<p><i>{e(note)}</i></p>" for note in inside.notes]
    return parts + [figure_html(f.caption, f.png) for f in inside.figures]


def _per_class(p: Page) -> list[str]:
    if not p.classes:
        return []
    e = html.escape
    names = list(p.classes)
    groups = next(iter(p.classes.values()))["groups"]
    parts = [f"<h2>Per-{p.group_word} test accuracy</h2><table><tr><th>{p.group_word}</th>"
             + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    for i, g in enumerate(groups):
        parts.append(f"<tr><td>{e(g)}</td>" + "".join(
            f"<td>{p.classes[n]['group'][i]:.3f}</td>" for n in names) + "</tr>")
    parts.append("</table>")
    return parts
