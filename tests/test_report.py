import csv
import dataclasses
import html
import json
import re
import shutil
import subprocess
from types import MappingProxyType

import numpy as np
import pytest
from scipy import stats

from resnet_study import EXPERIMENTS as PRESETS
from resnet_study import UsageError
from resnet_study.catalogue import Catalogue
from resnet_study.cli import main
from resnet_study.config import PAPER
from resnet_study.files import write_csv
from resnet_study.labels import PROTOCOL_NOTES
from resnet_study.report.figures import curves_figure
from resnet_study.report.runs import scan
from resnet_study.report.writer import report
from resnet_study.study import plan, run_study

from .helpers import DAMAGES, batch, damage, presets, write_cifar100

EXPERIMENTS = ["resnet18-lr0.01", "resnet18-adam", "resnet18-no-bn"]
SETTINGS = dict(batch_size=64, eval_batch_size=200, epochs=2)


def cifar100_fixture(root):
    """A CIFAR-100 file set in the official layout, 200 training images, fine -> coarse as in
    the real data (every fine class belongs to one superclass)."""
    rng = np.random.default_rng(5)
    fine = rng.integers(0, 100, 200)
    write_cifar100(root, train=batch(rng, 200, {b"fine_labels": fine.tolist(),
                                                b"coarse_labels": (fine // 5).tolist()}))
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = str(cifar100_fixture(root / "data"))
    out = {}
    for quick in (False, True):  # the quick one's marks alone are tested: one run, not inspected
        study = root / ("quick" if quick else "paper")
        names = EXPERIMENTS[:1] if quick else EXPERIMENTS
        runs = plan(presets(names), 1 if quick else 2, study, {**SETTINGS, "data": data},
                    quick=quick)
        run_study(runs, log=lambda msg: None)
        report(study, inspect=not quick)
        out[quick] = study
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_writes_every_file(studies):
    names = {p.name for p in (studies[False] / "report").iterdir()}
    expected = {"table1.md", "table1.csv", "table1.tex", "statistics.csv", "index.html",
                "per_class.csv", "per_superclass.csv"}
    expected |= {f"{f}.{ext}" for f in ("figure2", "figure3", "figure5", "figure6", "figure7",
                                        "figure8", "figure9", "confusion", "activations")
                 for ext in ("png", "svg")}
    assert expected | {"activations.csv"} <= names
    assert not {"literature.png", "literature-published.png"} & names  # no literature runs


def test_every_run_with_a_checkpoint_is_inspected_and_compared(studies, tmp_path):
    """Inside the models: each completed run inspected once (its own inspect/ folder; pictures
    only for the runs on the page), the experiments' statistics averaged over seeds against the
    base model, the base model's picture grids on the page; a second report reuses the
    inspections."""
    pictured = []
    for name in EXPERIMENTS:
        for seed in (0, 1):
            folder = studies[False] / name / f"seed-{seed}" / "inspect"
            assert (folder / "activations.csv").exists()
            if (folder / "cam_correct.png").exists():
                pictured.append(f"{name}/seed-{seed}")
    # pictures only where the page shows them: the base model's and the best model's first run
    assert pictured[0] == "resnet18-lr0.01/seed-0" and len(pictured) <= 2
    assert all(p.endswith("seed-0") for p in pictured)
    rows = read_csv(studies[False] / "report" / "activations.csv")
    assert {r["experiment"] for r in rows} == set(EXPERIMENTS)
    assert all(r["n"] == "2" for r in rows) and len(rows) == 8 * len(EXPERIMENTS)
    per_run = [read_csv(studies[False] / "resnet18-no-bn" / f"seed-{s}" / "inspect" /
                        "activations.csv") for s in (0, 1)]
    mine = [r for r in rows if r["experiment"] == "resnet18-no-bn"]
    for i, row in enumerate(mine):
        assert float(row["variance"]) == pytest.approx(
            (float(per_run[0][i]["variance"]) + float(per_run[1][i]["variance"])) / 2)
    page = html.unescape((studies[False] / "report" / "index.html").read_text())
    assert "<h2>Inside the models</h2>" in page
    assert "resnet18-no-bn (n = 2): output variance " in page and "; the base model: " in page
    assert "Base model, resnet18-lr0.01 (seed-0): cam correct." in page
    stamp = (studies[False] / "resnet18-lr0.01" / "seed-0" / "inspect" / "summary.json")
    before = stamp.stat().st_mtime
    lines = []
    study = tmp_path / "again"
    shutil.copytree(studies[False], study)
    report(study, log=lines.append)
    assert not lines and (study / "resnet18-lr0.01" / "seed-0" / "inspect" / "summary.json"
                          ).stat().st_mtime == before
    report(study, inspect=False)
    assert "Not inspected (report --no-inspect)." in (study / "report" / "index.html").read_text()


def test_table1_matches_the_runs_and_the_paper(studies):
    rows = {r["experiment"]: r for r in read_csv(studies[False] / "report" / "table1.csv")}
    for name in EXPERIMENTS:
        tops = [json.loads((studies[False] / name / f"seed-{s}" / "summary.json").read_text())
                ["test_top1"] for s in range(2)]
        assert float(rows[name]["top1_mean"]) == pytest.approx(np.mean(tops))
        assert float(rows[name]["top1_std"]) == pytest.approx(np.std(tops, ddof=1))
        assert rows[name]["n"] == "2"
        assert float(rows[name]["paper_top1"]) == PAPER["experiments"][name]["top1"]
    literature = [r for r in read_csv(studies[False] / "report" / "table1.csv")
                  if r["profile"] == "literature"]
    assert [float(r["paper_top1"]) for r in literature] == [0.7957, 0.7458]
    md = (studies[False] / "report" / "table1.md").read_text()
    assert "ResNet-18 w/o BN" in md and "ResNet-110" in md and "QUICK" not in md


def test_statistics_agree_with_scipy_welch(studies):
    rows = read_csv(studies[False] / "report" / "statistics.csv")
    assert {r["experiment"] for r in rows} == {"resnet18-adam", "resnet18-no-bn"}

    def tops(name):
        return [json.loads((studies[False] / name / f"seed-{s}" / "summary.json").read_text())
                ["test_top1"] for s in range(2)]

    for r in rows:
        x, base = tops(r["experiment"]), tops("resnet18-lr0.01")
        assert float(r["difference"]) == pytest.approx(np.mean(x) - np.mean(base))
        if np.var(x) > 0 and np.var(base) > 0:
            expected = stats.ttest_ind(x, base, equal_var=False).pvalue
            assert float(r["p_value"]) == pytest.approx(expected)
            assert float(r["ci_low"]) <= float(r["difference"]) <= float(r["ci_high"])
        assert "seed noise" in r["sentence"]


def test_quick_study_is_marked_in_every_output(studies):
    out = studies[True] / "report"
    assert PROTOCOL_NOTES["quick"] in (out / "table1.md").read_text()
    assert PROTOCOL_NOTES["quick"] in (out / "table1.tex").read_text()
    assert html.escape(PROTOCOL_NOTES["quick"]) in (out / "index.html").read_text()
    assert {r["profile"] for r in read_csv(out / "table1.csv")} == {"quick", "literature"}
    for name in ("per_class.csv", "per_superclass.csv"):
        assert {r["profile"] for r in read_csv(out / name)} == {"quick"}


def test_html_is_self_contained(studies):
    page = (studies[False] / "report" / "index.html").read_text()
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Per-superclass test accuracy" in page


def test_runs_without_a_result_are_left_out_and_listed_with_their_reason(studies, tmp_path):
    study = tmp_path / "s"
    for name in ("resnet18-lr0.01", "resnet18-adam"):
        shutil.copytree(studies[False] / name, study / name)
    failed = study / "resnet18-lr0.01" / "seed-1" / "summary.json"
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed",
                                  "error": "OutOfMemoryError: CUDA out of memory"}))
    for seed in (0, 1):  # every run of an experiment interrupted: no summary yet
        (study / "resnet18-adam" / f"seed-{seed}" / "summary.json").unlink()
    report(study)
    rows = {r["experiment"]: r for r in read_csv(study / "report" / "table1.csv")}
    assert rows["resnet18-lr0.01"]["n"] == "1"
    assert rows["resnet18-adam"]["n"] == "0" and rows["resnet18-adam"]["top1_mean"] == ""
    page = (study / "report" / "index.html").read_text()
    assert "Runs without a result" in page and "CUDA out of memory" in page
    assert "resnet18-adam/seed-1" in page and "rerun the study command" in page
    assert "no completed run" in (study / "report" / "table1.md").read_text()
    assert "Not drawn, no completed run: resnet18-adam" in page


def test_a_preset_edited_after_its_runs_never_relabels_them(studies, tmp_path, monkeypatch):
    """Edit the base preset to what its runs trained (2 epochs, batch 64): compared with
    today's presets they would read as the paper's protocol, but they keep their own label."""
    study = tmp_path / "copy"
    shutil.copytree(studies[False], study, ignore=shutil.ignore_patterns("report"))
    name = EXPERIMENTS[0]
    edited = PRESETS[name].replace(epochs=2, batch_size=64)
    edited = dataclasses.replace(edited, origin=dataclasses.replace(edited, origin=None))
    assert edited.profile == "paper"
    catalogue = Catalogue(MappingProxyType({**PRESETS, name: edited}))
    for module in ("catalogue", "labels", "training.run_folder", "report.runs",
                   "report.writer", "report.figures"):
        monkeypatch.setattr(f"resnet_study.{module}.PRESETS", catalogue)
    report(study, inspect=False)
    rows = {r["experiment"]: r for r in read_csv(study / "report" / "table1.csv")}
    assert rows[name]["profile"] == "custom"
    assert rows[name]["settings"] == "custom: epochs=2, batch_size=64"
    assert rows[name]["difference"] == ""


def test_report_is_a_pure_function_of_the_runs(studies, tmp_path):
    study = tmp_path / "copy"
    shutil.copytree(studies[False], study, ignore=shutil.ignore_patterns("report"))
    report(study)
    for name in ("table1.csv", "table1.md", "statistics.csv", "per_class.csv", "figure5.svg",
                 "figure5.png"):
        assert (study / "report" / name).read_bytes() == (
            studies[False] / "report" / name).read_bytes()


def test_a_run_that_cannot_be_inspected_is_named_and_the_report_goes_on(studies, tmp_path,
                                                                        monkeypatch):
    study = tmp_path / "study"
    shutil.copytree(studies[False], study)
    shutil.rmtree(study / "resnet18-adam" / "seed-1" / "inspect")

    def out_of_memory(run_dir, **kwargs):
        raise RuntimeError("CUDA out of memory\nmore lines")

    monkeypatch.setattr("resnet_study.inspection.probes.inspect_run", out_of_memory)
    report(study, log=lambda msg: None)
    page = html.unescape((study / "report" / "index.html").read_text())
    assert "resnet18-adam/seed-1 not inspected: RuntimeError: CUDA out of memory" in page
    assert "resnet18-adam (n = 1): output variance" in page


def test_flips_at_test_time_get_a_column_of_their_own(studies, tmp_path):
    """Runs tested with flips (`--tta`): their mean in its own column after the single view's,
    blank for the rows without; every format keeps its shape."""
    study = tmp_path / "study"
    shutil.copytree(studies[False], study, ignore=shutil.ignore_patterns("inspect", "report"))
    for seed, tta in ((0, 0.25), (1, 0.5)):
        run = study / "resnet18-adam" / f"seed-{seed}"
        path = run / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "test_top1_tta": tta}))
        rows = read_csv(run / "metrics.csv")  # as training writes it: the last epoch's alone
        write_csv(run / "metrics.csv", [{**r, "test_top1_tta": ""} for r in rows[:-1]]
                  + [{**rows[-1], "test_top1_tta": tta}], [*rows[0], "test_top1_tta"])
    report(study, inspect=False)
    md = (study / "report" / "table1.md").read_text().splitlines()
    head = md[2].split(" | ")
    column = head.index("Top-1 with flips (mean)")
    assert head[column - 1] == "Top-1 (mean ± sd)"
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md[4:]}
    assert cells["ResNet-18 Adam optimizer"][column] == "0.3750"
    assert cells["ResNet-18 LR = 0.01"][column] == "" and len(set(map(len, cells.values()))) == 1
    assert {r["experiment"]: r["tta_mean"] for r in read_csv(study / "report" / "table1.csv")
            if r["experiment"]}["resnet18-adam"] == "0.375"
    tex = (study / "report" / "table1.tex").read_text()
    assert r"\begin{tabular}{lrrrrrrrl}" in tex
    assert "Top-1 with flips (mean)" in html.unescape((study / "report" / "index.html").read_text())


