"""A report is written whatever text the runs' files hold, and written whole or not at all.

Run folders are copied and edited by hand: an experiment's name, its row label, its settings,
the data set's class folders may hold any characters. The report shows them as text in every
output (never as HTML, Markdown, LaTeX or matplotlib mathtext), writes each file through a
temporary one (a link at its name is replaced, never written through), and a full disk costs
one line and leaves the files it could not write as they were.
"""

import errno
import html
import json
import os
import random
import re
import shutil
import string
from pathlib import Path

import pytest

from resnet_study.cli import main
from resnet_study.report.escape import markdown_escape, tex_escape
from resnet_study.report.writer import report
from resnet_study.study import plan, run_study

from .helpers import presets, write_class_folders

HOSTILE = [r"$\frac{a}$", "<script>alert(1)</script>", r"\input{/etc/passwd} & # $ % _ ^ ~ { }",
           "| pipe *star* [link](x)"]
CLASSES = [r"$\frac{a}$", "| pipe *star* [link](x)", r"& # $ % _ ^ ~ { } \x", "<b>bold"]
BASE = "resnet18-lr0.01"
SETTING = "<i>$x$</i> & [a](b)"  # a recorded override: shown in the legends and Settings cells


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A run of the base model on class folders with hostile names, and one run per hostile
    name (a copy of the base run under that name, row label and notes), the first of them the
    best, so that its name titles the confusion figure, and the only one with a checkpoint, so
    that the report inspects it (and no other: an inspection takes seconds)."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data $x$ & <u>"
    write_class_folders(data, {name: (20, 4) for name in CLASSES})
    study = root / "study"
    runs = plan(presets([BASE]), 1, study, {"data": str(data), "batch_size": 32,
                                            "eval_batch_size": 64, "epochs": 1}, quick=False)
    run_study(runs, log=lambda msg: None)
    base = study / BASE / "seed-0"
    d = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**d, "overrides": {**d["overrides"],
                                                                     "note": SETTING}}))
    for i, name in enumerate(HOSTILE):
        run = study / f"hostile-{i}" / "seed-0"
        shutil.copytree(base, run, ignore=shutil.ignore_patterns("checkpoint.pt") if i else None)
        d = json.loads((run / "config.json").read_text())
        d.update(name=name, row=HOSTILE[(i + 1) % 4], notes=HOSTILE[(i + 2) % 4])
        (run / "config.json").write_text(json.dumps(d))
        if i == 0:
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "test_top1": 0.99}))
    (base / "checkpoint.pt").unlink()
    return study


@pytest.fixture(scope="module")
def reported(study):
    """The report of the study, through the command line, with every run inspected."""
    assert main(["report", str(study)]) == 0
    return study / "report"


@pytest.fixture(scope="module")
def small(study, tmp_path_factory):
    """The study without checkpoints (nothing to inspect; quick to copy), reported once."""
    small = tmp_path_factory.mktemp("small") / "study"
    shutil.copytree(study, small, ignore=shutil.ignore_patterns("checkpoint.pt", "inspect",
                                                                "report"))
    report(small, inspect=False)
    return small


def svg_texts(path: Path) -> list[str]:
    """The texts an SVG's figure drew: matplotlib writes each beside its glyphs as a comment."""
    return [html.unescape(t) for t in re.findall(r"<!-- (.*?) -->", path.read_text())]


