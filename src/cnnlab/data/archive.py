"""Extract an untrusted zip / tar archive of ``<class>/<image>`` folders, or refuse it.

Downloaded archives are attacker-controlled, so extraction is two-phase:

1. *Plan*: read every member's header and refuse the whole archive on the first member that
   could write outside ``dest`` (absolute / ``..`` / Windows paths, links out of the tree),
   on special files, or when counts, declared sizes or zip compression ratios exceed limits.
2. *Write*: stream the regular files into a temporary sibling of ``dest``, counting the bytes
   actually produced (declared sizes can lie), and only then swap it in for ``dest``.

We never call ``TarFile.extract*`` / ``ZipFile.extract*``: file contents are streamed into files
we create ourselves, so no archive metadata (modes, setuid bits, owners, links, devices)
reaches the disk. Links that stay inside the tree are skipped rather than materialized: the
pipeline needs regular image files, and a tree without links cannot be used to escape later.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cnnlab.utils.files import staged_dir

__all__ = ["UnsafeArchiveError", "safe_extract"]

_CHUNK = 1 << 20
# Tiny members (headers, thumbnails) legitimately compress very well; only big ones can be bombs.
_RATIO_FLOOR = 1 << 20
_MAX_LINK_TARGET = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")
# Errors that mean "this archive is corrupt or truncated", as opposed to e.g. a full disk.
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
)


class UnsafeArchiveError(ValueError):
    """The archive is not a zip/tar, is corrupt, or could harm the machine if extracted."""


@dataclass(frozen=True)
class _Entry:
    rel: str  # normalized POSIX path relative to dest
    is_dir: bool
    open: Callable[[], IO[bytes]]


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_members: int,
    max_total_bytes: int,
    max_compression_ratio: float,
) -> list[Path]:
    """Extract a zip / tar / tar.gz / tgz / tar.bz2 / tar.xz archive into `dest` (returns extracted file paths).

    The format is detected from the content, not the name. Either the whole archive lands in
    ``dest`` (replacing what was there) or nothing changes: a refused or failing archive leaves
    an existing ``dest`` as it was. Raises UnsafeArchiveError naming the member and what to do.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with _reader(archive, max_members, max_compression_ratio) as members:
            entries = _plan(archive, members, max_total_bytes)
            with staged_dir(dest) as tmp:
                # mkdtemp makes it 0700; the final folder should be as readable as its parent.
                os.chmod(tmp, stat.S_IMODE(dest.parent.stat().st_mode) & 0o777)
                files = _write(archive, entries, tmp, max_total_bytes)
    except _CORRUPT as exc:
        raise UnsafeArchiveError(
            f"{archive} is corrupt or truncated ({type(exc).__name__}: {exc}); download it again"
        ) from exc
    return [dest / rel for rel in files]


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # "file" | "dir" | "symlink" | "hardlink" | "special"
    size: int
    link: str | None
    open: Callable[[], IO[bytes]]


@contextmanager
def _reader(archive: Path, max_members: int, max_ratio: float) -> Iterator[Iterator[_Member]]:
    if not archive.is_file():
        raise UnsafeArchiveError(f"{archive} does not exist or is not a file; check the download step")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield _zip_members(archive, zf, max_members, max_ratio)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, mode="r:*") as tf:
            yield _tar_members(archive, tf, max_members)
    else:
        raise UnsafeArchiveError(
            f"{archive} is not a zip or tar archive (tar.gz / tar.bz2 / tar.xz); check that the URL "
            "points at the archive itself"
        )


def _too_many(archive: Path, max_members: int) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{archive} has more than {max_members} members; refusing it as a possible archive bomb "
        "(raise download.max_members if the archive is legitimate)"
    )


def _zip_members(archive: Path, zf: zipfile.ZipFile, max_members: int, max_ratio: float) -> Iterator[_Member]:
    infos = zf.infolist()
    if len(infos) > max_members:
        raise _too_many(archive, max_members)
    for info in infos:
        name = info.filename
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"{archive}: member {name!r} is encrypted; use an unencrypted archive")
        if info.file_size > _RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
            raise UnsafeArchiveError(
                f"{archive}: member {name!r} expands {info.compress_size} -> {info.file_size} bytes "
                f"(ratio above {max_ratio:g}); refusing it as a possible zip bomb "
                "(raise download.max_compression_ratio if the archive is legitimate)"
            )
        mode = info.external_attr >> 16  # unix st_mode, when the zip was made on unix
        opener = _opener(zf, info)
        if stat.S_ISLNK(mode):
            with opener() as f:  # a zip symlink stores its target as the member's data
                target = f.read(_MAX_LINK_TARGET + 1)
            if len(target) > _MAX_LINK_TARGET:
                raise UnsafeArchiveError(f"{archive}: symlink {name!r} has an absurdly long target")
            yield _Member(name, "symlink", 0, target.decode("utf-8", "surrogateescape"), opener)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            yield _Member(name, "special", 0, None, opener)
        elif info.is_dir() or stat.S_ISDIR(mode):
            yield _Member(name, "dir", 0, None, opener)
        else:
            yield _Member(name, "file", info.file_size, None, opener)


