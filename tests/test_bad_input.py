"""Bad input of every kind: one line on stderr, a non-zero exit, no traceback, nothing lost."""

import contextlib
import csv
import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from resnet_study import ModelConfig, UsageError
from resnet_study.catalogue import PRESETS
from resnet_study.cli import main
from resnet_study.files import write_csv
from resnet_study.models import ResNet18, load_pretrained

from .helpers import (
    DAMAGES,
    Payload,
    damage,
    pack,
    write_bad_cifar10,
    write_cifar100,
    write_class_folders,
)

TRAIN = ["train", "resnet18-lr0.01", "--epochs", "1", "--batch-size", "16", "--subset", "32",
         "--test-subset", "16", "--quiet"]


def data(tmp: Path, kind: str) -> str:
    """A data set with one fault, in the official layout unless said otherwise."""
    src = tmp / "src"
    if kind == "empty folder":
        src.mkdir()
    elif kind == "truncated tar.gz":
        write_cifar100(src)
        archive = pack(src, tmp / "c100.tar.gz")
        archive.write_bytes(archive.read_bytes()[:-3000])
        return str(archive)
    elif kind == "truncated pickle":
        write_cifar100(src)
        train = src / "cifar-100-python" / "train"
        train.write_bytes(train.read_bytes()[:4000])
    elif kind == "code in pickle":
        write_cifar100(src, train={b"data": Payload((os.system, (f"touch {tmp / 'pwned'}",))),
                                   b"fine_labels": [], b"coarse_labels": []})
    elif kind in ("shape", "dtype", "label range"):
        write_bad_cifar10(src, kind)
    elif kind in ("non-image file", "wrong size"):
        write_class_folders(src, {"cat": (2, 1), "dog": (2, 1)})
        if kind == "non-image file":
            (src / "train" / "cat" / "readme.jpg").write_text("not a picture")
        else:
            Image.new("RGB", (64, 64)).save(src / "train" / "dog" / "big.png")
    elif kind == "class sets differ":
        write_class_folders(src, {"cat": (2, 1), "dog": (2, 0), "eel": (0, 1)})
    elif kind == "archive escapes":
        archive = tmp / "evil.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("../../etc/cron.d/evil")
            payload = b"* * * * * root touch /tmp/pwned\n"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        return str(archive)
    return str(src)


