"""A data set's files, from a folder or a tar archive, each refused by its declared size before
it is read.

A data path is untrusted, and an archive most of all: it is small on disk and may declare
anything. So turning a path into its files is kept apart from reading them as a data set: a
folder is walked, an archive streamed once in memory and never extracted, and every file, every
archive member and tarfile's own headers are held to a bound before a byte of them is read; an
archive's image files are decoded as they stream past (`decode_image`). The readers in
`sources` then take what is here by name, and never see a file over its bound.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UsageError

SIZE = 32  # CIFAR images are 32x32; so must every image be
# The files the official layouts read, at the top or inside one top folder.
CIFAR_FILES = frozenset({"train", "test", "meta", "batches.meta", "test_batch",
                         *(f"data_batch_{i}" for i in range(1, 6))})

# --- size bounds ------------------------------------------------------------------------------
# A compressed archive is small on disk and may declare anything: 2 MB of gzip holds 2 GiB of
# zeros. So every file is held to a bound by the size it declares, before a byte of it is read.

RAW_IMAGE_BYTES = 3 * SIZE * SIZE  # one image's pixels, uncompressed: 3,072 bytes
# An image file: a BMP or plain TIFF of 32x32 takes just over 3,072 bytes, a PNG of noise about
# 3,300; 64 times that leaves room for any format's metadata (ICC profile, EXIF, thumbnail).
MAX_IMAGE_BYTES = 64 * RAW_IMAGE_BYTES  # 196,608
# A CIFAR file stores each image's 3,072 bytes with its labels and file name, which take some 30
# to 40 bytes more in the official files; 128 is generous.
CIFAR_BYTES_PER_IMAGE = RAW_IMAGE_BYTES + 128
# A CIFAR file's batch label, dict and pickle framing, or a meta file's class names: a few KiB.
CIFAR_FILE_SLACK = 1 << 20
# The largest official file, CIFAR-100's train (155 MB), holds 50,000 images.
MAX_CIFAR_FILE_IMAGES = 50_000
MAX_CIFAR_FILE_BYTES = MAX_CIFAR_FILE_IMAGES * CIFAR_BYTES_PER_IMAGE + CIFAR_FILE_SLACK
# Each official set holds 60,000 images in all, train and test; every CIFAR file has its slack.
MAX_CIFAR_IMAGES = 60_000
MAX_CIFAR_BYTES = MAX_CIFAR_IMAGES * CIFAR_BYTES_PER_IMAGE + len(CIFAR_FILES) * CIFAR_FILE_SLACK
# The headers before a member's data: 512 bytes, and for a long name or extended attributes a
# long-name header or pax records of a few KiB. tarfile reads these whole, itself.
MAX_HEADER_BYTES = 1 << 20
# What a bound says when a file is over it, by the file's role (see `_role`).
BOUNDS = {"image": (MAX_IMAGE_BYTES, f"a {SIZE}x{SIZE} image file may take "
                                     f"({MAX_IMAGE_BYTES // RAW_IMAGE_BYTES}x its pixels)"),
          "cifar": (MAX_CIFAR_FILE_BYTES,
                    f"a CIFAR file of {MAX_CIFAR_FILE_IMAGES:,} images may take")}


class DataError(UsageError):
    """A fault in the user's data, reported as one line naming the file."""


@dataclass
class Tree:
    """The regular, non-hidden files of a folder or archive, by relative POSIX path. A folder's
    files are read when needed; an archive's as it streams past (see `_ArchiveReader`), its
    images decoded there and then, the members no reader reads kept by name only (None)."""

    root: Path
    files: dict[str, Path | bytes | None]
    images: dict[str, np.ndarray | str] = field(default_factory=dict)  # decoded, or its fault

    def read(self, rel: str) -> bytes:
        f = self.files[rel]
        if isinstance(f, bytes):
            return f
        if f is None:  # no layout reads such a member, so no reader asks for it
            raise DataError(f"{self.where(rel)}: not kept from the archive")
        try:
            _check_size(self.where(rel), _role(PurePosixPath(rel)), f.stat().st_size)
            return f.read_bytes()
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror})") from None

    def image(self, rel: str) -> np.ndarray:
        """An image as 3x32x32 uint8; its fault, if decoding it failed, as a `DataError`."""
        got = self.images.get(rel)
        if got is None:
            return decode_image(self.read(rel), self.where(rel))
        if isinstance(got, str):
            raise DataError(got)
        return got

    def where(self, rel: str) -> str:
        return f"{self.root}/{rel}"