def test_literature_rows_are_filled_by_their_runs(studies, tmp_path):
    """Runs of literature experiments fill their Table 1 rows beside the paper's number, named
    by recipe, and get their figures; the runs here are the base model's files relabelled (the
    report reads only files; the networks themselves are tested in test_models)."""
    study = tmp_path / "study"
    shutil.copytree(studies[False] / "resnet18-lr0.01", study / "resnet18-lr0.01")
    for name in ("wrn-16-8", "resnet-110-paper-recipe"):
        for seed in (0, 1):
            run = study / name / f"seed-{seed}"
            shutil.copytree(studies[False] / "resnet18-lr0.01" / f"seed-{seed}", run)
            data = json.loads((run / "config.json").read_text())["data"]["data"]
            preset = PRESETS[name].replace(data=data, seed=seed)  # still the preset's protocol
            (run / "config.json").write_text(json.dumps(preset.to_dict()))
    report(study)
    table = read_csv(study / "report" / "table1.csv")
    rows = {r["row"]: r for r in table}
    wrn = rows["Wide Residual Network-16 (k = 8) [18]"]
    assert wrn["experiment"] == "wrn-16-8" and wrn["n"] == "2" and wrn["profile"] == "paper"
    assert float(wrn["paper_top1"]) == 0.7957
    assert float(wrn["difference"]) == pytest.approx(float(wrn["top1_mean"]) - 0.7957)
    resnet110 = rows["ResNet-110 [6], paper's recipe"]
    assert resnet110["experiment"] == "resnet-110-paper-recipe"
    assert float(resnet110["paper_top1"]) == 0.7458
    assert not [r for r in table if r["profile"] == "literature"]  # both rows re-measured
    md = (study / "report" / "table1.md").read_text()
    assert "| published recipe |" in md and "| paper's protocol |" in md
    page = html.unescape((study / "report" / "index.html").read_text())
    for figure in ("literature", "literature-published"):
        assert (study / "report" / f"{figure}.png").exists()
    assert "Literature rows, paper's protocol: WRN-16-8 and ResNet-110 under the paper's " \
           "recipe, against the base model and the New Wide ResNet-18" in page
    assert "Literature rows, published recipes: " in page and "Not drawn, no completed run: " \
           "new-wide-resnet18, resnet-110." in page


