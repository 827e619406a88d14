"""A GPU per run: with ``device: auto`` on a machine with several GPUs, a stage holds the first GPUs that no other
run of this project on the machine holds, until it exits.

A hold is an exclusive ``flock`` on one lock file per GPU (``gpu-<id>.lock``): the kernel releases it when the
holder's process ends, however it ends (a SIGKILL included), so a dead run never keeps a GPU. GPUs are named by
their physical id (the entry of ``CUDA_VISIBLE_DEVICES`` when it is set, else the index), so runs with different
visible sets still see each other's holds. When too few GPUs are free, the stage waits (logging which are busy),
polling at a randomly jittered interval so that two waiting runs fall out of step, unless ``share`` is set: then it
holds the free ones and shares the rest, once two scans in a row found them held by other runs.

The lock files live in a per-user folder, or in ``AHL_GPU_LOCKS`` for a node shared by several users: that folder
is made group-shared (setgid, sticky, rwxrwxr-x) and its lock files rw-rw-r-- whatever the umask, and a user who
can only read a lock file still takes and honours its locks (``flock`` needs read access only). A probe of which
GPUs are busy (``busy``) takes a shared lock, which a run's scan tells apart from a run's exclusive hold.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ahl.core.errors import UserError

log = logging.getLogger(__name__)

SHARED_DIR_MODE = 0o3775  # setgid (lock files take the folder's group), sticky (no one deletes another's file)
LOCK_FILE_MODE = 0o664


def lock_dir() -> Path:
    """The folder of the GPU lock files: ``AHL_GPU_LOCKS`` (a node shared by several users: made group-shared when
    this process creates it), else a private per-user folder."""
    shared = os.environ.get("AHL_GPU_LOCKS")
    if not shared:
        folder = Path(tempfile.gettempdir()) / f"ahl-gpus-{os.getuid()}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder
    folder = Path(shared)
    if not folder.is_dir():
        try:  # the folder only, in a parent that exists: parents made here would take this user's umask
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"AHL_GPU_LOCKS={shared}: cannot create the folder ({exc.strerror}); create it once "
                            f"for the group: mkdir -p {shared} && chgrp GROUP {shared} && chmod 3775 {shared}"
                            ) from None  # fmt: skip
        if folder.stat().st_uid == os.getuid():
            os.chmod(folder, SHARED_DIR_MODE)  # not the umask's choice: every user of the group takes locks here
    return folder


def physical_ids(count: int, visible: str | None) -> list[str]:
    """The ids of the ``count`` visible GPUs: the entries of CUDA_VISIBLE_DEVICES (``visible``), else 0..count-1."""
    if not visible:
        return [str(k) for k in range(count)]
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    return entries[:count]


@dataclass
class Lease:
    """GPUs held by this process: ``indices`` among the visible ones, ``ids`` their physical ids."""

    indices: list[int]
    ids: list[str]
    files: list = field(default_factory=list, repr=False)  # the open lock files: closing one frees its GPU

    def release(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()

    def keep_across_exec(self) -> None:
        """Keep the holds through os.exec* (torchrun replacing this process): the lock files stay open in it."""
        for f in self.files:
            os.set_inheritable(f.fileno(), True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open(folder: Path, gpu_id: str) -> int:
    """A descriptor of GPU ``gpu_id``'s lock file: read-write where allowed, read-only where not (enough for
    flock); the file is created rw-rw-r-- whatever the umask."""
    path = folder / f"gpu-{gpu_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, LOCK_FILE_MODE)
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise UserError(f"cannot open the GPU lock file {path} ({exc.strerror}); the folder's owner can let the "
                            f"group in: chmod 3775 {folder} && chmod 664 {folder}/gpu-*.lock") from None  # fmt: skip
    if os.fstat(fd).st_uid == os.getuid() and stat.S_IMODE(os.fstat(fd).st_mode) != LOCK_FILE_MODE:
        os.fchmod(fd, LOCK_FILE_MODE)
    return fd


def _flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _try(folder: Path, gpu_id: str):
    """GPU ``gpu_id`` held (its lock file open with an exclusive lock, our pid written where we may), or None."""
    fd = _open(folder, gpu_id)
    if not _flock(fd, fcntl.LOCK_EX):
        os.close(fd)
        return None
    f = os.fdopen(fd, "r+" if _writable(fd) else "r")
    if f.writable():
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    return f


def _writable(fd: int) -> bool:
    return (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) == os.O_RDWR


def _held_by_a_run(folder: Path, gpu_id: str) -> bool:
    """Whether a run holds GPU ``gpu_id`` now (an exclusive lock), not a probe (a shared one) or nobody."""
    fd = _open(folder, gpu_id)
    try:
        return not _flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def lease(
    ids: list[str], need: int = 1, *, folder: Path | None = None, share: bool = False, poll_s: float = 2.0,
    report_s: float = 60.0, timeout_s: float | None = None,
) -> Lease:  # fmt: skip
    """Hold ``need`` of the GPUs ``ids`` (physical ids, in visible order): the first free ones. When fewer are
    free: wait, polling every ``poll_s`` (times a random factor of 0.5 to 1.5) and logging the busy ones every
    ``report_s`` (``timeout_s``: give up with an error), or with ``share`` hold the free ones and share the first
    busy ones, once two scans in a row found every GPU it could not take held by another run."""
    if not 1 <= need <= len(ids):
        raise UserError(f"a run needs {need} GPU(s), but this machine shows {len(ids)}; lower distributed.nproc")
    folder = folder or lock_dir()
    jitter = random.Random()  # seeded by the OS: runs started together wait different times
    start, reported, short = time.monotonic(), None, 0
    while True:
        held, probed = [], False
        for k, gpu_id in enumerate(ids):
            f = _try(folder, gpu_id)
            if f is not None:
                held.append((k, gpu_id, f))
                if len(held) == need:
                    return Lease([k for k, _, _ in held], [g for _, g, _ in held], [f for _, _, f in held])
            elif not _held_by_a_run(folder, gpu_id):
                probed = True  # a probe (or a run that let go since): not a hold, so never shared
        short = 0 if probed else short + 1
        if share and short >= 2:
            mine = [k for k, _, _ in held]
            others = [k for k in range(len(ids)) if k not in mine][: need - len(held)]
            indices = sorted(mine + others)
            log.warning("every other GPU is held by another run; sharing GPU(s) %s (share_gpus: true)",
                        [ids[k] for k in others])  # fmt: skip
            return Lease(indices, [ids[k] for k in indices], [f for _, _, f in held])
        for _, _, f in held:  # not enough free: hold none, so that two waiting runs cannot starve each other
            f.close()
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise UserError(f"no {need} free GPU(s) among {', '.join(ids)} after {waited:.0f} s; see {folder}")
        if reported is None or time.monotonic() - reported >= report_s:
            log.info("waiting for %d GPU(s): busy %s (%s)", need, ", ".join(busy(ids, folder)), folder)
            reported = time.monotonic()
        time.sleep(poll_s * jitter.uniform(0.5, 1.5))


def busy(ids: list[str], folder: Path) -> list[str]:
    """The GPUs of ``ids`` held now, each with its holder's pid: "1 (pid 4242)". The probe takes a shared lock,
    so a run scanning meanwhile sees a probe, not a hold."""
    out = []
    for gpu_id in ids:
        if not _held_by_a_run(folder, gpu_id):
            continue
        try:
            pid = (folder / f"gpu-{gpu_id}.lock").read_text().strip() or "?"
        except OSError:
            pid = "?"
        out.append(f"{gpu_id} (pid {pid})")
    return out