def decode_image(data: bytes, where: str) -> np.ndarray:
    """An image file as 3x32x32 uint8, where the tree meets it: an archive's images are decoded
    as they stream past, so that none is held as its file."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (SIZE, SIZE):
                raise DataError(f"{where}: image is {im.width}x{im.height}, "
                                f"expected {SIZE}x{SIZE}")
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: damaged image ({e})") from None


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _role(rel: PurePosixPath) -> str:
    """What a layout would read the file as, from its place alone (the layout is known only
    once every name is): 'cifar', 'image' (<split>/<class>/<file>), or '' for neither."""
    parts = rel.parts
    if len(parts) <= 2 and parts[-1] in CIFAR_FILES:
        return "cifar"
    if len(parts) in (3, 4) and parts[-3] in ("train", "test"):
        return "image"
    return ""


def _check_size(where: str, role: str, size: int) -> None:
    if role in BOUNDS and size > BOUNDS[role][0]:
        bound, what = BOUNDS[role]
        raise DataError(f"{where}: declares {size:,} bytes, more than the {bound:,} {what}; "
                        "not read")


def folder_tree(root: Path) -> Tree:
    files: dict[str, Path | bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = PurePosixPath(p.relative_to(root).as_posix())
        if p.is_file() and not _hidden(rel):
            files[str(rel)] = p
    return Tree(root, files)


def archive_tree(path: Path) -> Tree:
    """Stream the archive once; nothing is written to disk, and nothing is read beyond what
    the bounds above allow (`_ArchiveReader`, `_Gate`). A member that would escape an extraction
    folder (absolute path, '..') or is a link marks a hostile or broken archive: refused."""
    try:
        with _decompressed(path) as raw:
            reader = _ArchiveReader(path, _Gate(raw, path))
            with tarfile.open(fileobj=reader.gate, mode="r|") as tar:
                for member in tar:
                    if kept := reader.admit(member):
                        reader.take(tar, member, *kept)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"{path}: truncated or corrupt archive ({e})") from None
    return reader.tree


# The compressions tarfile's "r|*" knows, by their magic bytes; anything else is read as a tar.
_COMPRESSIONS: tuple[tuple[bytes, Callable[..., IO[bytes]]], ...] = (
    (b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _decompressed(path: Path) -> IO[bytes]:
    """The archive's tar stream, decompressed here rather than by tarfile, so that `_Gate` sees
    every byte tarfile reads."""
    with path.open("rb") as f:
        head = f.read(6)
    opener = next((o for magic, o in _COMPRESSIONS if head.startswith(magic)), open)
    return opener(path, "rb")


class _Gate:
    """The tar stream as tarfile reads it, up to a limit that moves as members are admitted.
    tarfile reads a member's long-name header, pax records or sparse map whole, inside its own
    iteration, before the member reaches `_ArchiveReader.admit`: such a header that declares
    2 GiB is a size no check on members sees. So tarfile may read each admitted member's data,
    then MAX_HEADER_BYTES of the next member's headers, and no further."""

    def __init__(self, raw: IO[bytes], path: Path) -> None:
        self.raw, self.path = raw, path
        self.pos, self.limit, self.after = 0, MAX_HEADER_BYTES, ""

    def allow(self, member: tarfile.TarInfo) -> None:
        data = -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # padded to blocks
        self.limit = member.offset_data + data + MAX_HEADER_BYTES
        self.after = member.name

    def read(self, size: int) -> bytes:
        if size and self.pos >= self.limit:
            which = f"member after {self.after!r}" if self.after else "first member"
            raise DataError(f"{self.path}: the {which} has more than {MAX_HEADER_BYTES:,} bytes "
                            "of headers (long name, pax records or sparse map); not read")
        data = self.raw.read(min(size, self.limit - self.pos))
        self.pos += len(data)
        return data


class _ArchiveReader:
    """One pass over an archive's members. Each is checked by the size its header declares,
    before any of it is read, and kept only as its reader needs it: CIFAR files as bytes, images
    decoded at once (3,072 bytes each, whatever their files' size, so that many image files at
    the bound cannot add up), every other member by name only."""

    def __init__(self, path: Path, gate: _Gate) -> None:
        self.path, self.gate, self.tree = path, gate, Tree(path, {})
        self.declared = self.cifar = self.image_files = 0

    def admit(self, member: tarfile.TarInfo) -> tuple[str, str] | None:
        """Its name and role (see `_role`) once it passes the bounds, None for a member not
        kept (hidden, not a regular file); refuse the archive over it otherwise."""
        rel = PurePosixPath(member.name)
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"{self.path}: member {member.name!r} points outside the archive "
                            "(absolute path or '..'); refusing the archive")
        if member.islnk() or member.issym():
            raise DataError(f"{self.path}: member {member.name!r} {_link(member)}; "
                            "links are not read; refusing the archive")
        kept = member.isfile() and not _hidden(rel)
        role = _role(rel) if kept else ""
        where = self.tree.where(str(rel))
        _check_size(where, role, member.size)
        self.image_files += role == "image"
        self.cifar += member.size if role == "cifar" else 0
        if self.cifar > MAX_CIFAR_BYTES:
            raise DataError(f"{where}: the CIFAR files up to this one declare {self.cifar:,} "
                            f"bytes, more than the {MAX_CIFAR_BYTES:,} that "
                            f"{MAX_CIFAR_IMAGES:,} images may take; not read")
        # what the set's image files may take at their bound, or the CIFAR files at theirs;
        # skipped members (hidden, beside the layout) cost reading too, so they count
        self.declared += member.size
        budget = MAX_CIFAR_BYTES + self.image_files * MAX_IMAGE_BYTES
        if self.declared > budget:
            raise DataError(f"{where}: the members up to this one declare {self.declared:,} "
                            f"bytes, more than the {budget:,} that {self.image_files:,} image "
                            "files and the CIFAR files may take; not read")
        self.gate.allow(member)
        return (str(rel), role) if kept else None

    def take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, key: str, role: str) -> None:
        data = None
        if role:  # a regular file, which `admit` held to its bound
            data = tar.extractfile(member).read()
        if role == "image":
            try:
                self.tree.images[key] = decode_image(data, self.tree.where(key))
            except DataError as e:  # kept as text: the exception would keep `data` alive
                self.tree.images[key] = str(e)
            data = None
        self.tree.files[key] = data


def _link(member: tarfile.TarInfo) -> str:
    """'is a hard link (to ...)', or symbolic, saying whether the target leaves the archive."""
    kind = "hard link" if member.islnk() else "symbolic link"
    # a hard link names a member of the archive; a symbolic link, a path from its own folder
    start = "" if member.islnk() else posixpath.dirname(member.name)
    target = posixpath.normpath(posixpath.join(start, member.linkname))
    outside = target.startswith(("/", "../")) or target == ".."
    return f"is a {kind} (to {member.linkname!r}{', outside the archive' if outside else ''})"
