"""Images in, batches out: find, fetch, check and decode a data set, then feed it from the device.

Every data set, official or home-made, is decoded once into an `ImageSet` of uint8 NCHW arrays
and kept as an uncompressed `.npz` in the cache, so later runs start in about a second.
Training never touches the CPU per batch: `DeviceLoader` holds the whole split as one tensor on
the device and crops, flips and normalizes whole batches with tensor ops.

User files are untrusted. Pickles go through an unpickler that can build numpy arrays and
nothing else, archives are read member by member in memory and never extracted, and every fault
becomes a one-line `DataError` that names the file.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import io
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.error import HTTPError
from urllib.request import urlopen

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import UsageError
from .files import atomic_open

ARCHIVES = {"cifar100": "cifar-100-python.tar.gz", "cifar10": "cifar-10-python.tar.gz"}
MD5 = {"cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
       "cifar10": "c58f30108f718f92721af3b95e74349a"}
DEFAULT_MIRROR = "https://www.cs.toronto.edu/~kriz"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Seconds a download waits for the server to connect or send its next bytes: a machine whose
# network drops packets fails in that time rather than hanging before a study's first run.
DOWNLOAD_TIMEOUT = 20
SIZE = 32  # CIFAR images are 32x32; so must every image be
PAD = 4  # random-crop padding on each side, as in the ResNet paper's CIFAR recipe

EXPECTED_LAYOUTS = ("expected cifar-100-python/{train,test,meta}, "
                    "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, "
                    "or train/<class>/<image> and test/<class>/<image>, "
                    "at the top or inside one top folder")


class DataError(UsageError):
    """A fault in the user's data, reported as one line naming the file."""


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


def data_cache_dir() -> Path:
    return Path(os.environ.get("RESNET_STUDY_DATA") or "~/.cache/resnet-study").expanduser()


