"""Sampling the memory of a process tree from ``/proc`` (Linux): the processes below a root
(a benchmark that started its own Ray: its raylet, GCS and workers), their RSS, and which of
them are Ray workers (``ray::`` in the command line, retitled as they take a role)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

# Ray's per-node agents carry the ``ray::`` prefix too but are Ray's own processes, not workers.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``/proc/PID/status`` in bytes (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def tree(root: int) -> dict[int, int]:
    """pid -> parent pid of every process below ``root`` (its descendants, any depth)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    below: dict[int, int] = {}
    for pid in parent:
        p, hops = pid, 0
        while p in parent and p != root and hops < 32:
            p, hops = parent[p], hops + 1
        if p == root and pid != root:
            below[pid] = parent[pid]
    return below


class TreeRss:
    """Samples, every ``period`` s, the RSS of the driver and of every process below ``root``
    (this benchmark, whose Ray this is): per-worker peaks, peak of the workers' sum, peak of Ray's
    own processes' sum, and the driver's and the workers' peaks per loop stage."""

    def __init__(self, root: int, driver: int, period: float = 0.2) -> None:
        self.root, self.driver, self.period = root, driver, period
        self.stage = "start"
        self.worker_peak: dict[int, tuple[str, int]] = {}
        self.workers_sum_peak = 0
        self.system_sum_peak = 0
        self.driver_rss_peak = 0
        self.by_stage: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def name(pid: int) -> str:
        # read every time: a worker retitles itself (ray::IDLE -> ray::SomeActor) when it is used
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return ""
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()

    def _sample(self) -> None:
        below = tree(self.root)
        drv = status(self.driver).get("VmRSS", 0)
        workers = system = 0
        mine = descendants(below, self.driver)
        for pid in below:
            if pid == self.driver or pid in mine:
                continue  # the driver (and anything it forked) is counted as the driver
            rss = status(pid).get("VmRSS", 0)
            cmd = self.name(pid)
            if cmd.startswith("ray::") and not cmd.startswith(RAY_AGENTS):
                workers += rss
                name = cmd.split()[0]
                old = self.worker_peak.get(pid, (name, 0))
                # an idle worker takes a task's name later: name it after its largest role
                if rss >= old[1] or old[0] == "ray::IDLE":
                    self.worker_peak[pid] = (name, max(rss, old[1]))
            elif cmd:
                system += rss
        self.workers_sum_peak = max(self.workers_sum_peak, workers)
        self.system_sum_peak = max(self.system_sum_peak, system)
        self.driver_rss_peak = max(self.driver_rss_peak, drv)
        st = self.by_stage.setdefault(self.stage, {"driver": 0, "workers_sum": 0})
        st["driver"] = max(st["driver"], drv)
        st["workers_sum"] = max(st["workers_sum"], workers)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def descendants(below: dict[int, int], top: int) -> set[int]:
    """The pids of ``below`` that descend from ``top`` (not ``top`` itself)."""
    out: set[int] = set()
    for pid in below:
        p, hops = pid, 0
        while p in below and p != top and hops < 32:
            p, hops = below[p], hops + 1
        if p == top and pid != top:
            out.add(pid)
    return out


def settle(root: int, timeout: float = 30.0, quiet: float = 2.0) -> None:
    """Wait until the previous run's workers are gone, so that they are not counted as this
    run's: until the busy workers below ``root`` (not ``ray::IDLE``) have not changed for
    ``quiet`` s. Ray Data's detached helpers (its stats actor) outlive a run and stay."""
    deadline = time.monotonic() + timeout
    last: set[int] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        busy = {
            p for p in tree(root)
            if (n := TreeRss.name(p)).startswith("ray::") and not n.startswith(("ray::IDLE", *RAY_AGENTS))
        }  # fmt: skip
        if busy != last:
            last, since = busy, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.5)
