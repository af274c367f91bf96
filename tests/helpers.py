"""Helpers shared by the test modules: official-layout data files, damaged run folders,
the paper's parameter counts, metrics read back, a throwaway PostgreSQL server, a search's
trials read back and checked."""

import contextlib
import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_study.data import sources

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def batch(rng: np.random.Generator, n: int, labels: dict[bytes, list[int]]) -> dict:
    return {b"batch_label": b"testing batch 1 of 1",
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)], **labels}


def write_cifar100(root: Path, *, train: dict | None = None) -> dict[str, dict]:
    """cifar-100-python/{train,test,meta} under root: 50 train and 20 test images."""
    rng = np.random.default_rng(0)
    files = {
        "meta": {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                 b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]},
        "train": train or batch(rng, 50, {b"fine_labels": rng.integers(0, 100, 50).tolist(),
                                          b"coarse_labels": rng.integers(0, 20, 50).tolist()}),
        "test": batch(rng, 20, {b"fine_labels": rng.integers(0, 100, 20).tolist(),
                                b"coarse_labels": rng.integers(0, 20, 20).tolist()}),
    }
    for name, obj in files.items():
        dump(root / "cifar-100-python" / name, obj)
    return files


def write_cifar10(root: Path) -> dict[str, dict]:
    """cifar-10-batches-py/ under root: five batches of 10 train images, 20 test images."""
    rng = np.random.default_rng(1)
    files = {f"data_batch_{i}": batch(rng, 10, {b"labels": rng.integers(0, 10, 10).tolist()})
             for i in range(1, 6)}
    files["test_batch"] = batch(rng, 20, {b"labels": rng.integers(0, 10, 20).tolist()})
    files["batches.meta"] = {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                             b"num_cases_per_batch": 10, b"num_vis": 3072}
    for name, obj in files.items():
        dump(root / "cifar-10-batches-py" / name, obj)
    return files


def pack(folder: Path, archive: Path) -> Path:
    """Tar the contents of folder (not folder itself) into archive."""
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


def write_class_folders(root: Path, classes: dict[str, tuple[int, int]]) -> dict[str, list]:
    """root/{train,test}/<class>/NN.png with random pixels; returns the images per split, in
    label order (sorted class names), then file order."""
    rng = np.random.default_rng(2)
    written: dict[str, list] = {"train": [], "test": []}
    for label, cls in enumerate(sorted(classes)):
        for split, count in zip(("train", "test"), classes[cls], strict=True):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:02d}.png")
                written[split].append((pixels.transpose(2, 0, 1), label))
    return written


def read_array(source: bytes | Path | str) -> np.ndarray:
    return sources.read_pickle(source, "old")["data"]


class Payload:
    def __init__(self, call: tuple) -> None:
        self.call = call

    def __reduce__(self) -> tuple:
        return self.call


def write_bad_cifar10(root: Path, fault: str) -> Path:
    write_cifar10(root)
    path = root / "cifar-10-batches-py/data_batch_3"
    with path.open("rb") as f:
        d = pickle.load(f)
    if fault == "label range":
        d[b"labels"][4] = 10
    elif fault == "label count":
        d[b"labels"].pop()
    elif fault == "dtype":
        d[b"data"] = d[b"data"].astype(np.float32)
    elif fault == "shape":
        d[b"data"] = d[b"data"][:, :3000]
    elif fault == "no data":
        del d[b"data"]
    dump(path, d)
    return path


