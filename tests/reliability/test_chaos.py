"""Chaos: shard actors killed, and a whole node lost, in the middle of a computation.

The other stages' kills live with their stages (tests/stages: generation, embedding and Ray
Train workers; tests/loop: the driver). Here: the long-lived shard actors of the sharded kNN
(entropy) and of the sharded selection, whose state the driver rebuilds on a replacement
(raycollapse/stages/shard_recovery.py). Each kill is deterministic: a hook in the actor
(tests/shard_hooks.py) kills it in its k-th call, once. Every result must equal the plain
single-node computation exactly: the entropy bit for bit, the selection index for index.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
import shard_hooks
from helpers import clustered

from raycollapse.curation.entropy import kl_entropy
from raycollapse.curation.greedy import greedy_select
from raycollapse.curation.threshold import threshold_select
from raycollapse.stages import knn_shards, select_shards
from raycollapse.stages.knn_shards import ShardedIndex
from raycollapse.stages.select_shards import select_sharded
from raycollapse.stages.shard_recovery import SHARD_RESTARTS, ShardLostError


def _pool(n: int = 1201, d: int = 6) -> np.ndarray:
    x = clustered(n, d, 0, n_clusters=12)
    x[n // 2 : n // 2 + 20] = x[:20]  # exact duplicates across shards: ties as uninterrupted
    return x


def test_killed_knn_shard_mid_entropy_gives_the_same_entropy(ray_local, tmp_path, monkeypatch):
    x = _pool()
    # Shard 1 dies in its 3rd search: the within-set search is then several batches in.
    hooked = shard_hooks.kill_shard_at(
        knn_shards.KnnShard, "search", shard=1, step=3, marks=tmp_path
    )
    monkeypatch.setattr(knn_shards, "KnnShard", hooked)
    with ShardedIndex.build(x, 3, num_cpus_per_shard=0.5, batch_size=100) as index:
        got = index.entropy(3)
        assert index._restarts.count == [0, 1, 0]  # shard 1 was lost once, and replaced
        assert shard_hooks.victim(tmp_path) not in [a._actor_id.hex() for a in index._actors]
    want = kl_entropy(x, 3)
    assert got == want  # the estimate bit for bit, and n, d, k, duplicates


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "threshold"])
def test_killed_selection_shard_gives_the_same_selection(ray_local, tmp_path, monkeypatch, method):
    x = _pool()
    step_method = {"greedy": "greedy_step", "threshold": "threshold_open"}[method]
    hooked = shard_hooks.kill_shard_at(
        select_shards.SelectShard, step_method, shard=2, step=3, marks=tmp_path
    )
    monkeypatch.setattr(select_shards, "SelectShard", hooked)
    budget = 300
    got = select_sharded(
        x, method, budget, shards=3, seed=4, decay=0.8, num_cpus_per_shard=0.5
    ).indices
    assert (tmp_path / "victim").exists(), "the hook never fired: the test tested nothing"
    want = (
        greedy_select(x, budget, 4)
        if method == "greedy"
        else threshold_select(x, budget, seed=4, decay=0.8).indices
    )
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_a_shard_lost_every_time_is_named(ray_local, monkeypatch):
    """Past SHARD_RESTARTS replacements the run stops with an error naming the shard."""

    def hook(actor, calls: int) -> None:
        if actor.shard == 0 and calls == 2:  # every incarnation: each dies in its 2nd step
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            time.sleep(60)

    hooked = shard_hooks.hooked_actor(select_shards.SelectShard, "greedy_step", hook)
    monkeypatch.setattr(select_shards, "SelectShard", hooked)
    x = _pool(300)
    with pytest.raises(ShardLostError, match=r"selection shard 0 \(rows 0\.\.149\)") as err:
        select_sharded(x, "greedy", 200, shards=2, num_cpus_per_shard=0.5)
    assert f"lost {SHARD_RESTARTS + 1} times" in str(err.value)


def test_lost_node_mid_selection_and_entropy(ray_cluster, tmp_path, monkeypatch):
    """A worker node removed (cluster.remove_node) while a shard on it is mid-call: the shard
    is replaced on a surviving node and the results equal the single-node ones."""
    x = _pool()
    head = ray.get_runtime_context().get_node_id()  # the driver's node: never removed
    nodes = {n.node_id: n for n in ray_cluster.worker_nodes}

    def remove_blocked_node(marks) -> threading.Thread:
        def remove() -> None:
            for _ in range(1200):
                if (marks / "node").exists():
                    ray_cluster.remove_node(nodes.pop((marks / "node").read_text()))
                    return
                time.sleep(0.1)

        thread = threading.Thread(target=remove, daemon=True)
        thread.start()
        return thread

    marks = tmp_path / "select"
    marks.mkdir()
    hooked = shard_hooks.block_shard_at(
        select_shards.SelectShard, "greedy_step", step=3, avoid_node=head, marks=marks
    )
    monkeypatch.setattr(select_shards, "SelectShard", hooked)
    remover = remove_blocked_node(marks)
    # 0.5 CPU per shard: the two nodes left can host the replacement.
    got = select_sharded(x, "greedy", 300, shards=3, seed=1, num_cpus_per_shard=0.5).indices
    remover.join(5)
    assert (marks / "node").exists() and len(nodes) == 1
    assert np.array_equal(got, greedy_select(x, 300, 1))

    ray_cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=300_000_000)
    nodes = {n.node_id: n for n in ray_cluster.worker_nodes}
    marks = tmp_path / "entropy"
    marks.mkdir()
    hooked = shard_hooks.block_shard_at(
        knn_shards.KnnShard, "search", step=3, avoid_node=head, marks=marks
    )
    monkeypatch.setattr(knn_shards, "KnnShard", hooked)
    remover = remove_blocked_node(marks)
    with ShardedIndex.build(x, 3, num_cpus_per_shard=0.5, batch_size=100) as index:
        got_h = index.entropy(3)
    remover.join(5)
    assert (marks / "node").exists()
    want = kl_entropy(x, 3)
    assert got_h == want
