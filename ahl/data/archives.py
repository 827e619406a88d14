"""Safe extraction of tar and zip archives: no member outside the target folder, no link that points out of it,
only the members under a given folder when asked."""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from ahl.core.errors import UserError
from ahl.core.io import atomic_dir
from ahl.data.fetch import progress_bar

log = logging.getLogger(__name__)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz")


# Python >= 3.11.4 (and the 3.8-3.10 security releases) carry tarfile's extraction filters.
_TAR_FILTER = "data" if hasattr(tarfile, "data_filter") else None


# --------------------------------------------------------------------------------------------------- extraction
def archive_kind(path: str | os.PathLike) -> str | None:
    """``"zip"``, ``"tar"`` (plain or compressed) or None, from the file name."""
    name = Path(path).name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    return None


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(PureWindowsPath(name).drive)


def inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _refuse(archive: Path, member: str, why: str) -> UserError:
    return UserError(
        f"refusing to extract {archive}: member {member!r} {why}. The archive is damaged or malicious; "
        "delete it and get the original file."
    )


def _nothing(archive: Path, members_under: str | None) -> UserError:
    where = f" under {members_under!r}" if members_under is not None else ""
    return UserError(f"{archive} holds nothing{where}: is it the right archive?")


def _member_target(archive: Path, root: str, name: str) -> str:
    if _is_absolute(name):
        raise _refuse(archive, name, "has an absolute path")
    # realpath, not just normpath: a member may pass through a symlink extracted before it ("d" -> ".", "d/../x").
    where = os.path.realpath(os.path.join(root, name))
    if not inside(root, where):
        raise _refuse(archive, name, "would be written outside the target folder")
    return where


def _check_link(archive: Path, root: str, name: str, link: str, *, hard: bool) -> None:
    kind = "hard link" if hard else "symlink"
    if _is_absolute(link):
        raise _refuse(archive, name, f"is a {kind} to the absolute path {link!r}")
    # A symlink resolves from its own (real) folder, a hard link from the archive's root.
    base = root if hard else os.path.dirname(os.path.join(root, name.rstrip("/")))
    resolved = os.path.realpath(os.path.join(base, link))
    if not inside(root, resolved):
        raise _refuse(archive, name, f"is a {kind} to {link!r}, outside the target folder")


def _selected(name: str, members_under: str | None) -> bool:
    if members_under is None:
        return True
    name = name.removeprefix("./")
    prefix = members_under.strip("/")
    return name == prefix or name.startswith(prefix + "/")


def safe_extract(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    *,
    members_under: str | None = None,
    progress: bool = False,
) -> None:
    """Extract a .zip/.tar[.gz|.xz|.bz2] archive into ``target`` (replaced as a whole, atomically).

    Members that would land outside ``target`` (absolute paths, ``..``, links pointing out) and device or fifo
    members are refused with a ``UserError``; a refused or failed extraction leaves no ``target``.
    ``members_under`` extracts only the members below that folder of the archive (e.g. ``"carpet/"``).
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind is None:
        raise UserError(f"{archive} is not a supported archive (.zip, .tar, .tar.gz, .tgz, .tar.xz, .tar.bz2)")
    try:
        count = (_extract_zip if kind == "zip" else _extract_tar)(archive, target, members_under, progress)
    except UserError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        # lzma.LZMAError, zlib.error and friends are ValueError/OSError subclasses or get wrapped by tarfile.
        raise UserError(
            f"cannot extract {archive} ({type(err).__name__}: {err}): the file is damaged or incomplete; "
            "delete it and run again."
        ) from err
    log.info("extracted %d members of %s into %s", count, archive, target)


def _extract_tar(archive: Path, target: Path, members_under: str | None, progress: bool) -> int:
    count, has_links = 0, False
    # One streaming pass: each member is checked just before it is extracted, so a .tar.xz is decompressed once.
    with (
        tarfile.open(archive, "r:*") as tar,
        atomic_dir(target) as tmp,
        progress_bar(progress, unit=" files", desc=f"extract {archive.name}") as bar,
    ):
        root = os.path.realpath(tmp)
        for member in tar:
            if not _selected(member.name, members_under):
                continue
            _member_target(archive, root, member.name)
            if member.isdev() or member.isfifo():
                raise _refuse(archive, member.name, "is a device or fifo")
            if member.issym() or member.islnk():
                _check_link(archive, root, member.name, member.linkname, hard=member.islnk())
            if _TAR_FILTER is None:
                tar.extract(member, root)
            else:
                try:
                    tar.extract(member, root, filter=_TAR_FILTER)
                except tarfile.FilterError as err:  # a case our own check does not name; still refused
                    raise _refuse(archive, member.name, f"is refused by tarfile's data filter ({err})") from err
            count += 1
            has_links = has_links or member.issym()
            bar.update(1)
        if count == 0:
            raise _nothing(archive, members_under)
        if has_links:
            _check_tree_links(archive, root)
    return count


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: Path, target: Path, members_under: str | None, progress: bool) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = [info for info in zf.infolist() if _selected(info.filename, members_under)]
        if not infos:
            raise _nothing(archive, members_under)
        has_links = False
        with atomic_dir(target) as tmp:
            root = os.path.realpath(tmp)
            for info in progress_bar(progress, iterable=infos, unit=" files", desc=f"extract {archive.name}"):
                name = info.filename
                if _is_absolute(name):
                    raise _refuse(archive, name, "has an absolute path")
                if ".." in PurePosixPath(name).parts:  # zipfile would silently drop it and write elsewhere
                    raise _refuse(archive, name, "has a '..' component")
                _member_target(archive, root, name)
                mode = info.external_attr >> 16
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    raise _refuse(archive, name, "is a device or fifo")
                if _zip_is_symlink(info):
                    link = zf.read(info).decode("utf-8")
                    _check_link(archive, root, name, link, hard=False)
                    path = Path(root) / PurePosixPath(name.rstrip("/"))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link, path)
                    has_links = True
                else:
                    zf.extract(info, root)
            if has_links:
                _check_tree_links(archive, root)
    return len(infos)


def _check_tree_links(archive: Path, root: str) -> None:
    """After extraction, every symlink must still resolve inside ``root`` (links that chain through later links)."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not inside(root, os.path.realpath(path)):
                member = os.path.relpath(path, root)
                raise _refuse(archive, member, "is a symlink that resolves outside the target folder")
