"""The GPU allocator (ahl/core/gpus.py) with real processes and real flock locks; the GPU count is given to it, so
this runs on any machine: 4 runs on 2 GPUs take 0 and 1, the third waits, a SIGKILL frees its GPU to the waiter,
and 8 racing processes never hold one GPU twice."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ahl.core.errors import UserError
from ahl.core.gpus import busy, lease, physical_ids

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from ahl.core.gpus import lease
held = lease({ids!r}, {need}, folder=Path({folder!r}), poll_s=0.05, report_s=0.2)
print("held", *held.ids, flush=True)
time.sleep(120)
"""

RACER = """
import json, sys, time
from pathlib import Path
from ahl.core.gpus import lease
folder, out, go = Path({folder!r}), Path({out!r}), Path({go!r})
while not go.exists():
    time.sleep(0.001)
spans = []
for _ in range(6):
    with lease(["0", "1", "2", "3"], folder=folder, poll_s=0.001) as held:
        start = time.monotonic()
        time.sleep(0.02)
        spans.append((held.ids[0], start, time.monotonic()))
out.write_text(json.dumps(spans))
"""


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _held(proc: subprocess.Popen, timeout: float = 30.0) -> list[str]:
    """The GPU ids a holder printed (it prints once it holds them)."""
    line = proc.stdout.readline()
    assert line.startswith("held"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[1:]


def test_four_runs_on_two_gpus_a_killed_run_frees_its_gpu_to_the_waiter(tmp_path):
    procs = []
    try:
        code = HOLDER.format(ids=["0", "1"], need=1, folder=str(tmp_path))
        a = _start(code)
        procs.append(a)
        assert _held(a) == ["0"]
        b = _start(code)
        procs.append(b)
        assert _held(b) == ["1"]
        c, d = _start(code), _start(code)
        procs += [c, d]
        time.sleep(1.5)
        assert c.poll() is None and d.poll() is None  # both wait, neither doubles up
        assert sorted(busy(["0", "1"], tmp_path)) == [f"0 (pid {a.pid})", f"1 (pid {b.pid})"]
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        first = None
        for _ in range(100):  # one of the waiters takes GPU 0 at once; the other keeps waiting
            time.sleep(0.05)
            ready = [p for p in (c, d) if p.poll() is None and _readable(p)]
            if ready:
                first = ready[0]
                break
        assert first is not None and _held(first) == ["0"]
        other = d if first is c else c
        assert other.poll() is None
        other.terminate()
        assert "waiting for 1 GPU(s): busy 0 (pid" in other.communicate(timeout=10)[1]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _readable(proc: subprocess.Popen) -> bool:
    import select

    return bool(select.select([proc.stdout], [], [], 0)[0])


def test_eight_racing_processes_never_hold_one_gpu_twice(tmp_path):
    go = tmp_path / "go"
    outs = [tmp_path / f"spans{k}.json" for k in range(8)]
    procs = [_start(RACER.format(folder=str(tmp_path), out=str(o), go=str(go))) for o in outs]
    time.sleep(1.0)  # every racer imported and polling
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    spans = [s for o in outs for s in json.loads(o.read_text())]
    assert len(spans) == 48
    for gpu in ("0", "1", "2", "3"):
        mine = sorted((start, end) for g, start, end in spans if g == gpu)
        assert mine, f"GPU {gpu} was never used"
        assert all(end <= nxt for (_, end), (nxt, _) in zip(mine, mine[1:])), f"GPU {gpu} held twice at once"


def test_a_torchrun_run_takes_n_gpus_at_once_or_none(tmp_path):
    with lease(["0", "1", "2"], folder=tmp_path) as first:
        assert first.ids == ["0"]
        with lease(["0", "1", "2"], 2, folder=tmp_path) as pair:
            assert pair.ids == ["1", "2"] and pair.indices == [1, 2]
            with pytest.raises(UserError, match=r"no 2 free GPU\(s\) among 0, 1, 2 after"):
                lease(["0", "1", "2"], 2, folder=tmp_path, poll_s=0.01, timeout_s=0.1)
            assert busy(["0", "1", "2"], tmp_path) == [f"{g} (pid {os.getpid()})" for g in ("0", "1", "2")]
            shared = lease(["0", "1", "2"], 2, folder=tmp_path, share=True, poll_s=0.01)
            assert shared.ids == ["0", "1"] and shared.files == []  # shares, holds nothing
    assert busy(["0", "1", "2"], tmp_path) == []  # released on exit


def test_physical_ids_follow_cuda_visible_devices():
    assert physical_ids(2, None) == ["0", "1"]
    assert physical_ids(2, "3,1") == ["3", "1"]
    assert physical_ids(1, "GPU-5f2a, 2") == ["GPU-5f2a"]
    with pytest.raises(UserError, match=r"needs 3 GPU\(s\), but this machine shows 2; lower distributed.nproc"):
        lease(["0", "1"], 3)


def test_a_stage_with_device_auto_holds_a_free_gpu(tmp_path, monkeypatch):
    """stages/compute.py run_device on a machine that shows 3 GPUs (torch's CUDA queries answered for it;
    the locks are real): the first stage holds GPU 0, the next GPU 1, a torchrun stage of 2 waits for two free
    ones or shares with share_gpus; CUDA_VISIBLE_DEVICES names the GPUs; device: cuda:N is left alone."""
    import torch
    import yaml
    from conftest import ROOT as PROJECT

    monkeypatch.syspath_prepend(str(ROOT / "stages"))  # as `python stages/x.py` runs: stages/ first on the path
    from common import Params
    from compute import run_device

    monkeypatch.setenv("AHL_GPU_LOCKS", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text()) | {"device": "auto"}

    def params(**distributed) -> Params:
        return Params(raw | {"distributed": raw["distributed"] | distributed})

    first, second = params(), params()
    assert run_device(first) == torch.device("cuda", 0) and run_device(first) == torch.device("cuda", 0)
    assert run_device(second) == torch.device("cuda", 1)
    assert busy(["4", "5", "6"], tmp_path) == [f"4 (pid {os.getpid()})", f"5 (pid {os.getpid()})"]
    pair = params(nproc=2, share_gpus=True)
    assert run_device(pair) == torch.device("cuda", 0)  # two needed, one free: holds it, shares the first busy one
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6" and pair._lease.ids == ["4", "6"]
    assert [os.fstat(f.fileno()).st_ino for f in pair._lease.files] == [(tmp_path / "gpu-6.lock").stat().st_ino]
    pair._lease.release()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    first._lease.release()
    pair = params(nproc=2)
    assert run_device(pair) == torch.device("cuda", 0) and pair._lease.ids == ["4", "6"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"  # what torchrun's ranks will see
    assert run_device(Params(raw | {"device": "cuda:2"})) == torch.device("cuda", 2)


SECOND_USER = """
import os, sys, time
sys.path.insert(0, {root!r})
from ahl.core import gpus
os.setgroups([])
os.setgid(60000)
os.setuid({uid})
os.umask(0o077)  # a private umask: the lock folder and files must still be the group's
held = gpus.lease(["0", "1"], 1, folder=gpus.lock_dir(), poll_s=0.05, timeout_s=30)
print("held", *held.ids, *gpus.busy(["0", "1"], gpus.lock_dir()), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to two other users needs root (CI runs as root)")
def test_two_users_of_one_group_share_a_lock_folder(tmp_path):
    """Was: the folder was made 0o700 by the first user and the second got an uncaught PermissionError. Two
    uids of one group, both with umask 077: the second sees the first's hold and takes the other GPU."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="ahl-locks-", dir="/tmp"))
    top.chmod(0o1777)
    folder = top / "gpus"
    env = {**os.environ, "AHL_GPU_LOCKS": str(folder)}
    procs = []
    try:
        for uid in (60001, 60002):
            procs.append(subprocess.Popen([sys.executable, "-c", SECOND_USER.format(root=str(ROOT), uid=uid)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, cwd=top))  # fmt: skip
            line = procs[-1].stdout.readline()
            assert line.startswith("held"), line or procs[-1].communicate(timeout=30)[1]
            if uid == 60001:
                assert line.split()[1] == "0"
            else:
                assert line.split()[1:3] == ["1", "0"] and f"(pid {procs[0].pid})" in line  # sees user 1's hold
        mode = folder.stat().st_mode
        assert stat.S_IMODE(mode) == 0o3775 and folder.stat().st_uid == 60001
        assert {stat.S_IMODE((folder / f"gpu-{g}.lock").stat().st_mode) for g in "01"} == {0o664}
    finally:
        for p in procs:
            p.communicate(timeout=30)
        shutil.rmtree(top, ignore_errors=True)


READER = """
import os, sys
sys.path.insert(0, {root!r})
from ahl.core import gpus
from ahl.core.errors import UserError
os.setgroups([])
os.setgid(60000)
os.setuid(60003)
try:
    gpus.lease(["0"], 1, folder=gpus.Path({folder!r}), poll_s=0.05, timeout_s=0.5)
except UserError as exc:
    print("waited:", exc)
print("busy:", gpus.busy(["0"], gpus.Path({folder!r})), flush=True)
sys.stdin.readline()
held = gpus.lease(["0"], 1, folder=gpus.Path({folder!r}), poll_s=0.05, timeout_s=30)
print("held", *held.ids, flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root (CI runs as root)")
def test_a_user_who_can_only_read_the_lock_files_waits_for_a_hold_and_then_holds(tmp_path):
    """flock needs read access only: a user who may not write the folder or its files sees another's hold (no
    PermissionError, as opening the file for writing gave) and takes the GPU once it is free."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="ahl-locks-", dir="/tmp"))
    try:
        top.chmod(0o755)
        first = lease(["0"], folder=top)
        (top / "gpu-0.lock").chmod(0o644)  # read-only to everyone else
        reader = subprocess.Popen([sys.executable, "-c", READER.format(root=str(ROOT), folder=str(top))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=top)  # fmt: skip
        waited, seen = reader.stdout.readline(), reader.stdout.readline()
        assert waited.startswith("waited: no 1 free GPU(s) among 0"), waited or reader.communicate(timeout=30)[1]
        assert seen.strip() == f"busy: ['0 (pid {os.getpid()})']"
        first.release()
        out, err = reader.communicate("go\n", timeout=60)
        assert out.strip() == "held 0", err
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_the_multi_gpu_wait_is_jittered(tmp_path, monkeypatch):
    """Was: every 2.0 s exactly, so two runs that each need every GPU could poll in step forever."""
    import ahl.core.gpus as gpus

    waits = []
    monkeypatch.setattr(gpus.time, "sleep", waits.append)
    with lease(["0", "1"], folder=tmp_path):
        with pytest.raises(UserError):
            start = time.monotonic()
            monkeypatch.setattr(gpus.time, "monotonic", lambda: start + len(waits))  # one "second" per wait
            lease(["0", "1"], 2, folder=tmp_path, poll_s=2.0, timeout_s=20)
    assert len(waits) >= 10 and len(set(waits)) == len(waits) and all(1.0 <= w <= 3.0 for w in waits)


def test_share_never_takes_a_busy_gpu_while_another_is_only_probed(tmp_path):
    """Was: another process's busy() probe locked a free GPU for a moment, and a run with share: true shared a
    busy GPU after that one scan. A probe's lock (shared) is not a run's hold."""
    import threading

    import ahl.core.gpus as gpus

    with lease(["0", "1"], folder=tmp_path) as first:
        assert first.ids == ["0"]
        (tmp_path / "gpu-1.lock").touch()
        probe = os.open(tmp_path / "gpu-1.lock", os.O_RDONLY)
        fcntl.flock(probe, fcntl.LOCK_SH)  # busy() of another process, caught mid-probe
        threading.Timer(0.3, os.close, [probe]).start()
        shared = gpus.lease(["0", "1"], 1, folder=tmp_path, share=True, poll_s=0.02, timeout_s=30)
        assert shared.ids == ["1"] and len(shared.files) == 1  # waited for the probe, then held the free GPU
        shared.release()
