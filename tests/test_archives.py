"""Hostile archives (issue 18): every member is held to a bound by the size its header declares
before any of it is read, the members together to what the set's files need, tarfile's own
headers to a bound too, and each refusal is one line naming the member and the bound.

The archives are written here member by member. A member given no data is written as its header
alone, as if the archive were cut there: refused by what it declares, it is never read, or the
archive would be reported truncated. So a member that declares 2 GiB costs 512 bytes.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_study.cli import main
from resnet_study.data.sources import ImageSet
from resnet_study.data.store import load_images
from resnet_study.data.tree import (
    MAX_CIFAR_BYTES,
    MAX_CIFAR_FILE_BYTES,
    MAX_HEADER_BYTES,
    MAX_IMAGE_BYTES,
    DataError,
)

from .helpers import write_cifar10, write_class_folders

GIB2 = 2 << 30


def member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE,
           link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def png() -> bytes:
    f = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(f, "PNG")
    return f.getvalue()


def files(folder: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The files under folder as archive members, by their path below it."""
    return [(member(p.relative_to(folder).as_posix(), p.stat().st_size), p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()]


def tar_gz(archive: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A .tar.gz of members in order; one without data (None) is written as its header alone."""
    out = io.BytesIO()
    for info, data in members:
        info.size = info.size if data is None else len(data)
        out.write(info.tobuf(tarfile.GNU_FORMAT))
        if data is not None:
            out.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    out.write(bytes(2 * tarfile.BLOCKSIZE))
    archive.write_bytes(gzip.compress(out.getvalue(), compresslevel=1))
    return archive


def load(spec: Path) -> ImageSet:
    return load_images(str(spec), cache_dir=spec.parent / "cache", progress=False)


def refusal(spec: Path) -> str:
    """The one-line message the archive is refused with."""
    with pytest.raises(DataError) as e:
        load(spec)
    message = str(e.value)
    assert "\n" not in message
    return message


TEST_IMAGE = (member("test/cat/00.png"), png())


# --- one member, by its declared size ---------------------------------------------------------

def test_an_image_declaring_2_gib_is_refused_unread(tmp_path: Path) -> None:
    archive = tar_gz(tmp_path / "bomb.tar.gz", [TEST_IMAGE, (member("train/cat/00.png", GIB2),
                                                             None)])
    assert archive.stat().st_size < 1000
    assert refusal(archive) == (f"{archive}/train/cat/00.png: declares 2,147,483,648 bytes, "
                                "more than the 196,608 a 32x32 image file may take "
                                "(64x its pixels); not read")


@pytest.mark.parametrize("size, message", [
    (MAX_IMAGE_BYTES, "not an image$"),  # at the bound: read, then found not to be an image
    (MAX_IMAGE_BYTES + 1, "declares 196,609 bytes, more than the 196,608 a 32x32 image file"),
])
def test_the_image_bound_is_the_declared_size(tmp_path: Path, size: int, message: str) -> None:
    archive = tar_gz(tmp_path / "big.tar.gz", [(member("pets/test/cat/00.png"), png()),
                                               (member("pets/train/cat/00.png"), bytes(size))])
    assert re.search(f"^{re.escape(str(archive))}/pets/train/cat/00.png: {message}",
                     refusal(archive))


def test_a_folder_image_over_the_bound_is_not_read(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "src", {"cat": (1, 1)})
    (tmp_path / "src/train/cat/big.png").write_bytes(bytes(MAX_IMAGE_BYTES + 1))
    assert refusal(tmp_path / "src").startswith(
        f"{tmp_path}/src/train/cat/big.png: declares 196,609 bytes, more than the 196,608")


@pytest.mark.parametrize("size, message", [
    # about the size of CIFAR-100's train file (155 MB) passes, so its (absent) data is read
    (50_000 * 3_107, "truncated or corrupt archive"),
    (MAX_CIFAR_FILE_BYTES + 1, f"data_batch_1: declares {MAX_CIFAR_FILE_BYTES + 1:,} bytes, "
                               f"more than the {MAX_CIFAR_FILE_BYTES:,} a CIFAR file of 50,000 "
                               "images may take; not read"),
])
def test_a_cifar_file_is_held_to_the_largest_official_file(tmp_path: Path, size: int,
                                                           message: str) -> None:
    archive = tar_gz(tmp_path / "c10.tar.gz",
                     [(member("cifar-10-batches-py/data_batch_1", size), None)])
    assert message in refusal(archive)


# --- the members together ---------------------------------------------------------------------

def test_cifar_files_together_are_held_to_an_official_set(tmp_path: Path) -> None:
    test_size = MAX_CIFAR_BYTES - MAX_CIFAR_FILE_BYTES + 1  # each file under its own bound
    archive = tar_gz(tmp_path / "c100.tar.gz", [
        (member("cifar-100-python/test"), bytes(test_size)),
        (member("cifar-100-python/train", MAX_CIFAR_FILE_BYTES), None)])
    assert refusal(archive) == (
        f"{archive}/cifar-100-python/train: the CIFAR files up to this one declare "
        f"{MAX_CIFAR_BYTES + 1:,} bytes, more than the {MAX_CIFAR_BYTES:,} that 60,000 images "
        "may take; not read")


def test_skipped_members_count_towards_what_the_images_need(tmp_path: Path) -> None:
    """A hidden member is never kept, but streaming past it costs all it declares."""
    write_class_folders(tmp_path / "src", {"cat": (1, 1)})
    budget = MAX_CIFAR_BYTES + 2 * MAX_IMAGE_BYTES
    archive = tar_gz(tmp_path / "pets.tar.gz",
                     [*files(tmp_path / "src"), (member(".cache/blob", GIB2), None)])
    assert refusal(archive) == (
        f"{archive}/.cache/blob: the members up to this one declare "
        f"{GIB2 + sum(p.stat().st_size for p in (tmp_path / 'src').rglob('*.png')):,} bytes, "
        f"more than the {budget:,} that 2 image files and the CIFAR files may take; not read")


def test_image_files_are_not_held_as_they_stream(tmp_path: Path) -> None:
    """Many files at the bound, each decoded (here: found not to be images) as it streams past:
    reading them holds about one at a time, not all 200 (39 MB)."""
    members = [(member(f"train/cat/{i:03d}.png"), bytes(MAX_IMAGE_BYTES)) for i in range(200)]
    archive = tar_gz(tmp_path / "many.tar.gz", [TEST_IMAGE, *members])
    tracemalloc.start()
    try:
        assert refusal(archive).endswith("train/cat/000.png: not an image")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(members) * MAX_IMAGE_BYTES / 4


# --- tarfile's own headers --------------------------------------------------------------------

@pytest.mark.parametrize("before, which", [([], "first member"),
                                           ([TEST_IMAGE], "member after 'test/cat/00.png'")])
def test_a_long_name_header_past_its_bound_is_refused(tmp_path: Path, before: list,
                                                      which: str) -> None:
    """tarfile reads a long-name header whole, before the member it names reaches us."""
    long_name = member("././@LongLink", MAX_HEADER_BYTES + 1, tarfile.GNUTYPE_LONGNAME)
    archive = tar_gz(tmp_path / "long.tar.gz", [*before, (long_name, bytes(MAX_HEADER_BYTES + 1)),
                                                (member("train/cat/00.png"), png())])
    assert refusal(archive) == (f"{archive}: the {which} has more than 1,048,576 bytes of "
                                "headers (long name, pax records or sparse map); not read")


# --- links and escapes ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, target, says", [
    (tarfile.LNKTYPE, "train/cat/00.png", "is a hard link (to 'train/cat/00.png')"),
    (tarfile.LNKTYPE, "/etc/passwd", "is a hard link (to '/etc/passwd', outside the archive)"),
    (tarfile.SYMTYPE, "00.png", "is a symbolic link (to '00.png')"),
    (tarfile.SYMTYPE, "../../../etc/passwd",
     "is a symbolic link (to '../../../etc/passwd', outside the archive)"),
])
def test_links_are_named_for_what_they_are(tmp_path: Path, kind: bytes, target: str,
                                           says: str) -> None:
    archive = tar_gz(tmp_path / "links.tar.gz", [
        TEST_IMAGE, (member("train/cat/00.png"), png()),
        (member("train/cat/01.png", kind=kind, link=target), None)])
    assert refusal(archive) == (f"{archive}: member 'train/cat/01.png' {says}; links are not "
                                "read; refusing the archive")


def test_a_member_escaping_by_its_name_is_refused(tmp_path: Path) -> None:
    archive = tar_gz(tmp_path / "evil.tar.gz", [(member("../../etc/cron.d/evil"), b"x")])
    assert refusal(archive) == (f"{archive}: member '../../etc/cron.d/evil' points outside the "
                                "archive (absolute path or '..'); refusing the archive")


# --- what passes, and the command line --------------------------------------------------------

def test_official_layout_streams_through_the_bounds(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    s = load(tar_gz(tmp_path / "c10.tar.gz", files(tmp_path / "src")))
    assert s.train_images.shape == (50, 3, 32, 32) and s.test_images.shape == (20, 3, 32, 32)


def test_the_command_line_refuses_in_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    archive = tar_gz(tmp_path / "bomb.tar.gz", [TEST_IMAGE, (member("train/cat/00.png", GIB2),
                                                             None)])
    code = main(["train", "resnet18-lr0.01", "--epochs", "1", "--quiet", "--device", "cpu",
                 "--data", str(archive), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"resnet-study: error: {archive}/train/cat/00.png: declares 2,147,483,648 "
                   "bytes, more than the 196,608 a 32x32 image file may take (64x its pixels); "
                   "not read\n")
