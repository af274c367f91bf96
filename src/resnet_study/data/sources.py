"""Where images come from: the official CIFAR "python version" files, class folders of
image files, either as a folder or as a tar archive, and a synthetic set for tests and demos.
Each is read into one `ImageSet` of uint8 NCHW arrays.

User files are untrusted. A folder's or archive's files come from `tree`, which holds each to a
size bound before it is read and never extracts an archive; pickles go through an unpickler that
can build numpy arrays and nothing else, and every fault becomes a one-line `DataError` that
names the file.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from .tree import SIZE, DataError, Tree

EXPECTED_LAYOUTS = ("expected cifar-100-python/{train,test,meta}, "
                    "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, "
                    "or train/<class>/<image> and test/<class>/<image>, "
                    "at the top or inside one top folder")


@dataclass
class ImageSet:
    """Decoded, validated splits."""

    name: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    superclasses: list[str] | None = None
    train_coarse: np.ndarray | None = None
    test_coarse: np.ndarray | None = None

    def groups(self) -> tuple[np.ndarray, list[str]]:
        """Each class's group and the group names: CIFAR-100's superclasses where the data
        has them, else every class its own group."""
        if self.superclasses is None:
            return np.arange(len(self.classes)), self.classes
        fine_to_coarse = np.zeros(len(self.classes), dtype=np.int64)
        fine_to_coarse[self.train_labels] = self.train_coarse
        return fine_to_coarse, self.superclasses

    def validate(self, where: str) -> None:
        """Every image 3x32x32 uint8, every label a class: the decoded cache is outside our
        control too, so it is checked as strictly as the files it came from."""
        coarse = {"train": self.train_coarse, "test": self.test_coarse}
        for split, images, labels in (("train", self.train_images, self.train_labels),
                                      ("test", self.test_images, self.test_labels)):
            if not (images.dtype == np.uint8 and images.ndim == 4
                    and images.shape[1:] == (3, SIZE, SIZE) and len(images)):
                raise DataError(f"{where}: {split} images must be uint8 of shape (N, 3, 32, 32) "
                                f"with N > 0, not {images.dtype} of shape {images.shape}")
            _labels(where, f"{split} labels", labels, len(images), len(self.classes))
            if self.superclasses is not None:
                _labels(where, f"{split} coarse labels", coarse[split], len(images),
                        len(self.superclasses))


# --- a folder's or archive's files as an image set ---------------------------------------

def read_tree(tree: Tree, name: str, progress: bool) -> ImageSet:
    names = tree.files.keys()
    if not names:
        raise DataError(f"{tree.root}: holds no files; {EXPECTED_LAYOUTS}")
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    for root in [""] + [f"{top}/" for top in tops if len(tops) == 1]:
        if {f"{root}train", f"{root}test", f"{root}meta"} <= names:
            return _read_cifar100(tree, root, name)
        if f"{root}batches.meta" in names:
            return _read_cifar10(tree, root, name)
        if all(any(n.startswith(f"{root}{s}/") for n in names) for s in ("train", "test")):
            return _read_class_folders(tree, root, name, progress)
    raise DataError(f"{tree.root}: no recognizable layout; {EXPECTED_LAYOUTS}")


# --- the official "python version" files ------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other callable."""

    # numpy's own pickling names the `_reconstruct` of whichever numpy is installed
    _reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol 2
    }

    def __init__(self, file: IO[bytes], name: str) -> None:
        super().__init__(file, encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"{self.name}: refusing to unpickle {module}.{name} "
                            "(not a CIFAR data file)")
        return self.ALLOWED[module, name]


def read_pickle(path_or_bytes: Path | str | bytes, name: str) -> Any:
    """Unpickle a CIFAR file safely; a dict's bytes keys come back as str."""
    try:
        if isinstance(path_or_bytes, bytes):
            obj = _ArrayUnpickler(io.BytesIO(path_or_bytes), name).load()
        else:
            with open(path_or_bytes, "rb") as f:
                obj = _ArrayUnpickler(f, name).load()
    except DataError:
        raise
    except Exception as e:  # a damaged pickle can fail in any of a dozen ways
        raise DataError(f"{name}: truncated or corrupt pickle ({type(e).__name__})") from None
    if isinstance(obj, dict):
        obj = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


def _read_dict(tree: Tree, rel: str, keys: tuple[str, ...]) -> dict[str, Any]:
    d = read_pickle(tree.read(rel), tree.where(rel))
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise DataError(f"{tree.where(rel)}: no {', '.join(missing)} (not a CIFAR data file)")
    return d