def test_report_of_nothing_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="holds no runs"):
        report(tmp_path)


def test_runs_off_the_papers_protocol_are_marked_with_their_overrides(studies):
    """The fixture's runs train 2 epochs in batches of 64: not the paper's protocol."""
    out = studies[False] / "report"
    rows = {r["experiment"]: r for r in read_csv(out / "table1.csv") if r["experiment"]}
    for name in EXPERIMENTS:
        assert rows[name]["profile"] == "custom"
        assert rows[name]["settings"] == "custom: epochs=2, batch_size=64"
        assert rows[name]["difference"] == ""  # never set against the paper's 25 epochs
        assert rows[name]["paper_top1"]  # the paper's number still stands beside it
    assert PROTOCOL_NOTES["custom"] in (out / "table1.md").read_text()
    assert r"custom: epochs=2, batch\_size=64" in (out / "table1.tex").read_text()
    page = (out / "index.html").read_text()
    assert html.escape(PROTOCOL_NOTES["custom"]) in page
    assert "custom: epochs=2, batch_size=64" in page
    assert {r["profile"] for r in read_csv(out / "statistics.csv")} == {"custom"}
    header = read_csv(out / "per_class.csv")[0]
    assert "resnet18-lr0.01 [custom: epochs=2, batch_size=64]" in header
    results, _ = scan(studies[False])
    fig = curves_figure(results, EXPERIMENTS, "t")
    assert "custom settings, not the paper's protocol" in fig._suptitle.get_text()
    assert all("epochs=2, batch_size=64" in t.get_text() for t in fig.legends[0].get_texts())
    summary = json.loads((studies[False] / EXPERIMENTS[0] / "seed-0" / "summary.json")
                         .read_text())
    assert summary["profile"] == "custom" and summary["overrides"] == {"epochs": 2,
                                                                       "batch_size": 64}


