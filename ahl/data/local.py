"""Raw data the user already has (``data.local``): folder trees copied with their links checked, and the manifest
(names, sizes, sha256 through a cache of hashes) that lets DVC see when such a folder changes."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ahl.core.errors import UserError
from ahl.core.io import link_or_copy, read_json, write_json
from ahl.data.archives import archive_kind, inside
from ahl.data.fetch import sha256_file

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ local folders
def _outside(what: str, root: Path, rel: str, link: str, real: str) -> UserError:
    return UserError(
        f"{what}: {root / rel} is a symlink to {link} ({real}), outside {root}. Links out of the folder are not "
        "followed (the files would be linked into the pipeline's data and DVC cache): copy those files into the "
        f"folder instead (e.g. `cp -rL`), or give the folder that holds them"
    )


def _tree(root: Path, what: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The folders and regular files under ``root``: relative POSIX paths in sorted order, each file with its real
    path. Symlinks are followed only inside ``root``; one that leads out, dangles or loops is a ``UserError``."""
    top = os.path.realpath(root)
    folders: list[str] = []
    files: list[tuple[str, str]] = []

    def visit(folder: str, prefix: str, ancestors: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise UserError(f"{what}: cannot read the folder {folder} ({err}); check its permissions") from err
        for entry in entries:
            rel, real = prefix + entry.name, os.path.realpath(entry.path)
            if entry.is_symlink():
                link = os.readlink(entry.path)
                if not inside(top, real):
                    raise _outside(what, root, rel, link, real)
                if not os.path.exists(real):
                    raise UserError(f"{what}: {root / rel} is a symlink to {link}, which does not exist; remove it")
            if os.path.isdir(real):
                if real in ancestors:
                    raise UserError(f"{what}: {root / rel} is a symlink to a folder that holds it (a loop); remove it")
                folders.append(rel)
                visit(entry.path, rel + "/", (*ancestors, real))
            elif os.path.isfile(real):
                files.append((rel, real))
            else:
                log.warning("%s: skipping %s, neither a regular file nor a folder", what, root / rel)

    visit(top, "", (top,))
    return folders, files


def copy_tree(src: Path, dst: Path, what: str) -> None:
    """Hard-link (or copy) the tree ``src`` into the existing folder ``dst``, never following links out of it."""
    folders, files = _tree(src, what)
    for rel in folders:
        (dst / rel).mkdir(parents=True, exist_ok=True)
    for rel, real in files:
        link_or_copy(real, dst / rel)


RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime's granularity


class _HashCache:
    """sha256 of files keyed by (real path, size, mtime_ns, ctime_ns, inode), kept in a JSON file between runs.

    ctime is the kernel's: every write, rename or chmod sets it to now, and no tool sets it back, so a file edited
    in place with its size and mtime restored (``touch -d``, ``rsync -t``, ``cp -p``) is hashed again."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.entries, self.changed = path, {}, False
        if path is not None and path.is_file():
            try:
                data = read_json(path)
                self.entries = {k: v for k, v in data.get("entries", {}).items() if len(v) == 5}
            except (OSError, ValueError, AttributeError, TypeError):
                log.warning("ignoring the unreadable hash cache %s; it is rebuilt", path)

    def sha256(self, real: str) -> tuple[int, str]:
        st = os.stat(real)
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = self.entries.get(real)
        if hit is not None and hit[:4] == key:
            return st.st_size, hit[4]
        digest = sha256_file(real)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            self.entries[real], self.changed = [*key, digest], True
        return st.st_size, digest

    def forget_under(self, top: str, keep: set[str]) -> None:
        stale = [k for k in self.entries if inside(top, k) and k not in keep]
        for k in stale:
            del self.entries[k]
        self.changed = self.changed or bool(stale)

    def save(self) -> None:
        if self.path is not None and self.changed:
            write_json(self.path, {"entries": dict(sorted(self.entries.items()))})


def check_archive(path: Path) -> None:
    """``data.local`` as a file must be an archive: anything else would be copied into data/raw (and so into the
    DVC cache and a ``dvc push``) and fail later with a message about the dataset's layout."""
    if archive_kind(path) is None:
        raise UserError(
            f"data.local = {path.resolve()} is a file but not a .zip or .tar(.gz/.bz2/.xz) archive: give the "
            "dataset's archive, or the folder that holds its extracted files (your own images: a folder "
            "holding <classname>/train/good and <classname>/test/<defect>, see docs/data.md)"
        )


def local_manifest(path: str | os.PathLike | None, *, hash_cache: str | os.PathLike | None = None) -> dict:
    """What ``data.local`` holds, as a deterministic dict for DVC to compare between runs.

    A folder: every regular file (relative path, size, sha256), sorted by path, refusing symlinks that lead out of
    it as ``obtain`` does. A file (an archive): its name, size and sha256. None: ``{"kind": "none"}``. Hashes are
    kept in ``hash_cache`` (a JSON file, written atomically) keyed by path, size and mtime, so an unchanged tree
    is not read again.
    """
    if path is None:
        return {"kind": "none"}
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data.local = {path.resolve()} does not exist: give an existing archive or folder")
    cache = _HashCache(Path(hash_cache) if hash_cache is not None else None)
    if path.is_dir():
        _, files = _tree(path, "data.local")
        entries = []
        for rel, real in files:
            size, digest = cache.sha256(real)
            entries.append({"path": rel, "size": size, "sha256": digest})
        cache.forget_under(os.path.realpath(path), {real for _, real in files})
        manifest = {"kind": "folder", "files": entries}
    else:
        check_archive(path)
        size, digest = cache.sha256(os.path.realpath(path))
        manifest = {"kind": "file", "name": path.name, "size": size, "sha256": digest}
    cache.save()
    return manifest