def load_images(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> ImageSet:
    """`spec` is cifar100, cifar10, synthetic, or a folder or tar archive holding images."""
    if spec == "synthetic":
        return _synthetic()
    decoded = (cache_dir or data_cache_dir()) / "decoded"
    if spec in ARCHIVES:
        def decode() -> ImageSet:
            archive = _official_archive(spec, decoded.parent, progress)
            return _read_tree(_archive_tree(archive), spec, progress)
        return _cached(decoded / f"{spec}-{MD5[spec]}.npz", spec, decode)

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: does not exist (give cifar100, cifar10, synthetic, "
                        "a folder, or a .tar.gz, .tgz or .tar archive)")
    if path.is_file() and not path.name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{path}: not a folder or a .tar.gz, .tgz or .tar archive")
    name = _stem(path)
    tree = _archive_tree if path.is_file() else _folder_tree
    return _cached(decoded / f"{name}-{_fingerprint(path)}.npz", name,
                   lambda: _read_tree(tree(path), name, progress))


# --- the decoded cache ------------------------------------------------------------------------

def _cached(npz: Path, name: str, decode: Callable[[], ImageSet]) -> ImageSet:
    if npz.exists():
        try:
            return _load_npz(npz, name)
        except Exception:  # the cache is disposable: whatever is wrong with it, decode again
            pass
    images = decode()
    try:
        with atomic_open(npz) as f:
            np.savez(f, **_to_arrays(images))
    except OSError as e:
        raise DataError(f"{npz}: cannot write the decoded cache ({e.strerror}); "
                        "point RESNET_STUDY_DATA at a writable folder") from None
    return images


def _to_arrays(s: ImageSet) -> dict[str, np.ndarray]:
    arrays = {}
    for f in fields(s):
        value = getattr(s, f.name)
        if f.name != "name" and value is not None:
            arrays[f.name] = np.array(value, dtype=str) if isinstance(value, list) else value
    return arrays


def _load_npz(npz: Path, name: str) -> ImageSet:
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    names = {"classes", "superclasses"}
    s = ImageSet(name=name, **{k: v.tolist() if k in names else v for k, v in arrays.items()})
    _validate(s, str(npz))
    return s


def _validate(s: ImageSet, where: str) -> None:
    """The cache is outside our control too: check it as strictly as the files it came from."""
    coarse = {"train": s.train_coarse, "test": s.test_coarse}
    for split, images, labels in (("train", s.train_images, s.train_labels),
                                  ("test", s.test_images, s.test_labels)):
        if not (images.dtype == np.uint8 and images.ndim == 4
                and images.shape[1:] == (3, SIZE, SIZE) and len(images)):
            raise DataError(f"{where}: {split} images must be uint8 of shape (N, 3, 32, 32) with "
                            f"N > 0, not {images.dtype} of shape {images.shape}")
        _labels(where, f"{split} labels", labels, len(images), len(s.classes))
        if s.superclasses is not None:
            _labels(where, f"{split} coarse labels", coarse[split], len(images),
                    len(s.superclasses))


def _stem(path: Path) -> str:
    name = path.resolve().name
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _fingerprint(path: Path) -> str:
    """Changes whenever a file of `path` is added, removed, resized or touched."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --- download ---------------------------------------------------------------------------------

def _official_archive(spec: str, cache_dir: Path, progress: bool) -> Path:
    archive = cache_dir / ARCHIVES[spec]
    if not archive.exists():
        mirror = os.environ.get("RESNET_STUDY_MIRROR") or DEFAULT_MIRROR
        return download(f"{mirror.rstrip('/')}/{archive.name}", archive, MD5[spec],
                        progress=progress)
    with archive.open("rb") as f:
        md5 = hashlib.file_digest(f, "md5").hexdigest()
    if md5 != MD5[spec]:
        raise DataError(f"{archive}: md5 is {md5}, expected {MD5[spec]} (incomplete or another "
                        "file); delete it to download it again")
    return archive


def download(url: str, dest: Path, md5: str, *, progress: bool = True) -> Path:
    """Fetch `url` to `dest`; `dest` appears only once its md5 is right."""
    try:
        with urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, atomic_open(dest) as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.md5()
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != md5:
                raise DataError(f"{url}: downloaded file has md5 {digest.hexdigest()}, "
                                f"expected {md5}; not kept")
    except (OSError, http.client.HTTPException) as e:
        reason = e if isinstance(e, HTTPError) else getattr(e, "reason", e)
        raise DataError(f"cannot download {url} ({reason}); to work offline, "
                        f"place {dest.name} in {dest.parent}") from None
    return dest


# --- reading folders and archives -------------------------------------------------------------

@dataclass
class _Tree:
    """The regular, non-hidden files of a folder or archive, by relative POSIX path."""

    root: Path
    files: dict[str, Path | bytes]  # a folder's files are read when needed, an archive's at once

    def read(self, rel: str) -> bytes:
        f = self.files[rel]
        if isinstance(f, bytes):
            return f
        try:
            return f.read_bytes()
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror})") from None

    def where(self, rel: str) -> str:
        return f"{self.root}/{rel}"


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _folder_tree(root: Path) -> _Tree:
    files: dict[str, Path | bytes] = {}
    for p in sorted(root.rglob("*")):
        rel = PurePosixPath(p.relative_to(root).as_posix())
        if p.is_file() and not _hidden(rel):
            files[str(rel)] = p
    return _Tree(root, files)


def _archive_tree(path: Path) -> _Tree:
    """Stream the archive once; nothing is written to disk. A member that would escape an
    extraction folder (absolute path, '..', link) marks a hostile or broken archive: refused."""
    files: dict[str, Path | bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                rel = PurePosixPath(member.name)
                if rel.is_absolute() or ".." in rel.parts or member.issym() or member.islnk():
                    raise DataError(f"{path}: member {member.name!r} points outside the archive "
                                    "(absolute path, '..' or link); refusing the archive")
                if member.isfile() and not _hidden(rel):
                    files[str(rel)] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt archive ({e})") from None
    return _Tree(path, files)


def _read_tree(tree: _Tree, name: str, progress: bool) -> ImageSet:
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


def _read_dict(tree: _Tree, rel: str, keys: tuple[str, ...]) -> dict[str, Any]:
    d = read_pickle(tree.read(rel), tree.where(rel))
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise DataError(f"{tree.where(rel)}: no {', '.join(missing)} (not a CIFAR data file)")
    return d


def _label_names(tree: _Tree, rel: str, d: dict[str, Any], key: str) -> list[str]:
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


def _read_batch(tree: _Tree, rel: str, num_classes: dict[str, int]) -> list[np.ndarray]:
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


def _read_cifar100(tree: _Tree, root: str, name: str) -> ImageSet:
    meta = _read_dict(tree, f"{root}meta", ("fine_label_names", "coarse_label_names"))
    classes = _label_names(tree, f"{root}meta", meta, "fine_label_names")
    superclasses = _label_names(tree, f"{root}meta", meta, "coarse_label_names")
    counts = {"fine_labels": len(classes), "coarse_labels": len(superclasses)}
    train, train_y, train_coarse = _read_batch(tree, f"{root}train", counts)
    test, test_y, test_coarse = _read_batch(tree, f"{root}test", counts)
    return ImageSet(name, classes, train, train_y, test, test_y,
                    superclasses, train_coarse, test_coarse)


def _read_cifar10(tree: _Tree, root: str, name: str) -> ImageSet:
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

def _read_class_folders(tree: _Tree, root: str, name: str, progress: bool) -> ImageSet:
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
                images[i] = _decode_image(tree, rel)
                bar.update()
            splits += [images, np.array([label for _, label in files], dtype=np.int64)]
    return ImageSet(name, classes, *splits)


def _decode_image(tree: _Tree, rel: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(tree.read(rel))) as im:
            if im.size != (SIZE, SIZE):
                raise DataError(f"{tree.where(rel)}: image is {im.width}x{im.height}, "
                                f"expected {SIZE}x{SIZE}")
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except UnidentifiedImageError:
        raise DataError(f"{tree.where(rel)}: not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{tree.where(rel)}: damaged image ({e})") from None


# --- synthetic data ---------------------------------------------------------------------------

def _synthetic() -> ImageSet:
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


# --- splits and normalization -----------------------------------------------------------------

def split(images: np.ndarray, labels: np.ndarray, n: int,
          seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """First pair: n images drawn at random (seeded); second pair: the rest. Both keep the
    original order. Serves --val-split (held out = first pair) and --subset (train = first)."""
    if not 0 <= n <= len(images):
        raise DataError(f"cannot take {n} images from a set of {len(images)}")
    chosen = np.zeros(len(images), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(images))[:n]] = True
    return (images[chosen], labels[chosen]), (images[~chosen], labels[~chosen])


def normalization(train_images: np.ndarray, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) on the 0..255 scale for `(x - mean) / std`: mean is the training set's mean
    image (mode 'pixel', as in the paper) or its channel means (mode 'channel'), shape (3, 32, 32)
    or (3, 1, 1); std is always per channel, shape (3, 1, 1)."""
    if mode not in ("pixel", "channel"):
        raise ValueError(f"normalization mode must be pixel or channel, not {mode!r}")
    # uint8 pixels: a 256-bin histogram per channel gives exact moments without a float copy
    values = np.arange(256, dtype=np.float64)
    hist = np.stack([np.bincount(train_images[:, c].ravel(), minlength=256) for c in range(3)])
    p = hist / hist.sum(axis=1, keepdims=True)
    channel_mean = p @ values
    std = np.sqrt((p * (values - channel_mean[:, None]) ** 2).sum(axis=1))
    mean = (train_images.mean(axis=0, dtype=np.float64) if mode == "pixel"
            else channel_mean.reshape(3, 1, 1))
    return (torch.tensor(mean, dtype=torch.float32),
            torch.tensor(std.reshape(3, 1, 1), dtype=torch.float32))


# --- batches on the device --------------------------------------------------------------------

class DeviceLoader:
    """One split, resident on the device, served as normalized float batches.

    Each epoch's order, crops and flips come from a generator seeded by (seed, epoch) alone, so
    a resumed run sees exactly the batches it would have seen, with no loader state to save.
    Training loaders (augment=True) crop a random 32x32 window out of a copy padded by 4 pixels
    and flip it horizontally with probability 1/2; shuffle follows augment unless given.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 device: torch.device | str, mean: torch.Tensor, std: torch.Tensor,
                 augment: bool, padding_mode: str = "reflect", seed: int = 0,
                 shuffle: bool | None = None, channels_last: bool = True,
                 rank: int = 0, world: int = 1) -> None:
        if padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be reflect or zeros, not {padding_mode!r}")
        self.device = torch.device(device)
        images = torch.from_numpy(images)
        if augment:  # pad once, on the host, rather than every batch
            mode = "reflect" if padding_mode == "reflect" else "constant"
            images = torch.nn.functional.pad(images, (PAD,) * 4, mode=mode)
        # Stored NHWC: a crop is then one gather of whole pixels, and the batch comes out in
        # channels_last order, the format the model runs fastest in, with no transpose.
        self.images = images.permute(0, 2, 3, 1).contiguous().to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device, torch.int64)
        self.mean = mean.to(self.device, torch.float32).permute(1, 2, 0)  # HWC, as the images
        self.std = std.to(self.device, torch.float32).permute(1, 2, 0)
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = augment if shuffle is None else shuffle
        self.seed = seed
        self.channels_last = channels_last
        self.num_images = len(labels)
        # Distributed training: every rank draws the whole global batch (order, crops, flips)
        # and keeps its own slice of it, so the ranks together see what one process would.
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def generator(self, epoch: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch `start` on (a run resumed mid-epoch), exactly as an
        uninterrupted epoch would have served them."""
        g = self.generator(epoch)
        n = self.num_images
        order = (torch.randperm(n, generator=g, device=self.device) if self.shuffle
                 else torch.arange(n, device=self.device))
        for i, idx in enumerate(order.split(self.batch_size)):
            draws = self._draws(len(idx), g) if self.augment else None
            if i < start:  # the draws above keep the generator where the epoch had it
                continue
            mine = slice(len(idx) * self.rank // self.world,
                         len(idx) * (self.rank + 1) // self.world)
            idx = idx[mine]
            x = (self._crop_and_flip(idx, *(d[mine] for d in draws)) if self.augment
                 else self.images[idx])
            yield self.normalize(x), self.labels[idx]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images as the network takes them: normalised float NCHW, in the loader's
        memory format."""
        x = x.float().sub_(self.mean).div_(self.std).permute(0, 3, 1, 2)
        return x if self.channels_last else x.contiguous()

    def augment_batch(self, idx: torch.Tensor,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        """Crop and flip the padded images `idx`: uint8 (B, 3, 32, 32) images, the crop offsets
        dx, dy in [0, 8] and the flip flags, for tests to check."""
        dx, dy, flip = self._draws(len(idx), g)
        return self._crop_and_flip(idx, dx, dy, flip).permute(0, 3, 1, 2), dx, dy, flip

    def _draws(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        dev = self.device
        dx = torch.randint(0, 2 * PAD + 1, (b,), generator=g, device=dev)
        dy = torch.randint(0, 2 * PAD + 1, (b,), generator=g, device=dev)
        flip = torch.randint(0, 2, (b,), generator=g, device=dev).bool()
        return dx, dy, flip

    def _crop_and_flip(self, idx: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                       flip: torch.Tensor) -> torch.Tensor:
        """The crop and flip as one gather of pixels out of the batch's padded NHWC images."""
        b = len(idx)
        step = torch.arange(SIZE, device=self.device)
        rows = dy[:, None] + step
        cols = dx[:, None] + torch.where(flip[:, None], SIZE - 1 - step, step)
        width = SIZE + 2 * PAD
        pixel = (rows[:, :, None] * width + cols[:, None, :]).view(b, SIZE * SIZE, 1)
        padded = self.images[idx].view(b, width * width, 3)
        return padded.gather(1, pixel.expand(b, SIZE * SIZE, 3)).view(b, SIZE, SIZE, 3)
