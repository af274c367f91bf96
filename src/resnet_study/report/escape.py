"""Text for table1.tex and table1.md. Names, row labels and settings come from the runs'
config.json files, which travel and are edited by hand: in both tables they are text,
whatever characters they hold."""

from __future__ import annotations

import re

_LINE_BREAKS_AND_CONTROLS = {c: " " for c in (*range(32), 127, 0x85, 0x2028, 0x2029)}
_TEX = str.maketrans({"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&",
                      "#": r"\#", "^": r"\textasciicircum{}", "_": r"\_", "~": r"\textasciitilde{}",
                      "%": r"\%", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
                      "±": r"$\pm$", **_LINE_BREAKS_AND_CONTROLS})


def tex_escape(text: str) -> str:
    """`text` as LaTeX typesets it, in any font encoding: each special character as its command
    (<, > and | too, which OT1 fonts hold other glyphs for), a line break or control character
    (a blank line ends a tabular's row, a control character stops pdflatex) as a space, and a
    leading [ or * behind {}, where the row end before it (\\\\) would take it as its argument.
    Other characters are kept as written, in UTF-8, which LaTeX reads by default."""
    out = text.translate(_TEX)
    return "{}" + out if out.lstrip(" ").startswith(("[", "*")) else out


_MARKDOWN = re.compile(r"[\\|`*]|\](?=\()|(?<![^\W_])_|_(?![^\W_])")
_MARKDOWN_ENTITIES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "~": "&#126;",
                                    **_LINE_BREAKS_AND_CONTROLS})


def markdown_escape(text: str) -> str:
    """`text` as a Markdown table cell shows it: no HTML (<, > and & as entities), no cell
    break (|), no code, emphasis, strike-through (~, an entity: Python-Markdown does not take
    its backslash escape) or link, no new line. A Markdown character is escaped where it can
    act: _ between two letters or digits is no emphasis, and a bracket makes a link only as
    [text](...), the table having no line that could define a reference, so citations like
    "[18]" stay as they were written."""
    return _MARKDOWN.sub(lambda m: "\\" + m[0], text.translate(_MARKDOWN_ENTITIES))
