import os
from pathlib import Path

import pytest

STANDIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Keep every test's decoded-data cache out of the user's ~/.cache."""
    os.environ["RESNET_STUDY_DATA"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def standin():
    """The CIFAR-10 JPEG stand-in (../shared/data); tests using it skip, saying why, without it."""
    if not STANDIN.is_file():
        pytest.skip(f"CIFAR-10 stand-in not found at {STANDIN} (see ../shared/data/README.md)")
    return STANDIN
