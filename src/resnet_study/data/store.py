"""Images in: find, fetch, check and decode a data set, once.

A data set is named (cifar100, cifar10: downloaded from the official mirror and checked by md5;
synthetic) or given as a folder or tar archive. Whatever its source (`sources`), it is decoded
once into an `ImageSet` and kept as an uncompressed `.npz` in the cache, so later runs start in
about a second; `loader` then feeds it from the device.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import numpy as np
from tqdm import tqdm

from ..files import atomic_open
from .sources import ImageSet, read_tree, synthetic
from .tree import DataError, archive_tree, folder_tree

ARCHIVES = {"cifar100": "cifar-100-python.tar.gz", "cifar10": "cifar-10-python.tar.gz"}
MD5 = {"cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
       "cifar10": "c58f30108f718f92721af3b95e74349a"}
DEFAULT_MIRROR = "https://www.cs.toronto.edu/~kriz"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Seconds a download waits for the server to connect or send its next bytes: a machine whose
# network drops packets fails in that time rather than hanging before a study's first run.
DOWNLOAD_TIMEOUT = 20


def data_cache_dir() -> Path:
    return Path(os.environ.get("RESNET_STUDY_DATA") or "~/.cache/resnet-study").expanduser()


def load_images(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> ImageSet:
    """`spec` is cifar100, cifar10, synthetic, or a folder or tar archive holding images."""
    if spec == "synthetic":
        return synthetic()
    decoded = (cache_dir or data_cache_dir()) / "decoded"
    if spec in ARCHIVES:
        def decode() -> ImageSet:
            archive = _official_archive(spec, decoded.parent, progress)
            return read_tree(archive_tree(archive), spec, progress)
        return _cached(decoded / f"{spec}-{MD5[spec]}.npz", spec, decode)

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: does not exist (give cifar100, cifar10, synthetic, "
                        "a folder, or a .tar.gz, .tgz or .tar archive)")
    if path.is_file() and not path.name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{path}: not a folder or a .tar.gz, .tgz or .tar archive")
    name = _stem(path)
    tree = archive_tree if path.is_file() else folder_tree
    return _cached(decoded / f"{name}-{_fingerprint(path)}.npz", name,
                   lambda: read_tree(tree(path), name, progress))


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
    s.validate(str(npz))
    return s


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