def existing_run(tmp: Path) -> Path:
    """A finished tiny run, whose files no bad command may touch."""
    out = tmp / "run"
    assert main([*TRAIN, "--data", "synthetic", "--out", str(out)]) == 0
    return out


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_with(tmp: Path, content) -> Path:
    out = tmp / "other"
    out.mkdir()
    if content == "garbage":
        (out / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    else:  # a pickle that would run code: torch.save accepts any object
        with open(out / "checkpoint.pt", "wb") as f:
            pickle.dump(Payload((os.system, (f"touch {tmp / 'pwned'}",))), f)
    return out


def damaged_study(tmp: Path, kind: str) -> list[str]:
    """`report` of a two-run study whose second run is damaged (see test_report.DAMAGES).
    Without the inspections (about 10 s a run here): what is checked is the exit and its line;
    test_report covers a damaged study's report with them."""
    for seed in (0, 1):
        shutil.copytree(tmp / "run", tmp / "study" / "resnet18-lr0.01" / f"seed-{seed}")
    damage(tmp / "study" / "resnet18-lr0.01" / "seed-1", kind)
    return ["report", str(tmp / "study"), "--no-inspect"]


def infinite_config(tmp: Path) -> list[str]:
    """`evaluate` of a run whose config.json says `"lr": Infinity` (JSON as Python writes it)."""
    shutil.copytree(tmp / "run", tmp / "infinite")
    config = tmp / "infinite" / "config.json"
    config.write_text(re.sub(r'"lr": [^,]+', '"lr": Infinity', config.read_text(), count=1))
    return ["evaluate", str(tmp / "infinite")]


def mismatched_run(tmp: Path) -> list[str]:
    """`evaluate` of a run whose config.json says width 2 beside a width-1 checkpoint."""
    shutil.copytree(tmp / "run", tmp / "mixed")
    damage(tmp / "mixed", "checkpoint of another width")
    return ["evaluate", str(tmp / "mixed")]


def fifo(tmp: Path) -> str:
    """A FIFO no one writes to: opening it to read blocks until a writer comes. Should the
    command open it, a writer comes after 5 s, so that the case fails on its exit instead of
    hanging the tests."""
    path = tmp / "pipe.toml"
    os.mkfifo(path)

    def writer() -> None:
        with contextlib.suppress(OSError):  # ENXIO: no reader waits on it, as it should be
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(5, writer)
    timer.daemon = True
    timer.start()
    return str(path)


def oversized(tmp: Path) -> str:
    """2 MiB of valid TOML: a comment, so that only the size is at fault."""
    path = tmp / "big.toml"
    path.write_text("#" * 2**21 + "\n")
    return str(path)


def latin1(tmp: Path) -> str:
    path = tmp / "latin1.toml"
    path.write_bytes('[mine]\nextends = "resnet18-lr0.01"\nnotes = "caf\u00e9"\n'.encode("latin-1"))
    return str(path)


SEARCH = ["search", "--trials", "1", "--data", "synthetic"]
# the files a user hands the tool: refused on sight, exit 2 (a FIFO without blocking)
NETWORK = """
from torch import nn


def net(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, num_classes))


def seven(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 7))


def broken(num_classes):
    raise RuntimeError("boom")


class Crashing(nn.Module):
    def forward(self, x):
        return x.view(-1, 5)


def crashing(num_classes):
    return Crashing()


number = 3
"""
BAD_NETWORKS = {  # family, options, what the one line says
    "network module that does not import": (
        "nets_x:net", {}, "module nets_x cannot be imported: it imports no_such_package, which "
                          "is not installed"),
    "network module that is not there": ("nets_none:net", {}, "no module nets_none here; put "
                                                              "nets_none.py in the working"),
    "network name not in its module": ("nets_{n}:nothing", {}, "has no nothing"),
    "network not callable": ("nets_{n}:number", {}, "number is a int, not a callable"),
    "network with the wrong output": ("nets_{n}:seven", {}, "maps a 2 x 3 x 32 x 32 batch to "
                                                              "[2, 7], not [2, 100]"),
    "network that raises": ("nets_{n}:broken", {}, "failed (RuntimeError: boom)"),
    "network whose forward fails": ("nets_{n}:crashing", {}, "its forward pass on a 2 x 3 x 32 "
                                                             "x 32 batch failed"),
    "network given options it does not take": (
        "nets_{n}:net", {"depth": 3}, "unexpected keyword argument 'depth'"),
}


def bad_network(t: Path, case: str) -> list[str]:
    """An experiments file naming a network of the user's own, its module in the working
    directory (a fresh module name each case: Python caches a module once imported)."""
    family, options, _ = BAD_NETWORKS[case]
    n = list(BAD_NETWORKS).index(case)
    (Path.cwd() / f"nets_{n}.py").write_text(NETWORK)
    (Path.cwd() / "nets_x.py").write_text("import no_such_package\n")
    toml = t / "mine.toml"
    table = "".join(f"{k} = {v}\n" for k, v in options.items())
    toml.write_text(f'["mine"]\n["mine".model]\nfamily = "{family.format(n=n)}"\n'
                    + (f'["mine".model.options]\n{table}' if options else ""))
    return ["experiments", "--experiments", str(toml)]


FILES = {
    **{case: (lambda t, c=case: bad_network(t, c), ("mine.toml: [mine] model: family nets_",
                                                     BAD_NETWORKS[case][2]))
       for case in BAD_NETWORKS},
    "experiments file is a device": (lambda t: ["experiments", "--experiments", "/dev/zero"],
                                     "/dev/zero: a character device, not a regular file"),
    "experiments file is a FIFO": (lambda t: ["experiments", "--experiments", fifo(t)],
                                   "pipe.toml: a FIFO, not a regular file"),
    "experiments file is a directory": (lambda t: ["experiments", "--experiments", str(t)],
                                        "a directory, not a regular file"),
    "experiments file over 1 MiB": (lambda t: ["experiments", "--experiments", oversized(t)],
                                    "big.toml: larger than 1 MiB"),
    "experiments file not UTF-8": (lambda t: ["experiments", "--experiments", latin1(t)],
                                   "latin1.toml: not a TOML file (not UTF-8 text)"),
    "space file is a FIFO": (lambda t: [*SEARCH, "--out", str(t / "s"), "--space", fifo(t)],
                             "pipe.toml: a FIFO, not a regular file"),
    "space file over 1 MiB": (lambda t: [*SEARCH, "--out", str(t / "s"), "--space",
                                         oversized(t)], "big.toml: larger than 1 MiB"),
}

CASES = {
    # data
    "missing data path": (lambda t: [*TRAIN, "--data", str(t / "nowhere")], "does not exist"),
    **{kind: (lambda t, k=kind: [*TRAIN, "--data", data(t, k)], message) for kind, message in [
        ("empty folder", "holds no files"),
        ("truncated tar.gz", "truncated or corrupt archive"),
        ("truncated pickle", "truncated or corrupt pickle"),
        ("code in pickle", "refusing to unpickle"),
        ("shape", "data must be uint8 of shape (N, 3072)"),
        ("dtype", "not float32"),
        ("label range", "labels must lie in [0, 10)"),
        ("non-image file", "not an image"),
        ("wrong size", "image is 64x64, expected 32x32"),
        ("class sets differ", "only in train: dog"),
        ("archive escapes", "points outside the archive"),
    ]},
    # experiment and settings
    "unknown experiment": (lambda t: ["train", "resnet99"], "unknown experiment"),
    "zero learning rate": (lambda t: [*TRAIN, "--lr", "0"], "lr must be > 0"),
    "negative learning rate": (lambda t: [*TRAIN, "--lr", "-0.1"], "lr must be > 0"),
    "zero batch size": (lambda t: [*TRAIN, "--batch-size", "0"], "batch_size must be > 0"),
    "zero epochs": (lambda t: [*TRAIN, "--epochs", "0"], "epochs must be > 0"),
    "batch larger than the data": (lambda t: [*TRAIN, "--data", "synthetic", "--batch-size",
                                              "64"], "larger than the 32 training images"),
    "not a number": (lambda t: [*TRAIN, "--lr", "fast"], "invalid float value"),
    "infinite learning rate": (lambda t: [*TRAIN, "--lr", "inf"], "lr must be a finite number"),
    "NaN momentum": (lambda t: [*TRAIN, "--momentum", "nan"], "momentum must be a finite number"),
    "infinity in a run's config.json": (infinite_config, "lr must be a finite number"),
    "subset larger than the data": (lambda t: [*TRAIN, "--data", "synthetic", "--subset",
                                               "1000000000"], "subset 1000000000 is larger than "
                                                              "the 5000 training images"),
    "batch of one": (lambda t: [*TRAIN, "--data", "synthetic", "--batch-size", "1"],
                     "fewer than the 2 images batch norm needs"),
    # runs and checkpoints
    "resume without checkpoint": (lambda t: [*TRAIN, "--data", "synthetic", "--resume", "--out",
                                             str(t / "fresh")], "no checkpoint"),
    "resume another experiment": (lambda t: ["train", "resnet18-adam", *TRAIN[2:], "--data",
                                             "synthetic", "--resume", "--out",
                                             str(t / "run")], "was written by experiment"),
    "rerun over a finished run": (lambda t: [*TRAIN, "--data", "synthetic", "--out",
                                             str(t / "run")], "already holds a run"),
    "checkpoint not a checkpoint": (lambda t: [*TRAIN, "--data", "synthetic", "--resume",
                                               "--out", str(checkpoint_with(t, "garbage"))],
                                    "not a resnet-study checkpoint"),
    "checkpoint with code": (lambda t: [*TRAIN, "--data", "synthetic", "--resume", "--out",
                                        str(checkpoint_with(t, "payload"))],
                             "not a resnet-study checkpoint"),
    "evaluate a non-run": (lambda t: ["evaluate", str(t)], "not a run directory"),
    "pretrained offline": (lambda t: [*TRAIN, "--data", "synthetic", "--pretrained", "imagenet",
                                      "--out", str(t / "pre")], "could not download"),
    "pretrained file missing": (lambda t: [*TRAIN, "--data", "synthetic", "--pretrained",
                                           str(t / "w.pt"), "--out", str(t / "pre")],
                                "does not exist"),
    # study and output
    "malformed shard": (lambda t: ["study", "--all", "--shard", "2/x"], "shard"),
    "shard out of range": (lambda t: ["study", "--all", "--shard", "3/2"], "shard"),
    "unwritable output directory": (lambda t: [*TRAIN, "--data", "synthetic", "--out",
                                               str(t / "run" / "config.json" / "sub")],
                                    "Not a directory"),
    "report of nothing": (lambda t: ["report", str(t / "nowhere")], "not a study directory"),
    # a damaged run: the report is written, the run listed; the exit says it is incomplete.
    # One damage: every kind takes the same line (`cmd_report`), and test_report checks each
    # kind's reason on the page.
    "report of a run with a truncated predictions.npz": (
        lambda t: damaged_study(t, "truncated predictions.npz"),
        ("1 run(s) unreadable", DAMAGES["truncated predictions.npz"])),
    "checkpoint does not fit its config": (mismatched_run, "does not fit"),
    "precision switch neither 0 nor 1": (lambda t: [*TRAIN, "--data", "synthetic", "--out",
                                                    str(t / "s")], "RESNET_STUDY_CPU_BF16 must be",
                                         {"RESNET_STUDY_CPU_BF16": "yes"}),
    **FILES,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, existing_run(tmp)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_nonzero_and_loses_nothing(case, workspace, tmp_path, capsys,
                                                         monkeypatch):
    tmp, run = workspace
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # ImageNet weights not cached
    monkeypatch.setattr("resnet_study.models.pretrained.IMAGENET_WEIGHTS_URL",
                        "http://127.0.0.1:9/resnet18-f37072fd.pth")  # offline
    # each case works in its own folder, beside a link to the shared finished run
    (tmp_path / "run").symlink_to(run)
    before = fingerprint(run)
    argv, message, *env = CASES[case]
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    start = time.monotonic()
    try:
        code = main(argv(tmp_path))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    if case in FILES:
        assert code == 2 and time.monotonic() - start < 5
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    messages = message if isinstance(message, tuple) else (message,)  # all in the one line
    assert len(lines) == 1 and all(m in lines[0] for m in messages), err
    assert lines[0].startswith("resnet-study")
    assert fingerprint(run) == before
    assert not (tmp_path / "pwned").exists()


def test_the_table_is_long_enough():
    assert len(CASES) >= 35


def test_a_weights_file_carrying_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "w.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": Payload((os.system, (f"touch {marker}",)))}, f)
    with pytest.raises(UsageError, match="not a loadable state dict"):
        load_pretrained(ResNet18(ModelConfig()), str(path))
    assert not marker.exists()


