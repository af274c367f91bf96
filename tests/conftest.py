import os
from pathlib import Path

import pytest
import torch

from resnet_study.training.device import autocast_dtype

STANDIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Keep every test's decoded-data cache out of the user's ~/.cache."""
    os.environ["RESNET_STUDY_DATA"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _private_working_directory(tmp_path_factory, monkeypatch):
    """Each test in a working directory of its own: a command's default folders (runs/...)
    never land in the checkout, nor collide with another test's running beside it."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def standin():
    """The CIFAR-10 JPEG stand-in (../shared/data); tests using it skip, saying why, without it."""
    if not STANDIN.is_file():
        pytest.skip(f"CIFAR-10 stand-in not found at {STANDIN} (see ../shared/data/README.md)")
    return STANDIN


@pytest.fixture
def auto_precision() -> str:
    """What `--precision auto` trains in on this CPU, RESNET_STUDY_CPU_BF16 honoured: the
    precision a `precision`-marked test picks its tolerance for."""
    return "fp32" if autocast_dtype("auto", torch.device("cpu")) is None else "bf16"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI set, as .ci/run runs) a skipped test fails: whatever it needs, CI must have."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


# The files that take longest, longest first (measured 2026-12-07): `make test` hands whole
# files to its two workers in collection order (--no-loadscope-reorder), so these start first
# and the short ones fill in around them, rather than one long file running alone at the end.
LONGEST_FIRST = ["test_faults.py", "test_report.py", "test_gpu_check.py", "test_train.py",
                 "test_data.py", "test_bad_input.py", "test_search_workers.py",
                 "test_own_network.py", "test_inspection.py", "test_study.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
