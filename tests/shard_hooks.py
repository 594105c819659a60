"""Test-only shard stages: a small counting stage, and a hook that kills an actor mid-shard.

Ray workers cannot import this module (``tests/`` is on the test's path only), so it is pickled
by value: its classes and functions travel with the stage objects to the actors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.cloudpickle

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.stages.shard_job import ShardStage

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

META = b"test.counting"


@dataclass
class CountingStage(ShardStage):
    """Shard ``{shard, lo, hi, step}`` -> ``out/c-{shard}.parquet``: ids ``lo … hi−1`` and
    ``x = step * id + 1``."""

    META_KEY = META
    HOLDS = "other counts"
    FIX = "Use another folder."

    name: str = "count"
    out: str = ""
    setup_error: str = ""

    def inputs(self) -> tuple[str, ...]:
        return ("shard", "lo", "hi", "step")

    def setup(self) -> None:
        if self.setup_error:
            raise UserInputError(self.setup_error)

    def shard_out(self, spec: dict[str, Any]) -> str:
        return storage.join(self.out, f"c-{int(spec['shard'])}.parquet")

    def shard_rows(self, spec: dict[str, Any]) -> int:
        return int(spec["hi"]) - int(spec["lo"])

    def process_shard(self, spec: dict[str, Any]) -> int:
        ids = np.arange(int(spec["lo"]), int(spec["hi"]), dtype=np.int64)
        table = pa.table({"id": ids, "x": int(spec["step"]) * ids + 1})
        meta = {META: json.dumps(self.signature, sort_keys=True)}
        storage.write_parquet_atomic(table.replace_schema_metadata(meta), self.shard_out(spec))
        return len(ids)


def _kill_first_shard(marks: Path, no_restart: bool, timeout_s: float) -> None:
    """The first shard to start (it creates ``marks/victim`` atomically) kills its own actor
    while in progress; every other shard, and that shard's retry, passes."""
    try:
        fd = os.open(marks / "victim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, ray.get_runtime_context().get_actor_id().encode())
    os.close(fd)
    ray.kill(ray.get_runtime_context().current_actor, no_restart=no_restart)
    time.sleep(timeout_s)  # the kill lands here, in the middle of this shard
    raise RuntimeError("the actor survived its own ray.kill")


def kill_mid_shard(
    stage: ShardStage, marks: Path, *, no_restart: bool, timeout_s: float = 120
) -> ShardStage:
    """A copy of ``stage`` whose first shard kills its actor while in progress (``ray.kill``,
    ``no_restart`` as given); ``marks`` (an empty folder) receives ``victim``, the actor's id."""

    class KillMidShard(type(stage)):  # type: ignore[misc, valid-type]
        def process_shard(self, spec: dict[str, Any]) -> int:
            _kill_first_shard(marks, no_restart, timeout_s)
            return super().process_shard(spec)

    return KillMidShard(**{f.name: getattr(stage, f.name) for f in fields(stage)})


def victim(marks: Path) -> str:
    """The id of the actor the hook killed."""
    return (marks / "victim").read_text()


def hooked_actor(remote_cls: Any, method: str, hook: Any) -> Any:
    """A Ray actor class like ``remote_cls`` whose ``method`` first calls ``hook(self, calls)``
    (``calls``: how often this actor's ``method`` has run, this call included)."""
    base = remote_cls.__ray_actor_class__

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._hook_calls = getattr(self, "_hook_calls", 0) + 1
        hook(self, self._hook_calls)
        return getattr(base, method)(self, *args, **kwargs)

    return ray.remote(type(base.__name__, (base,), {method: wrapped}))


def kill_shard_at(
    remote_cls: Any, method: str, *, shard: int, step: int, marks: Path, timeout_s: float = 120
) -> Any:
    """``remote_cls`` (a shard actor: ``self.shard``) whose shard ``shard`` kills itself
    (``ray.kill``, no restart) in its ``step``-th call of ``method``, once: its replacement,
    which replays the same calls, passes (``marks/victim`` exists by then)."""

    def hook(actor: Any, calls: int) -> None:
        if actor.shard == shard and calls == step:
            _kill_first_shard(marks, True, timeout_s)

    return hooked_actor(remote_cls, method, hook)


def block_shard_at(
    remote_cls: Any, method: str, *, step: int, avoid_node: str, marks: Path, timeout_s: float = 120
) -> Any:
    """``remote_cls`` whose first shard (on a node other than ``avoid_node``) to reach its
    ``step``-th call of ``method`` writes its node id to ``marks/node`` and then blocks (until
    the test removes that node); every other call, and the replacement's, passes."""

    def hook(actor: Any, calls: int) -> None:
        node = ray.get_runtime_context().get_node_id()
        if calls != step or node == avoid_node:
            return
        try:
            fd = os.open(marks / "victim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        (marks / "node.tmp").write_text(node)
        os.replace(marks / "node.tmp", marks / "node")  # the test polls for a whole file
        time.sleep(timeout_s)  # the node goes away while this call is in progress
        raise RuntimeError("the node of the blocked shard was not removed")

    return hooked_actor(remote_cls, method, hook)