def _opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: zf.open(info)


def _tar_members(archive: Path, tf: tarfile.TarFile, max_members: int) -> Iterator[_Member]:
    # Iterating (not getmembers()) lets a tar with millions of members be refused early.
    for count, m in enumerate(tf, start=1):
        if count > max_members:
            raise _too_many(archive, max_members)
        if m.isreg():
            yield _Member(m.name, "file", m.size, None, _tar_opener(tf, m))
        elif m.isdir():
            yield _Member(m.name, "dir", 0, None, _tar_opener(tf, m))
        elif m.issym():
            yield _Member(m.name, "symlink", 0, m.linkname, _tar_opener(tf, m))
        elif m.islnk():
            yield _Member(m.name, "hardlink", 0, m.linkname, _tar_opener(tf, m))
        else:  # character / block devices, fifos, unknown types
            yield _Member(m.name, "special", 0, None, _tar_opener(tf, m))


def _tar_opener(tf: tarfile.TarFile, m: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        f = tf.extractfile(m)
        if f is None:  # only regular files have data; the plan never asks for others
            raise UnsafeArchiveError(f"member {m.name!r} has no data")
        return f

    return open_member


# --- planning (all checks, nothing written) ---------------------------------------------------


def _check_name(archive: Path, name: str, what: str = "member") -> str:
    """Return ``name`` as a normalized relative POSIX path, or raise if it could leave dest."""
    if "\\" in name or _DRIVE.match(name):
        raise UnsafeArchiveError(
            f"{archive}: {what} {name!r} is a Windows-style path (backslash or drive letter); "
            "refusing the archive — re-create it with forward-slash relative paths"
        )
    if name.startswith("/"):
        raise UnsafeArchiveError(
            f"{archive}: {what} {name!r} is an absolute path; refusing the archive — "
            "re-create it with paths relative to the archive root"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: {what} {name!r} contains '..' and could write outside the destination "
            "(zip-slip); refusing the archive — do not use archives from this source"
        )
    rel = "/".join(parts)
    root = os.path.abspath(os.sep + "dest")  # lexical check: nothing on disk can redirect it
    if os.path.commonpath([root, os.path.normpath(os.path.join(root, rel))]) != root:
        raise UnsafeArchiveError(f"{archive}: {what} {name!r} resolves outside the destination")
    return rel


def _check_link(archive: Path, m: _Member, rel: str) -> None:
    target = m.link or ""
    kind = "symlink" if m.kind == "symlink" else "hardlink"
    if not target or target.startswith("/") or "\\" in target or _DRIVE.match(target):
        raise UnsafeArchiveError(
            f"{archive}: {kind} {m.name!r} -> {target!r} has an empty or absolute target; "
            "refusing the archive — it may point at files outside the destination"
        )
    # Symlink targets are relative to the link's folder; tar hardlink targets to the archive root.
    base = os.path.dirname(rel) if m.kind == "symlink" else ""
    root = os.path.abspath(os.sep + "dest")
    resolved = os.path.normpath(os.path.join(root, base, target))
    if os.path.commonpath([root, resolved]) != root:
        raise UnsafeArchiveError(
            f"{archive}: {kind} {m.name!r} -> {target!r} points outside the destination; "
            "refusing the archive — do not use archives from this source"
        )


def _is_junk(rel: str) -> bool:
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def _check_declared_total(archive: Path, total: int, max_total_bytes: int) -> None:
    if total > max_total_bytes:
        raise UnsafeArchiveError(
            f"{archive} would extract to at least {total} bytes, more than the limit of "
            f"{max_total_bytes}; refusing it as a possible archive bomb "
            "(raise download.max_extracted_bytes if the archive is legitimate)"
        )


def _plan(archive: Path, members: Iterator[_Member], max_total_bytes: int) -> list[_Entry]:
    entries: list[_Entry] = []
    declared = 0
    for m in members:
        rel = _check_name(archive, m.name)
        if m.kind == "special":
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a device, fifo or socket; refusing the archive — "
                "an image dataset only needs folders and regular files"
            )
        if m.kind in ("symlink", "hardlink"):
            _check_link(archive, m, rel)
            continue  # in-tree links are safe but not needed: skip, never materialize
        if not rel or _is_junk(rel):
            continue
        if m.kind == "file":
            declared += m.size
            _check_declared_total(archive, declared, max_total_bytes)
        entries.append(_Entry(rel, m.kind == "dir", m.open))
    return entries


# --- writing ----------------------------------------------------------------------------------


def _write(archive: Path, entries: list[_Entry], root: Path, max_total_bytes: int) -> list[str]:
    written = 0
    files: list[str] = []
    for e in entries:
        target = root.joinpath(*e.rel.split("/"))
        if e.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with e.open() as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > max_total_bytes:  # declared sizes were checked, but they can lie
                    raise UnsafeArchiveError(
                        f"{archive}: member {e.rel!r} pushed the extracted size past the limit of "
                        f"{max_total_bytes} bytes (more than the archive declared); refusing it as "
                        "a possible archive bomb (raise download.max_extracted_bytes if legitimate)"
                    )
                dst.write(chunk)
        files.append(e.rel)
    return files

