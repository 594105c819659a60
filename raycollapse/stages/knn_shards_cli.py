"""``raycollapse entropy`` / ``select`` with ``--shards S``: the sharded kNN behind the CLI.

Imported only when S != 1, so the default in-process path never imports Ray.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raycollapse.curation.entropy import EntropyResult, entropy_from_knn_distances
from raycollapse.data.inputs import load_features
from raycollapse.errors import UserInputError
from raycollapse.neighbors.validate import as_features, check_k
from raycollapse.stages.knn_shard_inputs import check_shards, embedding_parquet_files
from raycollapse.stages.knn_shards import ShardedIndex
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.select_inputs import npy_shape

__all__ = ["check_shards", "entropy_of_input", "selection_report"]


def _cpus_per_shard(shards: int) -> float:
    """One CPU per shard, or an equal share when the cluster has fewer CPUs than shards (a shard
    that can never be placed would wait forever). Ray takes 4 decimal places."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1e-4, math.floor(min(1.0, total / shards) * 1e4) / 1e4)


def entropy_of_input(path: str | Path, knn: Any, *, seed: int = 0) -> tuple[EntropyResult, str]:
    """KL entropy of INPUT on ``knn.shards`` actors; returns (result, feature kind).

    Parquet embedding shards and a 2-D ``.npy`` file are read by the actors themselves; any other INPUT is loaded on
    the driver with :func:`load_features` and sent through the object store.
    """
    files = embedding_parquet_files(path)
    if files is None and str(path).endswith(".npy") and Path(str(path)).is_file():
        try:
            npy_shape(str(path))  # 2-D numeric: the actors read their own row ranges
            files = [str(path)]
        except UserInputError:
            pass  # images or a bad file: load_features handles or explains it
    source: np.ndarray | list[str]
    if files is None:
        loaded = load_features(path)
        source, kind = loaded.features, loaded.kind
        shards = check_shards(knn.shards, len(source))  # fail before any actor starts
        check_k(knn.k, len(source))
    else:  # build() reads N from the Parquet footers and checks shards <= N there
        source, kind = files, "embedding"
        shards = check_shards(knn.shards, sys.maxsize)
    ensure_ray()
    with ShardedIndex.build(
        source, shards, num_cpus_per_shard=_cpus_per_shard(shards), batch_size=knn.batch_size
    ) as index:
        result = index.entropy(knn.k, knn.eps, bootstrap=knn.bootstrap, seed=seed)
    return result, kind


def selection_report(chosen: np.ndarray, knn: Any) -> tuple[float | None, float | None]:
    """(min pairwise distance, KL entropy) of a selection on up to ``knn.shards`` actors, as
    ``select``'s in-process report computes them (None where too few points). Uses
    ``min(shards, B)`` shards: a selection may be smaller than the shard count."""
    x = as_features(chosen, "selection", min_rows=1)
    if len(x) < 2:
        return None, None
    shards = min(int(knn.shards), len(x))
    ensure_ray()
    k = int(knn.k)
    with ShardedIndex.build(
        x, shards, num_cpus_per_shard=_cpus_per_shard(shards), batch_size=knn.batch_size
    ) as index:
        if len(x) <= k:
            return float(index.kth_distances(1).min()), None
        r = index.knn_self(k)
    entropy = entropy_from_knn_distances(r.distances[:, k - 1], x.shape[1], k, knn.eps).entropy
    return float(r.distances[:, 0].min()), entropy
