"""The storage lock: a second holder is refused naming the first (host, pid, start), a lock left
by a dead process is taken over, a lock whose heartbeat stopped is taken over from any host.
The holder is a real second process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raycollapse.cli.main import main
from raycollapse.errors import UserInputError
from raycollapse.io.lock import LEASE_S, LOCK_FILE, storage_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from raycollapse.io.lock import storage_lock
with storage_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of ``tmp_path / 'run'``."""
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_and_named(holder):
    folder, proc = holder
    with pytest.raises(UserInputError) as err, storage_lock(str(folder)):
        pass
    msg = str(err.value)
    assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "started" in msg


def test_run_command_is_refused_before_any_work(holder, capsys):
    folder, proc = holder
    cfg = Path(folder.parent / "c.yaml")
    cfg.write_text("{}\n")
    assert main(["run", str(cfg), f"loop.storage={folder}", "data.n=64"]) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and f"pid {proc.pid}" in err
    assert not (folder / "config.yaml").exists()


def test_a_killed_holders_lock_is_taken_over(holder):
    folder, proc = holder
    proc.kill()  # SIGKILL: no cleanup, the lock file stays
    proc.wait()
    assert (folder / LOCK_FILE).exists()
    with storage_lock(str(folder)) as mine:
        found = json.loads((folder / LOCK_FILE).read_text())
        assert found["pid"] == os.getpid() and found["token"] == mine["token"]
    assert not (folder / LOCK_FILE).exists()  # released


def _write_lock(folder: Path, host: str, pid: int, age: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    beat = time.time() - age
    (folder / LOCK_FILE).write_text(json.dumps(
        {"host": host, "pid": pid, "started": "earlier", "heartbeat": beat, "token": "t"}))  # fmt: skip


def test_other_hosts_lock_needs_a_stale_heartbeat(tmp_path):
    folder = tmp_path / "run"
    _write_lock(folder, "another-host", 1, age=5)  # fresh: that host is working
    with pytest.raises(UserInputError, match="another-host pid 1"), storage_lock(str(folder)):
        pass
    _write_lock(folder, "another-host", 1, age=LEASE_S + 5)  # silent for a whole lease
    with storage_lock(str(folder)):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    # a damaged lock file (no holder can be read) is stale too
    (folder / LOCK_FILE).write_text("{not json")
    with storage_lock(str(folder)):
        pass


def test_two_processes_racing_for_a_stale_lock_one_wins(tmp_path):
    """Both find the same dead holder; exactly one takes the lock over."""
    folder = tmp_path / "run"
    _write_lock(folder, socket.gethostname(), 2**22 + 12345, age=1)  # a pid that does not run
    code = (
        "import os, sys, time\n"
        "from raycollapse.io.lock import storage_lock\n"
        "from raycollapse.errors import UserInputError\n"
        "print('ready', flush=True)\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
        "try:\n"
        "    with storage_lock(sys.argv[1]):\n"
        "        print('won', flush=True); time.sleep(3)\n"
        "except UserInputError:\n"
        "    print('refused', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), str(go)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    assert all(p.stdout.readline().strip() == "ready" for p in procs)
    go.write_text("")  # both start taking the lock at once
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["refused", "won"]