def test_damaged_runs_are_listed_and_the_rest_is_reported(studies, tmp_path):
    """One report over five runs, each damaged its own way, and the one run left whole."""
    study = tmp_path / "copy"
    shutil.copytree(studies[False], study, ignore=shutil.ignore_patterns("report"))
    damaged = dict(zip(["resnet18-adam/seed-0", "resnet18-adam/seed-1", "resnet18-no-bn/seed-0",
                        "resnet18-no-bn/seed-1", "resnet18-lr0.01/seed-1"], DAMAGES, strict=True))
    for run, kind in damaged.items():
        damage(study / run, kind)
    result = report(study)
    assert result.completed == 1
    reasons = {u["run"]: u["reason"] for u in result.without_result}
    assert {u["status"] for u in result.without_result} == {"unreadable"}
    assert reasons.keys() == damaged.keys()
    page = (study / "report" / "index.html").read_text()
    for run, kind in damaged.items():
        assert DAMAGES[kind] in reasons[run], (run, reasons[run])
        assert run in page and html.escape(DAMAGES[kind]) in page
    rows = {r["experiment"]: r for r in read_csv(study / "report" / "table1.csv")}
    assert rows["resnet18-lr0.01"]["n"] == "1"
    assert rows["resnet18-adam"]["n"] == rows["resnet18-no-bn"]["n"] == "0"
    for name in ("figure5.png", "figure7.png", "statistics.csv", "per_class.csv", "confusion.png"):
        assert (study / "report" / name).is_file()


