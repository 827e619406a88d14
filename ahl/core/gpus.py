"""A GPU per run: with ``device: auto`` on a machine with several GPUs, a stage holds the first GPUs that no other
run of this project on the machine holds, until it exits.

A hold is an exclusive ``flock`` on one lock file per GPU (``gpu-<id>.lock`` in a per-user folder): the kernel
releases it when the holder's process ends, however it ends (a SIGKILL included), so a dead run never keeps a GPU.
GPUs are named by their physical id (the entry of ``CUDA_VISIBLE_DEVICES`` when it is set, else the index), so
runs with different visible sets still see each other's holds. When every GPU is held, the stage waits (logging
which are busy) unless ``share`` is set, in which case it takes the first GPUs without holding them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ahl.core.errors import UserError

log = logging.getLogger(__name__)


def lock_dir() -> Path:
    """The per-user folder of the GPU lock files (``AHL_GPU_LOCKS`` overrides it, e.g. for a shared node)."""
    folder = Path(os.environ.get("AHL_GPU_LOCKS") or Path(tempfile.gettempdir()) / f"ahl-gpus-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
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


def _try(folder: Path, gpu_id: str):
    f = open(folder / f"gpu-{gpu_id}.lock", "a+")  # noqa: SIM115 (held open for the lease's lifetime)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lease(
    ids: list[str], need: int = 1, *, folder: Path | None = None, share: bool = False, poll_s: float = 2.0,
    report_s: float = 60.0, timeout_s: float | None = None,
) -> Lease:  # fmt: skip
    """Hold ``need`` of the GPUs ``ids`` (physical ids, in visible order): the first free ones. When fewer are
    free: wait, polling every ``poll_s`` and logging the busy ones every ``report_s`` (``timeout_s``: give up with
    an error), or with ``share`` take the first ``need`` without holding them."""
    if not 1 <= need <= len(ids):
        raise UserError(f"a run needs {need} GPU(s), but this machine shows {len(ids)}; lower distributed.nproc")
    folder = folder or lock_dir()
    start, reported = time.monotonic(), None
    while True:
        held = []
        for k, gpu_id in enumerate(ids):
            f = _try(folder, gpu_id)
            if f is not None:
                held.append((k, gpu_id, f))
                if len(held) == need:
                    return Lease([k for k, _, _ in held], [g for _, g, _ in held], [f for _, _, f in held])
        for _, _, f in held:  # not enough free: hold none, so that two waiting runs cannot starve each other
            f.close()
        if share:
            log.warning("every GPU is held by another run; sharing GPU(s) %s (share_gpus: true)", ids[:need])
            return Lease(list(range(need)), ids[:need])
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise UserError(f"no {need} free GPU(s) among {', '.join(ids)} after {waited:.0f} s; see {folder}")
        if reported is None or time.monotonic() - reported >= report_s:
            log.info("waiting for %d GPU(s): busy %s (%s)", need, ", ".join(busy(ids, folder)), folder)
            reported = time.monotonic()
        time.sleep(poll_s)


def busy(ids: list[str], folder: Path) -> list[str]:
    """The GPUs of ``ids`` held now, each with its holder's pid: "1 (pid 4242)"."""
    out = []
    for gpu_id in ids:
        f = _try(folder, gpu_id)
        if f is not None:
            f.close()
            continue
        try:
            pid = (folder / f"gpu-{gpu_id}.lock").read_text().strip() or "?"
        except OSError:
            pid = "?"
        out.append(f"{gpu_id} (pid {pid})")
    return out
