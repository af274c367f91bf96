"""Data loading: official and home-made layouts, the safe unpickler, download, cache, loader.

Every fixture is written here in the exact official layout, small; nothing touches the network
except a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_study.catalogue import PRESETS
from resnet_study.data import store
from resnet_study.data.loader import DeviceLoader, Mixing, normalization
from resnet_study.data.loader import split as split_images
from resnet_study.data.sources import ImageSet
from resnet_study.data.store import load_images
from resnet_study.data.tree import DataError
from resnet_study.errors import UsageError
from resnet_study.training.train import train

from .helpers import (
    CIFAR10_CLASSES,
    Payload,
    pack,
    read_array,
    write_bad_cifar10,
    write_cifar10,
    write_cifar100,
    write_class_folders,
)

# --- fixtures in the official layouts ---------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def load(spec: Path | str, cache: Path) -> ImageSet:
    return load_images(str(spec), cache_dir=cache, progress=False)


# --- the official readers ---------------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_cifar100_round_trip(tmp_path: Path, cache: Path, packed: bool) -> None:
    files = write_cifar100(tmp_path / "src")
    spec = pack(tmp_path / "src", tmp_path / "c100.tar.gz") if packed else tmp_path / "src"
    s = load(spec, cache)

    assert s.name == ("c100" if packed else "src")
    assert s.classes == [f"fine{i}" for i in range(100)]
    assert s.superclasses == [f"coarse{i}" for i in range(20)]
    for split in ("train", "test"):
        raw = files[split]
        images = getattr(s, f"{split}_images")
        assert images.dtype == np.uint8 and images.shape == (len(raw[b"data"]), 3, 32, 32)
        assert np.array_equal(images, raw[b"data"].reshape(-1, 3, 32, 32))
        labels, coarse = getattr(s, f"{split}_labels"), getattr(s, f"{split}_coarse")
        assert labels.dtype == np.int64 and labels.tolist() == raw[b"fine_labels"]
        assert coarse.dtype == np.int64 and coarse.tolist() == raw[b"coarse_labels"]
    # a row holds 1024 red, then 1024 green, then 1024 blue values, each plane row-major
    row = files["train"][b"data"][3]
    y, x = 5, 7
    assert s.train_images[3, :, y, x].tolist() == [row[c * 1024 + y * 32 + x] for c in range(3)]


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_round_trip(tmp_path: Path, cache: Path, packed: bool) -> None:
    files = write_cifar10(tmp_path / "src")
    spec = pack(tmp_path / "src", tmp_path / "c10.tar") if packed else tmp_path / "src"
    s = load(spec, cache)

    assert s.classes == CIFAR10_CLASSES
    assert s.superclasses is None and s.train_coarse is None and s.test_coarse is None
    train = [files[f"data_batch_{i}"] for i in range(1, 6)]
    assert np.array_equal(s.train_images,
                          np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32))
    assert s.train_labels.tolist() == sum((b[b"labels"] for b in train), [])
    assert np.array_equal(s.test_images, files["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    assert s.test_labels.tolist() == files["test_batch"][b"labels"]


def test_official_layout_without_top_folder(tmp_path: Path, cache: Path) -> None:
    files = write_cifar100(tmp_path)
    s = load(tmp_path / "cifar-100-python", cache)
    assert np.array_equal(s.test_images, files["test"][b"data"].reshape(-1, 3, 32, 32))


def test_numpy1_pickles_are_read(tmp_path: Path) -> None:
    """The official files name numpy.core.multiarray, which numpy 2 renamed."""
    raw = pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2)
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != raw
    (tmp_path / "old").write_bytes(old)
    for source in (old, tmp_path / "old", str(tmp_path / "old")):
        assert read_array(source).tolist() == [[0, 1, 2], [3, 4, 5]]


# --- the unpickler refuses everything but arrays ----------------------------------------------


@pytest.mark.parametrize("kind", ["open", "system"])
def test_malicious_pickle_is_refused(tmp_path: Path, cache: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    call = (open, (str(marker), "w")) if kind == "open" else (os.system, (f"touch {marker}",))
    train = {b"data": Payload(call), b"fine_labels": [], b"coarse_labels": []}
    write_cifar100(tmp_path / "src", train=train)

    with pytest.raises(DataError, match=r"cifar-100-python/train: refusing to unpickle") as e:
        load(tmp_path / "src", cache)
    assert "not a CIFAR data file" in str(e.value)
    assert not marker.exists()


def test_truncated_pickle(tmp_path: Path, cache: Path) -> None:
    write_cifar100(tmp_path / "src")
    train = tmp_path / "src/cifar-100-python/train"
    train.write_bytes(train.read_bytes()[:5000])
    with pytest.raises(DataError, match=f"{re.escape(str(train))}: truncated or corrupt pickle"):
        load(tmp_path / "src", cache)


def test_truncated_archive(tmp_path: Path, cache: Path) -> None:
    write_cifar100(tmp_path / "src")
    archive = pack(tmp_path / "src", tmp_path / "c100.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-3000])
    with pytest.raises(DataError, match=f"{re.escape(str(archive))}: truncated or corrupt archive"):
        load(archive, cache)


# --- faults in official files -----------------------------------------------------------------


@pytest.mark.parametrize("fault, message", [
    ("label range", r"labels must lie in \[0, 10\), found \d+\.\.10"),
    ("label count", "labels must be 10 integers, one per image"),
    ("dtype", r"data must be uint8 of shape \(N, 3072\), not float32"),
    ("shape", r"data must be uint8 of shape \(N, 3072\), not uint8 of shape \(10, 3000\)"),
    ("no data", "no data"),
])
def test_faulty_batch_is_named(tmp_path: Path, cache: Path, fault: str, message: str) -> None:
    path = write_bad_cifar10(tmp_path / "src", fault)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {message}"):
        load(tmp_path / "src", cache)


def test_missing_cifar10_batch(tmp_path: Path, cache: Path) -> None:
    write_cifar10(tmp_path / "src")
    (tmp_path / "src/cifar-10-batches-py/data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5: missing"):
        load(tmp_path / "src", cache)


def test_missing_path_empty_folder_and_unknown_layout(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError, match="nowhere: does not exist"):
        load(tmp_path / "nowhere", cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: holds no files; expected cifar-100-python"):
        load(tmp_path / "empty", cache)
    (tmp_path / "odd/images").mkdir(parents=True)
    (tmp_path / "odd/images/a.png").write_bytes(b"")
    with pytest.raises(DataError, match="odd: no recognizable layout; expected"):
        load(tmp_path / "odd", cache)
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="x.zip: not a folder or a .tar.gz"):
        load(tmp_path / "x.zip", cache)


def test_data_error_is_a_usage_error() -> None:
    assert issubclass(DataError, UsageError)


# --- class folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("top", ["", "pets-png/"])
@pytest.mark.parametrize("packed", [False, True])
def test_class_folders_round_trip(tmp_path: Path, cache: Path, top: str, packed: bool) -> None:
    root = tmp_path / "src" / top
    written = write_class_folders(root, {"dog": (3, 1), "cat": (2, 2), "ant": (4, 1)})
    (tmp_path / "src/.DS_Store").write_bytes(b"junk")
    (root / "train/cat/.hidden.png").write_bytes(b"junk")
    (root / "README").write_text("files beside train/ and test/ are ignored")
    spec = pack(tmp_path / "src", tmp_path / "pets.tgz") if packed else tmp_path / "src"
    s = load(spec, cache)

    assert s.classes == ["ant", "cat", "dog"]
    for split in ("train", "test"):
        images, labels = zip(*written[split], strict=True)
        assert np.array_equal(getattr(s, f"{split}_images"), np.stack(images))
        assert getattr(s, f"{split}_labels").tolist() == list(labels)
        assert getattr(s, f"{split}_labels").dtype == np.int64


def test_class_folders_convert_to_rgb(tmp_path: Path, cache: Path) -> None:
    write_class_folders(tmp_path, {"a": (1, 1)})
    Image.new("L", (32, 32), 77).save(tmp_path / "train/a/grey.jpg")
    s = load(tmp_path, cache)
    assert (s.train_images[1] == 77).all()


@pytest.mark.parametrize("fault, file, message", [
    ("size", "train/cat/big.png", "image is 33x32, expected 32x32"),
    ("not an image", "test/dog/notes.png", "not an image$"),
    ("truncated", "test/dog/cut.png", r"damaged image \(image file is truncated"),
    ("too deep", "train/cat/more/00.png", "expected train/<class>/<image>"),
])
def test_class_folder_faults_are_named(tmp_path: Path, cache: Path, fault: str, file: str,
                                       message: str) -> None:
    write_class_folders(tmp_path / "src", {"cat": (1, 1), "dog": (1, 1)})
    path = tmp_path / "src" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    if fault == "not an image":
        path.write_text("hello")
    elif fault == "truncated":
        Image.new("RGB", (32, 32)).save(path)
        path.write_bytes(path.read_bytes()[:-30])
    else:
        Image.new("RGB", (33 if fault == "size" else 32, 32)).save(path)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {message}"):
        load(tmp_path / "src", cache)
    archive = pack(tmp_path / "src", tmp_path / "src.tar.gz")
    with pytest.raises(DataError, match=f"^{re.escape(f'{archive}/{file}')}: {message}"):
        load(archive, cache)


def test_class_sets_must_match(tmp_path: Path, cache: Path) -> None:
    write_class_folders(tmp_path, {"cat": (1, 1), "dog": (1, 0), "eel": (0, 1)})
    with pytest.raises(DataError, match="only in train: dog; only in test: eel"):
        load(tmp_path, cache)


# --- download ---------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A quiet HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_md5(tmp_path: Path, server: tuple[str, Path]) -> None:
    url, www = server
    (www / "blob.bin").write_bytes(os.urandom(3_000_000))
    dest = tmp_path / "got/blob.bin"

    assert store.download(f"{url}/blob.bin", dest, md5(www / "blob.bin"), progress=False) == dest
    assert dest.read_bytes() == (www / "blob.bin").read_bytes()

    bad = tmp_path / "bad/blob.bin"
    with pytest.raises(DataError, match="blob.bin: downloaded file has md5 .*expected 0{32}"):
        store.download(f"{url}/blob.bin", bad, "0" * 32, progress=False)
    assert list(bad.parent.iterdir()) == []


def test_download_failure_says_what_to_place_where(tmp_path: Path,
                                                   server: tuple[str, Path]) -> None:
    url, _ = server
    with pytest.raises(DataError, match=f"cannot download {re.escape(url)}/none\\.tar\\.gz "
                                        r"\(HTTP Error 404: File not found\); to work offline, "
                                        f"place none\\.tar\\.gz in {re.escape(str(tmp_path))}$"):
        store.download(f"{url}/none.tar.gz", tmp_path / "none.tar.gz", "0" * 32, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.tar.gz"
    with pytest.raises(DataError, match=f"cannot download {re.escape(closed)} "):
        store.download(closed, tmp_path / "x.tar.gz", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_a_server_that_never_answers_fails_the_download_in_its_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "DOWNLOAD_TIMEOUT", 0.5)
    with socket.socket() as s:  # listens, so the connection opens, but never replies
        s.bind(("127.0.0.1", 0))
        s.listen()
        silent = f"http://127.0.0.1:{s.getsockname()[1]}/x.tar.gz"
        with pytest.raises(DataError, match=f"cannot download {re.escape(silent)} .*timed out"):
            store.download(silent, tmp_path / "x.tar.gz", "0" * 32, progress=False)
    assert not (tmp_path / "x.tar.gz").exists()


def test_cifar10_from_mirror(tmp_path: Path, cache: Path, server: tuple[str, Path],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, www = server
    files = write_cifar10(tmp_path / "src")
    archive = pack(tmp_path / "src", www / "cifar-10-python.tar.gz")
    monkeypatch.setitem(store.MD5, "cifar10", md5(archive))
    monkeypatch.setenv("RESNET_STUDY_MIRROR", url + "/")

    s = load("cifar10", cache)
    assert s.name == "cifar10" and s.classes == CIFAR10_CLASSES
    assert s.test_labels.tolist() == files["test_batch"][b"labels"]
    assert md5(cache / "cifar-10-python.tar.gz") == md5(archive)
    assert (cache / "decoded" / f"cifar10-{md5(archive)}.npz").exists()


def test_existing_archive_with_wrong_md5(cache: Path) -> None:
    cache.mkdir()
    (cache / "cifar-100-python.tar.gz").write_bytes(b"half a file")
    with pytest.raises(DataError, match="cifar-100-python.tar.gz: md5 is .*delete it"):
        load("cifar100", cache)


def test_data_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RESNET_STUDY_DATA", str(tmp_path))
    assert store.data_cache_dir() == tmp_path
    monkeypatch.delenv("RESNET_STUDY_DATA")
    assert store.data_cache_dir() == Path.home() / ".cache/resnet-study"


# --- the decoded cache ------------------------------------------------------------------------

def test_second_load_reads_the_cache(tmp_path: Path, cache: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write_class_folders(tmp_path / "src", {"a": (2, 1), "b": (1, 1)})
    first = load(tmp_path / "src", cache)
    [npz] = (cache / "decoded").glob("src-*.npz")

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(store, "read_tree", no_decoding)
        second = load(tmp_path / "src", cache)
    assert same(second, first)

    npz.write_bytes(b"not a zip file")  # a damaged cache is decoded again and rewritten
    third = load(tmp_path / "src", cache)
    assert np.array_equal(third.train_images, first.train_images)
    assert np.load(npz)["train_images"].shape == (3, 3, 32, 32)

    arrays = dict(np.load(npz))  # so is a readable cache that holds nonsense
    np.savez(npz, **{**arrays, "train_labels": arrays["train_labels"] + 5})
    assert np.array_equal(load(tmp_path / "src", cache).train_labels, first.train_labels)

    (tmp_path / "src/train/a/00.png").unlink()  # a changed source is decoded again
    assert len(load(tmp_path / "src", cache).train_images) == 2
    assert len(list((cache / "decoded").glob("src-*.npz"))) == 2


def test_cache_keeps_superclasses(tmp_path: Path, cache: Path) -> None:
    write_cifar100(tmp_path / "src")
    first, second = load(tmp_path / "src", cache), load(tmp_path / "src", cache)
    assert len(list((cache / "decoded").iterdir())) == 1
    assert same(first, second) and second.superclasses == [f"coarse{i}" for i in range(20)]


def same(a: ImageSet, b: ImageSet) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(vars(a).values(), vars(b).values(), strict=True))


# --- synthetic --------------------------------------------------------------------------------

def test_synthetic_is_deterministic(cache: Path) -> None:
    a, b = load("synthetic", cache), load("synthetic", cache)
    assert a.name == "synthetic" and a.classes == [f"class{i}" for i in range(10)]
    for split, n in (("train", 5000), ("test", 1000)):
        images, labels = getattr(a, f"{split}_images"), getattr(a, f"{split}_labels")
        assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert set(labels.tolist()) == set(range(10))
        assert np.array_equal(images, getattr(b, f"{split}_images"))
        assert np.array_equal(labels, getattr(b, f"{split}_labels"))
    assert not np.array_equal(a.train_images[:1000], a.test_images)
    assert not cache.exists()


# --- split and normalization ------------------------------------------------------------------

def test_split() -> None:
    images = np.arange(100, dtype=np.uint8).reshape(100, 1)
    labels = np.arange(100)
    (held_x, held_y), (rest_x, rest_y) = split_images(images, labels, 30, seed=4)
    assert len(held_y) == 30 and len(rest_y) == 70
    assert set(held_y) | set(rest_y) == set(range(100)) and not set(held_y) & set(rest_y)
    assert np.array_equal(held_x[:, 0], held_y) and np.array_equal(rest_x[:, 0], rest_y)
    assert (np.diff(held_y) > 0).all() and (np.diff(rest_y) > 0).all()
    assert np.array_equal(split_images(images, labels, 30, seed=4)[0][1], held_y)
    assert not np.array_equal(split_images(images, labels, 30, seed=5)[0][1], held_y)
    with pytest.raises(DataError, match="cannot take 101 images from a set of 100"):
        split_images(images, labels, 101, seed=0)


def test_normalization() -> None:
    images = np.random.default_rng(3).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    channel_std = images.std(axis=(0, 2, 3)).reshape(3, 1, 1)

    mean, std = normalization(images, "pixel")
    assert mean.shape == (3, 32, 32) and std.shape == (3, 1, 1)
    assert mean.dtype == std.dtype == torch.float32
    assert np.allclose(mean.numpy(), images.mean(axis=0), rtol=0, atol=1e-4)
    assert np.allclose(std.numpy(), channel_std, rtol=1e-6)

    mean, std = normalization(images, "channel")
    assert mean.shape == (3, 1, 1)
    assert np.allclose(mean.numpy(), images.mean(axis=(0, 2, 3)).reshape(3, 1, 1), rtol=1e-6)
    assert np.allclose(std.numpy(), channel_std, rtol=1e-6)


# --- DeviceLoader -----------------------------------------------------------------------------

def make_loader(n: int = 10, batch_size: int = 4, **kwargs: object) -> DeviceLoader:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    mean, std = normalization(images, "pixel")
    kwargs = {"augment": True, **kwargs}
    return DeviceLoader(images, rng.integers(0, 7, n), batch_size=batch_size, device="cpu",
                        mean=mean, std=std, **kwargs)


def batches(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def test_batch_shapes_and_partial_last_batch() -> None:
    loader = make_loader()
    assert len(loader) == 3 and loader.num_images == 10
    got = batches(loader, 0)
    assert [len(y) for _, y in got] == [4, 4, 2]
    for x, y in got:
        assert x.shape == (len(y), 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64
    assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(loader.labels.tolist())
    x, _ = batches(make_loader(channels_last=False), 0)[0]
    assert x.is_contiguous()


@pytest.mark.parametrize("padding_mode, np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_padding(padding_mode: str, np_mode: str) -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    loader = make_loader(padding_mode=padding_mode)
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)), mode=np_mode)
    assert np.array_equal(loader.images.permute(0, 3, 1, 2).numpy(), padded)  # stored NHWC


def test_crops_and_flips() -> None:
    loader = make_loader(n=50)
    g = loader.generator(0)
    idx = torch.arange(50).repeat(80)  # 4,000 draws
    x, dx, dy, flip = loader.augment_batch(idx, g)
    assert x.shape == (4000, 3, 32, 32) and x.dtype == torch.uint8
    assert set(dx.tolist()) == set(dy.tolist()) == set(range(9))
    assert 0.4 < flip.float().mean().item() < 0.6
    for i in [*range(20), *torch.nonzero(flip)[:5, 0].tolist()]:
        padded = loader.images[idx[i]].permute(2, 0, 1)  # stored NHWC
        crop = padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(x[i], crop.flip(-1) if flip[i] else crop)


def test_epoch_is_a_function_of_seed_and_epoch() -> None:
    loader = make_loader(n=50, batch_size=16)
    first, again = batches(loader, 3), batches(make_loader(n=50, batch_size=16), 3)
    assert all(torch.equal(a, b) for (xa, ya), (xb, yb) in zip(first, again, strict=True)
               for a, b in ((xa, xb), (ya, yb)))
    assert not torch.equal(batches(loader, 4)[0][1], first[0][1])
    assert not torch.equal(batches(make_loader(n=50, batch_size=16, seed=1), 3)[0][0],
                           first[0][0])

    # the batches are exactly: shuffle, then crop and flip each batch, all from one generator
    g = loader.generator(3)
    order = torch.randperm(50, generator=g)
    for (x, y), idx in zip(first, order.split(16), strict=True):
        mean, std = loader.mean.permute(2, 0, 1), loader.std.permute(2, 0, 1)  # stored HWC
        expected = (loader.augment_batch(idx, g)[0].float() - mean) / std
        assert torch.equal(x, expected) and torch.equal(y, loader.labels[idx])


def test_test_loader_is_plain_and_in_order() -> None:
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 3, 9)
    mean, std = normalization(images, "channel")
    loader = DeviceLoader(images, labels, batch_size=4, device="cpu", mean=mean, std=std,
                          augment=False)
    got = batches(loader, 7)
    x = torch.cat([x for x, _ in got])
    assert torch.equal(x, (torch.from_numpy(images).float() - mean) / std)
    assert torch.cat([y for _, y in got]).tolist() == labels.tolist()


def mixing_loader(batch_size: int = 8, **kwargs: object) -> DeviceLoader:
    """Eight images of eight classes, so that a soft target names both images it mixes."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    mean, std = normalization(images, "pixel")
    return DeviceLoader(images, np.arange(8), batch_size=batch_size, device="cpu", mean=mean,
                        std=std, augment=True, **kwargs)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_blends_each_image_with_a_partner_in_its_targets_share(kind: str) -> None:
    """Each served image is its own augmented image mixed with another of the same batch, in
    the share its soft target gives each label: blended throughout (mixup), or a box of the
    other's pixels of that share of the image (CutMix); one share per batch."""
    for epoch in range(3):
        plain, labels = batches(mixing_loader(), epoch)[0]  # the same shuffle and crops
        x, target = batches(mixing_loader(mix=Mixing(**{kind: 1.0}, classes=8)), epoch)[0]
        assert target.shape == (8, 8) and torch.allclose(target.sum(1), torch.ones(8))
        shares = set()
        for i, own in enumerate(labels.tolist()):
            share = float(target[i, own])
            partner = [c for c in range(8) if c != own and target[i, c] > 0]
            if not partner:  # paired with itself
                assert torch.allclose(x[i], plain[i], atol=1e-5)
                continue
            j = labels.tolist().index(partner[0])
            assert target[i, partner[0]] == pytest.approx(1 - share)
            if kind == "mixup":
                shares.add(round(share, 5))
                assert torch.allclose(x[i], share * plain[i] + (1 - share) * plain[j],
                                      atol=1e-4)
            else:
                taken = (x[i] != plain[i]).any(0)  # the pixels from the partner
                assert torch.equal(x[i][:, taken], plain[j][:, taken])
                assert int(taken.sum()) == round((1 - share) * 32 * 32)
        assert len(shares) <= 1