def test_hostile_text_is_text_on_the_page_and_drawn_as_written(reported):
    page = (reported / "index.html").read_text()
    assert "<script>" not in page and "<b>bold" not in page and "<i>$x$" not in page
    text = html.unescape(page)
    for name in HOSTILE:
        assert html.escape(name) in page
    assert f"{HOSTILE[0]} (n = 1): output variance" in text  # inspected
    left_out = re.findall(r"not inspected: ([^<]*)", text)  # a failed figure would be named
    assert left_out == ["no checkpoint"] * 4
    for name in ("confusion", "figure3", "figure5", "figure9", "activations"):
        assert (reported / f"{name}.png").stat().st_size and (reported / f"{name}.svg").is_file()
    confusion = svg_texts(reported / "confusion.svg")
    assert f"{HOSTILE[0]}: class confusion [custom settings, not the paper's protocol]" in (
        confusion)
    assert set(CLASSES) <= set(confusion)  # the tick labels
    assert any(SETTING in t for t in svg_texts(reported / "figure5.svg"))  # the legend
    assert HOSTILE[0] in svg_texts(reported / "activations.svg")  # the legend
    inspected = svg_texts(reported.parent / "hostile-0" / "seed-0" / "inspect" / "embedding.svg")
    assert set(CLASSES) <= set(inspected)


def test_markdown_cells_show_the_names_as_written(reported):
    markdown = pytest.importorskip("markdown", reason="Python-Markdown comes with tensorboard")
    md = (reported / "table1.md").read_text()
    for name in HOSTILE:
        assert f"| {markdown_escape(name)} |" in md
    rendered = markdown.markdown(md, extensions=["tables"])
    assert set(re.findall(r"</?(\w+)", rendered)) == {"p", "em", "table", "thead", "tbody", "tr",
                                                      "th", "td"}
    assert rendered.count("<em>") == 1  # the table's note, and only it
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", rendered)]
    assert set(HOSTILE) <= set(cells)
    assert any(c.endswith(f"note={SETTING}") for c in cells)
    assert "Measured on data $x$ & <u>;" in html.unescape(rendered)


def test_latex_cells_hold_no_live_special_character(reported):
    tex = (reported / "table1.tex").read_text().splitlines()
    assert tex[0].startswith("% ") and "data $x$ & <u>" in tex[0]  # a comment, to its end
    rows = [line.removesuffix(r" \\").split(" & ") for line in tex if line.endswith(r" \\")]
    assert all(len(cells) == 8 for cells in rows)  # no & but the cells' own
    for cells in rows:
        for cell in cells:
            assert live_tex(cell) == ""
    names = {from_tex(cells[0]) for cells in rows}
    assert set(HOSTILE) <= names


TEX = {r"\textbackslash{}": "\\", r"\{": "{", r"\}": "}", r"\$": "$", r"\&": "&", r"\#": "#",
       r"\textasciicircum{}": "^", r"\_": "_", r"\textasciitilde{}": "~", r"\%": "%",
       r"\textless{}": "<", r"\textgreater{}": ">", r"\textbar{}": "|", r"$\pm$": "±"}
TEX_TOKEN = re.compile(r"^\{\}|" + "|".join(re.escape(t) for t in TEX))


def from_tex(cell: str) -> str:
    return TEX_TOKEN.sub(lambda m: TEX.get(m[0], ""), cell)


def live_tex(cell: str) -> str:
    """What of `cell` LaTeX would read as markup: its special characters outside the escapes,
    its control characters, and a leading [ or * (an argument of the row end before it)."""
    rest = TEX_TOKEN.sub(" ", cell)
    live = "".join(c for c in rest if c in "\\{}$&#^_~%<>|" or ord(c) < 32 or ord(c) == 127)
    return live + ("[*" if cell.lstrip(" ").startswith(("[", "*")) else "")


def strings() -> list[str]:
    """The hostile names, each ASCII character alone and all of them, and random strings of
    special characters, letters and line breaks."""
    rng = random.Random(0)
    alphabet = string.printable + "±\x00\x7f\u2028"
    return [*HOSTILE, *CLASSES, *string.printable, string.printable, "\n\n", " [x]", "*x",
            "__init__", "a_b_c", "[x](y)", "&lt;", r"\$", "~~x~~", "`x`",
            *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
              for _ in range(2000))]


def flat(text: str) -> str:
    """`text` on one line, as the tables show it."""
    return "".join(" " if ord(c) < 32 or c in "\x7f\x85\u2028\u2029" else c for c in text)


