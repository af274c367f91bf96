"""Issue 33: every command the README and docs/ show parses as the command line would take
it (the subcommand and every flag exist), and the links between the pages lead somewhere."""

import re
import shlex
from pathlib import Path

import pytest

from resnet_study.flags import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """Each `resnet-study ...` command of the page's shell blocks (continued lines joined,
    comments dropped, chains split) and of its inline code."""
    text = page.read_text()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
            found += [part.strip() for part in re.split(r"&&|;|\|", line)]
    found += re.findall(r"`(resnet-study [^`]+)`", text)
    out = []
    for command in found:
        if "-m resnet_study " in command:  # torchrun ... -m resnet_study ARGS
            command = "resnet-study " + command.split("-m resnet_study ", 1)[1]
        if command.startswith("resnet-study "):
            out.append(command)
    return out


CASES = [(page.relative_to(ROOT), command) for page in PAGES for command in commands(page)]


@pytest.mark.parametrize("page, command", CASES, ids=[f"{p}: {c[:60]}" for p, c in CASES])
def test_every_command_in_the_documentation_parses(page, command):
    parser = build_parser()
    try:
        parser.parse_args(shlex.split(command)[1:])
    except SystemExit as e:  # --help exits 0; anything else is a command that does not parse
        assert e.code == 0, f"{page}: {command}"


def test_the_pages_are_all_linked_and_every_link_leads_somewhere():
    assert len(CASES) > 50  # the pages show commands, and this test reads them
    linked = set()
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links {target}, which is not there"
            linked.add(path)
    assert {p.resolve() for p in PAGES[1:]} <= linked  # README reaches every page of docs/


def test_the_first_look_runs_and_leaves_the_page_it_names(tmp_path, monkeypatch):
    """The README's first look, its epochs and images swapped for TINY's (on synthetic data: no
    download in the tests), ends in the report page it tells the reader to open. Not --quick's
    sizes: 3 epochs on 1,000 images made this a minute of the suite, and sizes are not what is
    tested here."""
    from resnet_study.cli import main

    section = (ROOT / "README.md").read_text().split("## A first look", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    study, report = [shlex.split(line, comments=True) for line in block.splitlines()]
    assert study[:2] == ["resnet-study", "study"] and report[:2] == ["resnet-study", "report"]
    sized = [arg for i, arg in enumerate(study[1:], 1)
             if arg not in SIZE_FLAGS and study[i - 1] not in SIZE_FLAGS]
    monkeypatch.chdir(tmp_path)
    assert main([*sized, *TINY, "--data", "synthetic"]) == 0
    assert main(report[1:]) == 0
    page = re.search(r"open (\S+\.html)", block).group(1)
    assert (tmp_path / page).stat().st_size > 10_000


SIZE_FLAGS = {"--epochs", "--subset", "--test-subset"}  # what TINY sets in their place
TINY = ["--epochs", "1", "--subset", "256", "--test-subset", "256"]
