"""The pool-sized part of the metrics stage, with a bounded number of pool rows on the driver.

One feature space of one iteration (definitions: docs/design.md and ``loop/measure.py``). The
real set and the training set (B rows) are held in memory; the pool (N = m x B rows) is read
from its embedding files one chunk at a time (``io/embedding_stream.py``) into the streamed
Fréchet statistics and PRDC counts (``metrics/streaming.py``), which give the values of
``frechet_distance(pool, real)`` and ``prdc(real, pool, k=5)`` on the whole arrays. What needs
a kNN within the pool (its KL entropy, the PRDC radii of its rows):

- ``shards > 1``: one sharded kNN index over the pool's files (``stages/knn_shards.py``: each
  actor reads its own rows); the driver receives r_k, 8 bytes per row and k, never the vectors.
  The driver's pool-sized memory is then the ids (8 bytes per row) and those radii; the
  vectors pass through it one chunk at a time, each row once.
- ``shards <= 1``: the in-process kNN needs the whole pool, so the driver reads it once, in id
  order, into one array (no cached copy in the Catalog; the kNN's FAISS index holds a second
  copy while it runs); the streamed accumulators take views of it.

The ``entropy_generated`` / generalization / memorized metrics use the first len(train) pool
rows by id: on the sharded path they are kept as the chunks pass (the ids at most the
len(train)-th smallest), in process sliced from the array. The training set is read row by row
from its origins' files (:func:`train_embeddings`), never through a whole cached origin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from raycollapse.curation.entropy import entropy_from_knn_distances, kl_entropy
from raycollapse.io.embedding_stream import (
    CHUNK_BYTES,
    chunk_rows_for,
    embedding_files,
    iter_embeddings,
    iter_ids_embeddings,
    read_in_id_order,
    read_rows,
    row_counts,
    smallest_ids,
)
from raycollapse.loop.catalog import Catalog, Ref
from raycollapse.metrics.distribution import feature_stats, frechet_from_stats
from raycollapse.metrics.memorization import generalization_from_distances, memorized_from_distances
from raycollapse.metrics.streaming import GaussianStats, PrdcAccumulator
from raycollapse.neighbors.knn import knn_search, knn_self
from raycollapse.neighbors.validate import check_k

PRDC_K = 5  # Naeem et al.'s k
MEMORIZED_RATIO = 1.0 / 3.0


def _entropy(x: np.ndarray, k: int, eps: float) -> float | None:
    return kl_entropy(x, k=k, eps=eps).entropy if len(x) > k else None


def train_embeddings(cat: Catalog, refs: list[Ref], features: str, chunk_rows: int) -> np.ndarray:
    """The embeddings of ``refs`` in their order (``Catalog.gather_embeddings``'s values),
    reading only their rows: the training set may come from earlier pools, which
    ``gather_embeddings`` would load (and cache) whole."""
    parts: list[np.ndarray] = []
    for piece in cat.embedding_rows(refs, features):
        if isinstance(piece, str):  # every row of this file, in stored order
            parts.extend(iter_embeddings([piece], chunk_rows))
            continue
        files, nos, rows = piece
        out: np.ndarray | None = None
        for no in np.unique(nos):
            at = np.flatnonzero(nos == no)
            x = read_rows(files[no], rows[at], chunk_rows)
            if out is None:
                out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
            out[at] = x
        if out is not None:
            parts.append(out)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def pool_kth_distances(
    files: Sequence[str], n: int, ks: Sequence[int], shards: int, batch_size: int | None = None
) -> tuple[int, dict[int, np.ndarray]]:
    """``(d, {k: r_k})``: each pool row's distance to its k-th nearest other row, rows in
    storage order (``files`` concatenated), for every k in ``ks``, from one sharded index on
    ``min(shards, n)`` kNN shard actors that read their rows from ``files``. ``batch_size``:
    query rows per batch (None: the index's default), which bounds the driver's merge memory."""
    from raycollapse.stages.knn_shards import ShardedIndex
    from raycollapse.stages.runtime import ensure_ray
    from raycollapse.stages.select_shards import auto_cpus_per_shard

    ensure_ray()
    shards = min(shards, n)
    opts = {} if batch_size is None else {"batch_size": batch_size}
    cpus = auto_cpus_per_shard(shards)
    with ShardedIndex.build(files, shards, num_cpus_per_shard=cpus, **opts) as idx:
        return idx.d, {k: idx.kth_distances(k) for k in sorted(set(ks))}


def feature_metrics(
    cat: Catalog,
    gen: str,
    train_refs: list[Ref],
    features: str,
    *,
    k: int,
    eps: float,
    shards: int,
    with_prdc: bool,
    chunk_bytes: int = CHUNK_BYTES,
    knn_batch: int | None = None,
) -> dict[str, Any]:
    """Metrics of pool ``gen`` in feature space ``features``, unsuffixed names: the entropies
    of the training set, the pool and the generated samples, generalization score, memorized
    fraction, ``fd`` (Fréchet distance to the real data) and, with ``with_prdc``, precision,
    recall, density and coverage (k = 5). ``chunk_bytes``: pool vectors per chunk on the
    driver; ``knn_batch``: rows per batch of the sharded kNN (:func:`pool_kth_distances`)."""
    _, real_x = cat.embeddings("real", features)
    rows = chunk_rows_for(real_x.shape[1], chunk_bytes)
    train_x = train_embeddings(cat, train_refs, features, rows)
    files = embedding_files(cat.embeddings_uri(gen, features))
    b = len(train_refs)
    radii: np.ndarray | None = None
    # The generated samples: the first b pool rows by id; on the sharded path they are picked
    # out of the chunks as they pass (ids <= the b-th smallest id), in storage order.
    gen_ids: list[np.ndarray] = []
    gen_parts: list[np.ndarray] = []
    if shards <= 1:
        _, pool_x = read_in_id_order(files, rows)
        n = len(pool_x)
        entropy_pool = _entropy(pool_x, k, eps)
        if with_prdc:
            check_k(PRDC_K, n, what="fake points", hint="Naeem et al. use k=5")
            radii = knn_self(pool_x, PRDC_K).distances[:, PRDC_K - 1]
        gen_ids, gen_parts = [np.arange(min(b, n))], [pool_x[:b]]
        cut = -1  # nothing more to pick from the chunks
        chunks: Iterator[tuple[np.ndarray | None, np.ndarray]] = (
            (None, pool_x[s : s + rows]) for s in range(0, n, rows)
        )
    else:
        n = int(sum(row_counts(files)))
        ks = ([k] if n > k else []) + ([PRDC_K] if with_prdc else [])
        if with_prdc:
            check_k(PRDC_K, n, what="fake points", hint="Naeem et al. use k=5")
        entropy_pool = None
        if ks:
            d, r = pool_kth_distances(files, n, ks, shards, knn_batch)
            entropy_pool = entropy_from_knn_distances(r[k], d, k, eps).entropy if n > k else None
            radii = r.get(PRDC_K) if with_prdc else None
            del r
        first = smallest_ids(files, b)
        cut = int(first[-1]) if len(first) else None
        chunks = iter_ids_embeddings(files, rows)
    stats = GaussianStats("pool embeddings")
    acc = PrdcAccumulator(real_x, PRDC_K) if with_prdc else None
    start = 0
    for ids, x in chunks:
        stats.add(x)
        if acc is not None and radii is not None:
            acc.add(x, radii[start : start + len(x)])
        start += len(x)
        if ids is not None and cut is not None:
            keep = ids <= cut
            gen_ids.append(ids[keep])
            gen_parts.append(x[keep])
    order = np.argsort(np.concatenate(gen_ids), kind="stable")
    gen_x = np.concatenate(gen_parts)[order]
    nn = knn_search(train_x, gen_x, 2)
    d1, d2 = nn.distances[:, 0], nn.distances[:, 1]
    return {
        "entropy_train": _entropy(train_x, k, eps),
        "entropy_pool": entropy_pool,
        "entropy_generated": _entropy(gen_x, k, eps),
        "generalization_score": generalization_from_distances(d1),
        "memorized_fraction": memorized_from_distances(d1, d2, MEMORIZED_RATIO),
        "fd": frechet_from_stats(*stats.stats(), *feature_stats(real_x)),
        **(acc.result() if acc is not None else {}),
    }