def test_tex_escape_leaves_no_special_character_live_and_loses_nothing():
    for s in strings():
        out = tex_escape(s)
        assert live_tex(out) == "", (s, out)
        assert from_tex(out) == flat(s), (s, out)
    assert tex_escape(r"custom: epochs=2, batch_size=64") == r"custom: epochs=2, batch\_size=64"
    assert tex_escape("0.6 ± 0.1 [18]") == r"0.6 $\pm$ 0.1 [18]"


def live_markdown(cell: str) -> list[str]:
    """What of `cell` Markdown would read as markup: a character of HTML, code, emphasis,
    strike-through, a cell break or a line break outside an escape or entity, a _ that is not
    between two letters or digits, and a ] before ( (a link)."""
    tokens = ["", *re.findall(r"\\.|&(?:amp|lt|gt|#126);|.", cell, re.DOTALL), ""]
    return [t for before, t, after in zip(tokens, tokens[1:], tokens[2:], strict=False)
            if t in tuple("\\|`*~<>&\n\r") or (t == "]" and after == "(")
            or (t == "_" and not (len(before + after) == 2 and (before + after).isalnum()))]


def test_markdown_escape_leaves_no_markup_live_and_loses_nothing():
    for s in strings():
        out = markdown_escape(s)
        assert live_markdown(out) == [], (s, out)
        assert html.unescape(re.sub(r"\\(.)", r"\1", out)) == flat(s), (s, out)
    for ordinary in ("custom: epochs=2, batch_size=64", "Wide Residual Network-16 (k = 8) [18]",
                     "ResNet-18 w/o BN", "Top-1 (mean ± sd)"):
        assert markdown_escape(ordinary) == ordinary


def test_a_link_at_a_report_file_is_replaced_not_written_through(small, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(small, study)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the report's")
    names = ["index.html", "table1.csv", "table1.md", "statistics.csv", "figure5.svg",
             "figure5.png", "per_class.csv"]
    for name in names:
        (study / "report" / name).unlink()
        (study / "report" / name).symlink_to(outside)
    (study / "report" / "table1.tex").unlink()
    (study / "report" / "table1.tex").symlink_to(tmp_path / "nowhere.tex")  # dangling
    report(study, inspect=False)
    assert outside.read_bytes() == b"not the report's" and not (tmp_path / "nowhere.tex").exists()
    for name in [*names, "table1.tex"]:
        path = study / "report" / name
        assert not path.is_symlink() and path.is_file()
        assert path.read_bytes() == (small / "report" / name).read_bytes() or name == "index.html"
    assert (study / "report" / "index.html").read_text().startswith("<!doctype html>")


@pytest.mark.parametrize("full_at", ["statistics.csv", "figure5.svg", "index.html"])
def test_a_full_disk_costs_one_line_and_leaves_each_file_whole(small, tmp_path, monkeypatch,
                                                               capsys, full_at):
    """The disk fills while `full_at` is written (simulated at its rename, where a write's
    ENOSPC would have stopped it too): every file is then either the last report's, untouched,
    or the new report's, whole; `full_at` and the page are the last report's."""
    study = tmp_path / "study"
    shutil.copytree(small, study)
    out = study / "report"
    new = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in new:
        (out / name).write_bytes(f"last report's {name}".encode())
    replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == full_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    capsys.readouterr()
    assert main(["report", str(study), "--no-inspect"]) == 1
    stdout, stderr = capsys.readouterr()
    assert "report written" not in stdout
    assert len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("resnet-study: error: [Errno 28] No space left on device")
    assert sorted(p.name for p in out.iterdir()) == sorted(new)  # no temporary file left
    last = {name: f"last report's {name}".encode() for name in new}
    for name in new:
        assert (out / name).read_bytes() in (last[name], new[name]), name
    assert (out / full_at).read_bytes() == last[full_at]
    assert (out / "index.html").read_bytes() == last["index.html"]