BOM = "\ufeff"  # what a Windows editor puts before UTF-8 text


def test_an_experiments_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_text(BOM + '["resnet18-bom"]\r\nextends = "resnet18-lr0.01"\r\n'
                    '["resnet18-bom".train]\r\nlr = 0.05\r\n')
    assert PRESETS.with_files([path]).get("resnet18-bom").train.lr == 0.05


def test_a_space_file_with_a_byte_order_mark_is_read(tmp_path, capsys):
    """Read past its mark up to its one fault, the last knob: without the mark's handling the
    fault would be TOML's, at line 1."""
    path = tmp_path / "space.toml"
    path.write_text(BOM + "[lr]\r\nlow = 0.01\r\nhigh = 0.1\r\n[lrr]\r\nchoices = [1]\r\n")
    assert main([*SEARCH, "--out", str(tmp_path / "s"), "--space", str(path)]) == 2
    assert "space.toml: [lrr]: unknown setting" in capsys.readouterr().err


def test_no_csv_cell_is_a_formula_and_numbers_stay_numbers(tmp_path):
    """OWASP's CSV injection: a cell starting with = + - @ tab or CR runs in a spreadsheet."""
    formulas = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "-inf"]
    numbers = [-0.93, -3, 1e-05, "-0.93", "+1.5e-3", "-.5", "12", "3.", "-7E+2"]
    plain = ["resnet18-lr0.01", "", "a=b", "x-1", None]
    write_csv(tmp_path / "t.csv", [dict(enumerate(formulas + numbers + plain))],
              list(range(len(formulas + numbers + plain))))
    with open(tmp_path / "t.csv", newline="") as f:
        row = list(csv.reader(f))[1]
    assert row == ["'" + c for c in formulas] + [str(c) for c in numbers] + [
        "resnet18-lr0.01", "", "a=b", "x-1", ""]
