"""``dist.spawn`` leaves no process behind when its parent is SIGKILLed (issue 20), nor
when a rank that started a ``multiprocessing.Manager`` (as Megatron's async checkpoint
writer does) finishes normally.

The old spawn kept results in a ``multiprocessing.Manager`` whose server process (about
220 MB) was re-parented to PID 1 and ran forever after ``kill -9`` of the parent. Every
process of the world carries a marker in its environment, so the test finds all of them
(ranks, any manager or tracker) by scanning /proc, wherever they were re-parented to.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from megatron_sz import dist

    def worker(rank, world, folder):
        Path(folder, f"ready{rank}").write_text(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        dist.spawn(worker, 2, sys.argv[1], backend="gloo")
""")


def _marked(marker: str) -> list[int]:
    needle = f"MSZ_ORPHAN_TEST={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(d.name))
    return pids


def _start(tmp_path: Path, marker: str) -> subprocess.Popen:
    script = tmp_path / "spawner.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, MSZ_ORPHAN_TEST=marker, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        if proc.poll() is not None:
            raise AssertionError(f"spawner exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("ranks never started")
        time.sleep(0.2)
    return proc


def _wait_gone(marker: str, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    left = _marked(marker)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = _marked(marker)
    return left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_process_survives_the_parent(tmp_path, sig):
    marker = uuid.uuid4().hex
    proc = _start(tmp_path, marker)
    children = [p for p in _marked(marker) if p != proc.pid]
    assert len(children) >= 2, children  # both ranks (and whatever helpers) are visible to the scan
    proc.send_signal(sig)
    proc.wait(timeout=30)
    left = _wait_gone(marker, 10)
    for pid in left:  # clean up before failing, so one failure does not leak into other tests
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left after {sig.name} of the parent: {left}"


def _rank_with_a_manager(rank, world):
    """What Megatron's FileSystemWriterAsync does on the first save: a module-level spawn
    Manager whose server process would outlive a rank that ends with os._exit."""
    import multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    queue = manager.Queue()
    queue.put(rank)
    _rank_with_a_manager.keep = (manager, queue)  # referenced until the process ends, like a global
    return manager._process.pid


def test_a_manager_started_inside_a_rank_does_not_outlive_it():
    from megatron_sz import dist

    pids = dist.spawn(_rank_with_a_manager, 2, backend="gloo")
    deadline = time.time() + 10
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and
                 Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not alive, f"manager server processes left behind by finished ranks: {alive}"
