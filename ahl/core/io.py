"""Atomic outputs: everything is written under a temporary name and renamed when complete.

An interrupted stage therefore leaves either the previous output or nothing, never a half-written file
that looks finished. A temporary name carries the writer's process id (``.<name>.<pid>.<random>.tmp``), so the
next write of the same output removes what a killed writer left behind; finished outputs get the modes the
umask gives (temporary files are created private). A full disk is a UserError naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ahl.core.errors import UserError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by writers that no longer run; returns what was removed."""
    removed = []
    for tmp in Path(path).parent.glob(f".{Path(path).name}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(tmp)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """The mode an ordinary open()/mkdir() would have given (mkstemp/mkdtemp create 0600/0700)."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def _free_space(path: Path) -> str:
    """The free space on the disk that holds ``path`` (its nearest existing folder), for error messages."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    raise AssertionError("unreachable")


# torch's archive writer reports a failed write (a full disk, through a file object) as a RuntimeError from its
# C++ side ("unexpected pos ...", "file write failed"), without the OSError's errno.
_TORCH_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter", "file write failed")


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    fix = "free space (or move the project to a larger disk) and run again"
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"no space left on the disk while writing {path} ({_free_space(path)} free); {fix}"
            ) from None
        raise
    except RuntimeError as exc:
        if any(mark in str(exc) for mark in _TORCH_WRITE_FAILURE):
            raise UserError(
                f"writing {path} failed ({_free_space(path)} free on its disk; "
                f"torch: {' '.join(str(exc).split())[:120]}); {fix}"
            ) from None
        raise


def preallocate(path: str | os.PathLike) -> None:
    """Reserve the disk blocks of an existing file's whole length. NumPy's ``open_memmap`` makes a sparse file, and
    a write into it on a full disk kills the process with SIGBUS; reserved blocks turn that into an ``OSError``
    (ENOSPC) here, before anything is written."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: sparse as before
                raise


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Hard-link ``src`` to ``dst`` (instant, no extra disk), copying when links are impossible (another
    filesystem). Returns ``dst``, so it also serves as ``shutil.copytree``'s ``copy_function``."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


def remove(path: Path) -> None:
    """Remove a file, a link or a directory tree if it exists."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        with _disk_errors(path):
            yield tmp
            _publish_mode(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_errors(path):
            yield tmp
            _publish_mode(tmp)
            remove(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