def damage(run_dir, kind):
    """What a partial copy, an interrupted rsync or a hand edit leaves of a finished run."""
    if kind == "truncated summary.json":
        (run_dir / "summary.json").write_text((run_dir / "summary.json").read_text()[:40])
    elif kind == "metrics.csv with only its header":
        text = (run_dir / "metrics.csv").read_text()
        (run_dir / "metrics.csv").write_text(text.splitlines()[0] + "\n")
    elif kind == "config.json not JSON":
        (run_dir / "config.json").write_text("model: resnet18\n")
    elif kind == "metrics.csv missing":
        (run_dir / "metrics.csv").unlink()
    elif kind == "truncated predictions.npz":
        data = (run_dir / "predictions.npz").read_bytes()
        (run_dir / "predictions.npz").write_bytes(data[:len(data) // 2])
    elif kind == "checkpoint of another width":
        config = json.loads((run_dir / "config.json").read_text())
        config["model"]["width"] = 2
        (run_dir / "config.json").write_text(json.dumps(config))


DAMAGES = {"truncated summary.json": "summary.json is not valid JSON",
           "metrics.csv with only its header": "metrics.csv holds no epochs",
           "config.json not JSON": "config.json is not valid JSON",
           "metrics.csv missing": "metrics.csv is missing",
           "truncated predictions.npz": "predictions.npz is damaged"}


# Table 1 of the paper, 100 classes.
PAPER_PARAMS = {
    "resnet18-lr0.1": 11_227_812,
    "resnet18-lr0.01": 11_227_812,
    "resnet18-lr0.001": 11_227_812,
    "resnet18-wide": 44_695_716,
    "resnet18-3x3-shortcut": 12_604_068,
    "resnet18-preact": 11_226_020,
    "resnet18-no-bn": 11_218_212,
    "resnet18-dropout": 11_227_812,
    "resnet18-adam": 11_227_812,
    "resnet18-adam-clip": 11_227_812,
    "resnet18-pretrained": 11_227_812,
    "new-wide-resnet18": 50_266_276,
}


# The literature rows, counted from the architectures as published (conv weights without
# bias, BN scale and shift, fc with bias): 100 classes, and 10 classes as their papers report.
LITERATURE_PARAMS = {
    "wrn-16-8": (11_007_540, 10_961_370),  # Zagoruyko & Komodakis: 11.0M
    "resnet-110": (1_733_812, 1_727_962),  # He et al.: 1.7M
}


def read_metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


TIMINGS = {"epoch_seconds", "eval_seconds", "images_per_second"}


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]



@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster from Debian's package (initdb, pg_ctl) in a temporary
    folder, on a local socket only, run as the unprivileged `postgres` user where the tests run
    as root (the server refuses root); yields its URL, and is stopped and removed whatever
    happens."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not bins:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    bindir = bins[-1].parent
    with tempfile.TemporaryDirectory(prefix="resnet-study-pg-") as folder:
        tmp = Path(folder)
        as_user: list[str] = []
        if os.geteuid() == 0:
            as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(tmp, "postgres")
        data = tmp / "data"
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                        "search", "--no-sync"], check=True, capture_output=True)
        options = f"-k {tmp} -p 5432 -c listen_addresses='' -c fsync=off"
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                        "-l", str(tmp / "server.log"), "start"], check=True, capture_output=True)
        try:
            yield f"postgresql://search@/postgres?host={tmp}"
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "stop"], capture_output=True)


def search_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def journal_trials(out: Path) -> list:
    """The trials of the search in `out` as Optuna reads them from its journal, where its
    study is named after the folder (trials.csv is written only as trials end)."""
    import optuna

    from resnet_study.search.storage import open_storage

    name = out.resolve().name
    return optuna.load_study(study_name=name, storage=open_storage(None, out, name).optuna
                             ).get_trials()


def check_search(out: Path, asked: int, epochs: int) -> list[dict]:
    """The search holds `asked` finished trials with unique numbers, each with a run folder of
    its own (its last rung's) that says what the trial says: a completed trial's finished
    `epochs`, a pruned one's a shorter complete schedule."""
    rows = search_trials(out)
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(done) == asked, [(r["number"], r["state"], r["outcome"]) for r in rows]
    assert len({r["number"] for r in rows}) == len(rows)
    assert len({r["run"] for r in done}) == asked
    for r in done:
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["epochs"] == int(r["epochs"])
        assert r["run"].endswith(f"/epochs-{summary['epochs']:03d}")
        if r["state"] == "COMPLETE":
            assert summary["epochs"] == epochs
            assert summary["val_top1"] == pytest.approx(float(r["value"]))
        else:
            assert summary["epochs"] < epochs
    return rows


def presets(names: list[str]) -> list:
    """The presets named, as a study plans them."""
    from resnet_study.catalogue import PRESETS

    return [PRESETS.get(name) for name in names]


# A search of a few tiny trials, as a command line: workers and stops run it as a process.
SEARCH_SPACE = """
[lr]
low = 0.005
high = 0.05
log = true

[optimizer]
choices = ["sgd", "adam"]

[nesterov]
choices = [false, true]
when = { optimizer = "sgd" }
"""
SEARCH_TINY = ["--data", "synthetic", "--subset", "64", "--val-split", "32", "--batch-size",
               "32", "--device", "cpu", "--quiet"]


def search_command(out: Path, space: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [str(Path(sys.executable).with_name("resnet-study")), "search", "--space", str(space),
            "--out", str(out), "--epochs", str(epochs), "--pruner", "none", *SEARCH_TINY,
            *extra]


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# How a user stops a command, each way with the signal the command says stopped it (None: it
# is killed and says nothing).
STOPS = {"SIGTERM": "SIGTERM", "Ctrl-C in its terminal": "SIGINT", "SIGKILL": None}


def stop(proc: subprocess.Popen, how: str) -> None:
    """Stop `proc` `how` a user would (a key of STOPS): Ctrl-C is SIGINT to its whole process
    group, as a terminal sends it to its foreground group."""
    if how == "Ctrl-C in its terminal":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