def test_a_study_whose_runs_all_failed_gets_a_page_naming_the_failures(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr("resnet_study.models.pretrained.IMAGENET_WEIGHTS_URL",
                        "http://127.0.0.1:9/resnet18-f37072fd.pth")  # offline
    study = tmp_path / "s"
    runs = plan(presets(["resnet18-pretrained"]), 2, study, {**SETTINGS, "data": "synthetic",
                                                    "subset": 128}, quick=False)
    assert len(run_study(runs, log=lambda msg: None)["failed"]) == 2
    capsys.readouterr()
    assert main(["report", str(study)]) == 1
    out, err = capsys.readouterr()
    assert "report written" in out
    assert len(err.strip().splitlines()) == 1
    assert "no run of" in err and "2 failed: UsageError: could not download" in err
    assert "run `resnet-study study`" not in err
    page = (study / "report" / "index.html").read_text()
    assert "No run of this study has completed" in page
    assert page.count("could not download ImageNet weights") == 2
    assert "no completed run" in (study / "report" / "table1.md").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_a_real_browser(studies, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000",
                    f"--screenshot={shot}", (studies[False] / "report" / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = shot.read_bytes()
    assert pixels[:8] == b"\x89PNG\r\n\x1a\n" and len(pixels) > 50_000  # figures, not blank
