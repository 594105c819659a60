"""`ray job submit` end to end on a real two-node Ray cluster started here with `ray start`, and
the shared-storage check on a node whose folder is really node-local.

The nodes are this test's own processes: each `ray start --block` runs in a new session on free
ports and a private temp dir, with a marker variable in its environment that every Ray process
under it inherits; teardown kills exactly those (never `ray stop`, which would end every Ray on
the machine). Node-local storage is simulated for real: a third node runs in its own mount
namespace (`unshare -m`) with an empty tmpfs over the run folder, so the driver's files are not
there; this needs root (CAP_SYS_ADMIN), as this project's machines and CI have.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from helpers import brute_distances, kl_entropy_direct

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "RAYCOLLAPSE_TEST_CLUSTER"
TINY = [
    "data.n=64", "train.steps=4", "train.batch_size=8", "train.warmup_steps=1",
    "train.cpu_threads=1", "sample.steps=2", "sample.group_size=16", "sample.batch_size=32",
    "knn.k=2", "loop.iterations=1", "loop.train_size=16", "loop.pool_multiple=2",
    "train.launcher=ray",  # training on the cluster's nodes (Ray Train), not in the driver
]  # fmt: skip


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalRay:
    """Ray nodes started with `ray start --block` as this test's own process groups."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths have a limit
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # RAY_AUTH_MODE=disabled: no token for a cluster that listens on loopback only (the
        # test polls the dashboard's HTTP API; `ray job submit` works either way).
        # RAY_DASHBOARD_STARTUP_TIMEOUT_S: Ray's 60 s for the dashboard to come up was too short
        # on a 2-core host under load (`ray start --head` then gives up with an empty log).
        self.env.update({MARKER: self.temp, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
                         "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
                         "PATH": f"{Path(RAY).parent}:{self.env['PATH']}"})  # fmt: skip
        self.procs: list[subprocess.Popen] = []
        self.gcs, self.dashboard = _free_ports(2)

    def _node_args(self, cpus: int) -> list[str]:
        p = _free_ports(9)
        return [
            "--block", f"--temp-dir={self.temp}", f"--num-cpus={cpus}", "--num-gpus=0",
            "--object-store-memory=200000000", f"--node-manager-port={p[0]}",
            f"--object-manager-port={p[1]}", f"--min-worker-port={p[2]}",
            f"--max-worker-port={p[2] + 40}", f"--dashboard-agent-listen-port={p[3]}",
            f"--dashboard-agent-grpc-port={p[4]}", f"--metrics-export-port={p[5]}",
            f"--runtime-env-agent-port={p[6]}",
        ]  # fmt: skip

    def _start(self, cmd: list[str]) -> None:
        log = open(Path(self.temp) / f"node{len(self.procs)}.log", "w")  # noqa: SIM115
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log,
                                           start_new_session=True))  # fmt: skip

    def start_head(self, cpus: int) -> None:
        client = _free_ports(1)[0]
        self._start([RAY, "start", "--head", f"--port={self.gcs}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                     f"--ray-client-server-port={client}", *self._node_args(cpus)])  # fmt: skip
        self.wait_nodes(1)

    def add_node(self, cpus: int, private_dir: Path | None = None) -> None:
        cmd = [RAY, "start", f"--address=127.0.0.1:{self.gcs}", *self._node_args(cpus)]
        # its own temp dir, as on another machine: nodes sharing one would unpack the job's
        # working directory into the same folder at once
        node_temp = Path(self.temp) / f"n{len(self.procs)}"
        node_temp.mkdir()
        cmd = [c if not c.startswith("--temp-dir=") else f"--temp-dir={node_temp}" for c in cmd]
        if private_dir is not None:  # its own, empty folder at that path: node-local storage
            cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {private_dir} && exec \"$@\"", "sh", *cmd]  # fmt: skip
        self._start(cmd)
        self.wait_nodes(len(self.procs))

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def wait_nodes(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), self.logs()
            try:
                r = requests.get(f"{self.address}/nodes?view=summary", timeout=5)
                alive = [x for x in r.json()["data"]["summary"] if x["raylet"]["state"] == "ALIVE"]
                if len(alive) >= n:
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError(f"{n} Ray nodes did not come up:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in Path(self.temp).glob("node*.log"))

    def submit(self, *entrypoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` from the repository root; waits for the end."""
        return subprocess.run(
            [RAY, "job", "submit", "--address", self.address, "--working-dir", ".", "--", *entrypoint],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def stop(self) -> None:
        """End this cluster's processes only: the process groups started here, then any process
        that carries this cluster's marker (Ray workers re-title themselves)."""
        for p in self.procs:  # a throwaway cluster: no graceful shutdown needed
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        marker = f"{MARKER}={self.temp}".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    ray = LocalRay()
    try:
        ray.start_head(cpus=2)
        ray.add_node(cpus=2)  # same file system: shared storage
        yield ray
    finally:
        ray.stop()


def _parquet(folder: Path):
    return pq.read_table(sorted(folder.rglob("*.parquet")))


def _vectors(folder: Path) -> dict[int, np.ndarray]:
    t = _parquet(folder)
    return dict(
        zip(t.column("id").to_pylist(), np.asarray(t.column("embedding").to_pylist()), strict=True)
    )


def test_job_submit_runs_the_loop_on_two_nodes(cluster):
    run = Path(cluster.temp) / "shared" / "smoke"
    res = cluster.submit("raycollapse", "run", "configs/smoke.yaml", *TINY, f"loop.storage={run}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in res.stdout
    assert list((run / "ray_train" / "iter_000").glob("step-*"))  # Ray Train's checkpoint
    (row,) = json.loads((run / "metrics.json").read_text())
    # the metrics of iteration 0, recomputed from the stored embeddings with the definitions
    real = _vectors(run / "real" / "embeddings" / "pixel")
    refs = _parquet(run / "iter_000" / "train_set")
    assert set(refs.column("origin").to_pylist()) == {"real"}
    train = np.stack([real[i] for i in refs.column("origin_id").to_pylist()])
    pool = _vectors(run / "iter_000" / "embeddings" / "pixel")
    pool_x = np.stack([pool[i] for i in sorted(pool)])
    assert row["iteration"] == 0 and row["train_size"] == 16 and len(pool) == 32
    assert row["entropy_train"] == pytest.approx(kl_entropy_direct(train, 2), rel=1e-9)
    assert row["entropy_pool"] == pytest.approx(kl_entropy_direct(pool_x, 2), rel=1e-9)
    d1 = brute_distances(pool_x[:16], train).min(axis=1)
    assert row["generalization_score"] == pytest.approx(d1.mean(), rel=1e-9)


def test_node_local_storage_is_refused(cluster, tmp_path_factory):
    """A third node with its own folder at the run's path: the check names it and the fix."""
    local = Path(cluster.temp) / "local"
    local.mkdir()
    cluster.add_node(cpus=1, private_dir=local)
    check = ("from raycollapse.stages.shared_storage import check_shared_storage as c; "
             f"c('{local}/run'); print('SH' + 'ARED')")  # fmt: skip
    res = cluster.submit("python", "-c", check)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "SHARED" not in out
    assert "is not shared by every node of this 3-node Ray cluster" in out
    assert "s3://" in out and not list((local / "run").glob(".shared-storage-probe-*"))
    # the folder the two other nodes share passes on the same cluster
    res = cluster.submit("python", "-c", check.replace(f"{local}/run", f"{cluster.temp}/shared/x"))
    assert res.returncode == 0 and "SHARED" in res.stdout, res.stdout[-3000:]
