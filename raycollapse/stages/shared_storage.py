"""Is the run's storage shared by every node of the Ray cluster? Checked for real, before any work.

A local path (or ``file://`` URI) is only safe on a multi-node cluster when every node mounts the
same file system there (NFS, EFS, Filestore, a shared volume): each stage's tasks write their
shards on the node they run on, and the driver reads them back. The check writes a probe file
with a random token through the driver and reads it back with one zero-CPU task pinned to each
alive node; a node that does not see it has its own, node-local folder at that path. URIs of
object stores (``s3://``, ``gs://``, ...) are shared by construction and are not probed.

Nodes that join later (an autoscaled worker group growing from zero) cannot be checked at start.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.stages.runtime import ensure_ray

PROBE_PREFIX = ".shared-storage-probe-"


def _local_path(uri: str) -> str | None:
    """The local folder of ``uri``, or None for an object-store URI."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return None if "://" in uri else str(Path(uri).absolute())


@ray.remote(num_cpus=0, max_retries=0)
def _sees(path: str, token: str) -> bool:
    """Whether this node reads ``token`` from the file at ``path``."""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_shared_storage(uri: str, key: str = "loop.storage") -> None:
    """Refuse a local ``uri`` that some alive node of the Ray cluster does not share (connects
    with ``ensure_ray`` when needed).

    One node, or an object-store URI: nothing to check. Otherwise a probe file is written under
    ``uri`` (created if missing) and removed again; ``UserInputError`` names the nodes that did
    not see it and how to fix ``key``.
    """
    local = _local_path(str(uri))
    if local is None:
        return
    ensure_ray()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    token = secrets.token_hex(16)
    probe = str(Path(local) / f"{PROBE_PREFIX}{token[:8]}")
    storage.makedirs(local)
    storage.write_text_atomic(probe, token)
    try:
        refs = [
            _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(probe, token)
            for n in nodes
        ]
        answers = ray.get(refs)
    finally:
        Path(probe).unlink(missing_ok=True)
    blind = [
        f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})"
        for n, seen in zip(nodes, answers, strict=True)
        if not seen
    ]
    if blind:
        raise UserInputError(
            f"{key}='{uri}' is not shared by every node of this {len(nodes)}-node Ray cluster: "
            f"node(s) {', '.join(blind)} do not see a file the driver wrote there (their folder at "
            f"that path is node-local). Use a path every node mounts (NFS, EFS, Filestore, a "
            f"shared volume) or an object-store URI such as s3://bucket/runs or gs://bucket/runs."
        )
