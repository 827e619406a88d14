"""Downloads that resume after a cut and are verified by sha256, and the sha256 of any file (a progress bar for
large ones)."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ahl.core.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB


USER_AGENT = "ahl-download/0.1 (python-urllib)"


MIRROR_HINT = "set a mirror URL (`data.mirror` in params.yaml, or `dvc exp run -S data.mirror=URL`)"


def progress_bar(progress: bool, **kwargs) -> tqdm:
    return tqdm(disable=not progress or not sys.stderr.isatty(), **kwargs)


# --------------------------------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike, *, progress: bool = False) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        progress_bar(
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
            progress_bar(
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