def _label_names(tree: Tree, rel: str, d: dict[str, Any], key: str) -> list[str]:
    names = d[key]
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, bytes | str) for n in names)):
        raise DataError(f"{tree.where(rel)}: {key} must be a non-empty list of names")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def _labels(where: str, key: str, labels: Any, count: int, num_classes: int) -> np.ndarray:
    try:
        y = np.asarray(labels)
    except ValueError:  # ragged nested lists
        y = np.zeros(0, dtype=object)
    if y.dtype.kind not in "iu" or y.shape != (count,):
        raise DataError(f"{where}: {key} must be {count} integers, one per image, "
                        f"not {y.dtype} of shape {y.shape}")
    if count and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: {key} must lie in [0, {num_classes}), "
                        f"found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def _read_batch(tree: Tree, rel: str, num_classes: dict[str, int]) -> list[np.ndarray]:
    """Images (N, 3, 32, 32), then the labels under each key of `num_classes`."""
    where = tree.where(rel)
    d = _read_dict(tree, rel, ("data", *num_classes))
    data = d["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * SIZE * SIZE and len(data)):
        got = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else "no array"
        raise DataError(f"{where}: data must be uint8 of shape (N, {3 * SIZE * SIZE}), not {got}")
    labels = [_labels(where, k, d[k], len(data), n) for k, n in num_classes.items()]
    return [data.reshape(-1, 3, SIZE, SIZE), *labels]  # rows are R plane, G plane, B plane


def _read_cifar100(tree: Tree, root: str, name: str) -> ImageSet:
    meta = _read_dict(tree, f"{root}meta", ("fine_label_names", "coarse_label_names"))
    classes = _label_names(tree, f"{root}meta", meta, "fine_label_names")
    superclasses = _label_names(tree, f"{root}meta", meta, "coarse_label_names")
    counts = {"fine_labels": len(classes), "coarse_labels": len(superclasses)}
    train, train_y, train_coarse = _read_batch(tree, f"{root}train", counts)
    test, test_y, test_coarse = _read_batch(tree, f"{root}test", counts)
    return ImageSet(name, classes, train, train_y, test, test_y,
                    superclasses, train_coarse, test_coarse)


def _read_cifar10(tree: Tree, root: str, name: str) -> ImageSet:
    meta = _read_dict(tree, f"{root}batches.meta", ("label_names",))
    classes = _label_names(tree, f"{root}batches.meta", meta, "label_names")
    batches = [f"{root}data_batch_{i}" for i in range(1, 6)] + [f"{root}test_batch"]
    missing = [b for b in batches if b not in tree.files]
    if missing:
        raise DataError(f"{tree.where(missing[0])}: missing (CIFAR-10 needs data_batch_1..5 "
                        "and test_batch beside batches.meta)")
    parts = [_read_batch(tree, b, {"labels": len(classes)}) for b in batches]
    train = np.concatenate([images for images, _ in parts[:5]])
    train_y = np.concatenate([labels for _, labels in parts[:5]])
    test, test_y = parts[5]
    return ImageSet(name, classes, train, train_y, test, test_y)


# --- class folders ----------------------------------------------------------------------------

def _read_class_folders(tree: Tree, root: str, name: str, progress: bool) -> ImageSet:
    found: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}  # split -> class -> files
    for rel in tree.files:
        split, _, rest = rel.removeprefix(root).partition("/")
        if split in found:
            if rest.count("/") != 1:
                raise DataError(f"{tree.where(rel)}: expected {split}/<class>/<image>")
            cls, _ = rest.split("/")
            found[split].setdefault(cls, []).append(rel)
    train_only = sorted(found["train"].keys() - found["test"].keys())
    test_only = sorted(found["test"].keys() - found["train"].keys())
    if train_only or test_only:
        raise DataError(f"{tree.where(root)}: train and test hold different classes "
                        f"(only in train: {', '.join(train_only) or 'none'}; "
                        f"only in test: {', '.join(test_only) or 'none'})")
    classes = sorted(found["train"])

    total = sum(len(files) for by_class in found.values() for files in by_class.values())
    with tqdm(total=total, desc=f"decoding {name}", unit="img", disable=not progress) as bar:
        splits = []
        for by_class in found.values():
            files = [(rel, label) for label, c in enumerate(classes) for rel in by_class[c]]
            images = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)
            for i, (rel, _) in enumerate(files):
                images[i] = tree.image(rel)
                bar.update()
            splits += [images, np.array([label for _, label in files], dtype=np.int64)]
    return ImageSet(name, classes, *splits)


# --- synthetic data ---------------------------------------------------------------------------

def synthetic() -> ImageSet:
    """Ten coloured shapes at random places on noise: a CNN learns it in an epoch or two, yet no
    single pixel tells the class. Fixed seed, so every call returns the same arrays."""
    rng = np.random.default_rng(20240)
    yy, xx = np.mgrid[-1:1:14j, -1:1:14j]
    r = np.hypot(xx, yy)
    shapes = np.stack([
        r < 0.9,  # disk
        np.maximum(abs(xx), abs(yy)) < 0.8,  # square
        (r > 0.5) & (r < 0.95),  # ring
        np.minimum(abs(xx), abs(yy)) < 0.25,  # plus
        np.floor((yy + 1) * 2.5) % 2 == 0,  # horizontal stripes
        np.floor((xx + 1) * 2.5) % 2 == 0,  # vertical stripes
        abs(xx - yy) < 0.35,  # diagonal bar
        (yy > -0.8) & (abs(xx) < (yy + 0.8) / 1.8),  # triangle
        (np.floor((xx + 1) * 2) + np.floor((yy + 1) * 2)) % 2 == 0,  # checkerboard
        np.minimum(abs(xx - yy), abs(xx + yy)) < 0.3,  # X
    ])
    colours = np.array([[230, 60, 60], [60, 200, 60], [70, 90, 230], [230, 210, 50],
                        [200, 70, 200], [60, 210, 210], [240, 140, 40], [150, 90, 40],
                        [235, 235, 235], [120, 120, 255]])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        clean = np.empty((n, 3, SIZE, SIZE), dtype=np.int16)
        clean[:] = rng.integers(0, 110, (n, 3, 1, 1))  # a plain background colour
        k = shapes.shape[-1]
        top, left = (rng.integers(0, SIZE - k + 1, (n, 1)) for _ in range(2))
        rows = (top + np.arange(k))[:, None, :, None]
        cols = (left + np.arange(k))[:, None, None, :]
        at = np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None], rows, cols
        colour = colours[labels] + rng.integers(-30, 31, (n, 3))
        clean[at] = np.where(shapes[labels][:, None], colour[:, :, None, None], clean[at])
        noisy = clean + rng.integers(-40, 41, clean.shape, dtype=np.int16)
        return np.clip(noisy, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train, train_y = draw(5000)
    test, test_y = draw(1000)
    return ImageSet("synthetic", [f"class{i}" for i in range(10)], train, train_y, test, test_y)