def test_mixed_epochs_resume_exactly_and_split_over_ranks_as_one_process() -> None:
    mix = Mixing(mixup=0.4, cutmix=1.0, classes=8)
    whole = batches(mixing_loader(mix=mix, batch_size=2), 1)
    resumed = list(mixing_loader(mix=mix, batch_size=2).epoch(1, start=2))
    assert all(torch.equal(a, b) for (xa, ta), (xb, tb) in zip(whole[2:], resumed, strict=True)
               for a, b in ((xa, xb), (ta, tb)))
    ranks = [batches(mixing_loader(mix=mix, batch_size=2, rank=r, world=2), 1) for r in (0, 1)]
    for (x, t), (x0, t0), (x1, t1) in zip(whole, *ranks, strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(t, torch.cat([t0, t1]))


# --- the real CIFAR-10 images, when present ---------------------------------------------------

# Both tests read it through the session's data cache: decoded once (15 s), not once each.

@pytest.mark.slow
def test_cifar10_jpeg(standin: Path) -> None:
    s = load_images(str(standin), progress=False)
    assert s.name == "cifar10-jpeg" and s.classes == CIFAR10_CLASSES
    assert s.train_images.shape == (50_000, 3, 32, 32)
    assert s.test_images.shape == (10_000, 3, 32, 32)
    assert np.bincount(s.train_labels).tolist() == [5000] * 10
    assert np.bincount(s.test_labels).tolist() == [1000] * 10
    mean = s.train_images.mean(axis=(0, 2, 3))
    assert np.allclose(mean, [125.27, 122.93, 113.86], rtol=0, atol=0.5)


@pytest.mark.slow
def test_learns_real_images(tmp_path: Path, standin: Path) -> None:
    """The paper's recipe on 2,500 real CIFAR-10 images (the JPEG stand-in), two epochs, tested
    on 2,000 of its test images.

    Measured 0.294 and 0.3215 top-1 (seeds 0 and 1) on 2026-12-07, chance 0.10 (5,000 images
    gave 0.3645 and cost the suite 12 s more); the bar leaves room for seed and machine noise
    while still failing for a broken crop, label order or normalisation.
    """
    exp = PRESETS.get("resnet18-lr0.01").replace(
        data=str(standin), subset=2500, test_subset=2000, batch_size=128, epochs=2,
        eval_batch_size=1000)
    assert train(exp, tmp_path, quiet=True)["test_top1"] > 0.22
