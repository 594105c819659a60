"""Exact k-nearest-neighbour search with FAISS, Euclidean distance.

FAISS finds the candidate neighbours (flat, brute-force search; on the CPU, large searches skip
the rows that a k-means partition and the triangle inequality rule out, see
:mod:`raycollapse.neighbors.partitioned`, with the same result). The distances returned are then
recomputed exactly (see :func:`~raycollapse.neighbors.distances.pair_distances`) so that exact duplicates come out as 0.0 and
results are reproducible to the last bit. Memory stays bounded: queries go to FAISS in batches
of ``batch_size`` rows and no N x N matrix is ever built; besides the index (N x d float32, and
a sorted copy when partitioned) a search holds ~ batch_size x (k + 9) results and at most 4M
float64 differences for the exact recompute.

The sharded Ray index holds one :class:`ExactIndex` per shard, queries every shard, combines the
per-shard results with :func:`merge_topk` and, for a within-set search, removes each point
itself with :func:`drop_self` (asking the shards for ``k + 1`` neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.neighbors.device import GPU_MAX_K, parse_device
from raycollapse.neighbors.distances import drop_self_rows, rerank_exact, sort_rows
from raycollapse.neighbors.partitioned import (
    Partition,
    build_partition,
    default_n_lists,
    partitioned_candidates,
)
from raycollapse.neighbors.self_search import partition_may_pay, screen_applies, self_knn_cpu
from raycollapse.neighbors.threads import faiss_threads
from raycollapse.neighbors.validate import as_features, check_k

__all__ = [
    "ExactIndex",
    "KnnMethod",
    "KnnResult",
    "drop_self",
    "knn_search",
    "knn_self",
    "merge_topk",
]

# FAISS ranks candidates with float32 distances that carry rounding error. We ask it for this
# many extra candidates, recompute all distances exactly and keep the best k, so that near-ties
# and groups of exact duplicates are ranked by the exact distance (then by index).
_RERANK_PAD = 8

KnnMethod = Literal["auto", "flat", "partitioned"]
# method="auto" prunes with partitions (neighbors/partitioned.py) from this many rows on (below,
# flat is fast anyway) and when a search brings enough queries per partition list to repay the
# per-group work (measured: 3 per list is slower than flat, 13 already 2x faster).
_PARTITION_MIN_ROWS = 20_000
_PARTITION_QUERIES_PER_LIST = 8


@dataclass(frozen=True)
class KnnResult:
    """Neighbours of ``nq`` queries: row q lists its k neighbours, nearest first.

    ``distances``: (nq, k) float64 exact Euclidean distances, ascending along each row (ties
    ordered by index). ``indices``: (nq, k) int64 row numbers in the database. ``pair_share``:
    share of the ``nq x N`` query-row distances the search computed, 1.0 for a flat search and
    less when partition pruning skipped rows (None where not measured, e.g. merged shards).
    """

    distances: np.ndarray
    indices: np.ndarray
    pair_share: float | None = None

    @property
    def k(self) -> int:
        """Number of neighbours per query."""
        return int(self.distances.shape[1])


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _check_search_k(k: int, ntotal: int, *, gpu: bool) -> int:
    """Validate the neighbour count of a search in ``ntotal`` database rows."""
    if ntotal == 0:
        raise UserInputError("the index is empty; add vectors before searching")
    k = check_k(k, ntotal, what="database points", self_excluded=False)
    if gpu and k > GPU_MAX_K:  # pragma: no cover - GPU only
        raise UserInputError(
            f"k={k} exceeds the FAISS GPU limit of {GPU_MAX_K}; lower --k or use 'cpu'"
        )
    return int(k)


def _check_method(method: str, device: str) -> str:
    if method not in ("auto", "flat", "partitioned"):
        raise UserInputError(f"method must be 'auto', 'flat' or 'partitioned', got {method!r}")
    if method == "partitioned" and device != "cpu":
        raise UserInputError(
            f"method='partitioned' runs on the CPU, but device={device!r}; use method='flat' "
            "(or 'auto') on a GPU"
        )
    return method


class ExactIndex:
    """Exact Euclidean index over float32 vectors (a FAISS ``IndexFlatL2``, CPU or GPU).

    Its rows are numbered 0..ntotal-1 in the order added. ``search`` returns exact float64
    distances (recomputed from the stored float32 rows, see :func:`~raycollapse.neighbors.distances.pair_distances`).

    ``method``: ``'flat'`` compares every query with every row; ``'partitioned'`` skips the
    rows the triangle inequality rules out (:mod:`raycollapse.neighbors.partitioned`, CPU only:
    the same result, many times faster on clustered data, up to ~10% slower on data without
    clusters); ``'auto'`` partitions on the CPU for searches of at least 20,000 rows with at
    least 8 queries per partition list (about sqrt(N) lists). The partition is built at the
    first such search and kept until the next ``add``.
    """

    def __init__(
        self,
        d: int,
        *,
        device: str = "cpu",
        threads: int | None = None,
        method: KnnMethod = "auto",
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise UserInputError(f"index dimension d must be a positive integer, got {d!r}")
        self.d = int(d)
        self.device = device
        self.threads = threads
        self.method = _check_method(method, device)
        self._partition: Partition | None = None
        gpu = parse_device(device)
        self._gpu_resources = None
        # Host copies of the rows, only where FAISS's own storage cannot be viewed (GPU).
        self._host_chunks: list[np.ndarray] | None = None
        if gpu is None:
            self._index = faiss.IndexFlatL2(self.d)
        else:  # pragma: no cover - needs faiss-gpu and a GPU
            self._gpu_resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = gpu
            self._index = faiss.GpuIndexFlatL2(self._gpu_resources, self.d, config)
            self._host_chunks = []
        self._gpu = gpu

    @property
    def ntotal(self) -> int:
        """Number of rows in the index."""
        return int(self._index.ntotal)

    def add(self, x: np.ndarray) -> None:
        """Append the rows of ``x`` (N, d); they get the next ``ntotal`` .. ``ntotal+N-1``."""
        x = as_features(x, "vectors added to the index", min_rows=1)
        if x.shape[1] != self.d:
            raise UserInputError(
                f"vectors added to the index have {x.shape[1]} features but the index has "
                f"d={self.d}; embed all points with the same feature extractor"
            )
        with faiss_threads(self.threads):
            self._index.add(x)
        self._partition = None
        if self._host_chunks is not None:  # pragma: no cover - GPU only
            self._host_chunks.append(x.copy())

    def data(self) -> np.ndarray:
        """The stored rows as a float32 (ntotal, d) array.

        On the CPU this is a zero-copy view of FAISS's storage: use it before the next ``add``
        (which may reallocate it) and while the index is alive.
        """
        if self._host_chunks is not None:  # pragma: no cover - GPU only
            if len(self._host_chunks) > 1:
                self._host_chunks = [np.concatenate(self._host_chunks)]
            return self._host_chunks[0] if self._host_chunks else np.empty((0, self.d), "f4")
        n = self.ntotal
        if n == 0:
            return np.empty((0, self.d), dtype=np.float32)
        return faiss.rev_swig_ptr(self._index.get_xb(), n * self.d).reshape(n, self.d)

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = 4096) -> KnnResult:
        """The ``k`` nearest stored rows of each query row (exact, ties by index)."""
        q = self._check_queries(queries)
        k = self._check_k(k)
        return self._search(q, k, batch_size=batch_size)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = as_features(queries, "queries", min_rows=1)
        if q.shape[1] != self.d:
            raise UserInputError(
                f"queries have {q.shape[1]} features but the index has d={self.d}; "
                "embed queries and database with the same feature extractor"
            )
        return q

    def _check_k(self, k: int) -> int:
        return _check_search_k(k, self.ntotal, gpu=self._gpu is not None)

    def _search(
        self,
        q: np.ndarray,
        k: int,
        *,
        batch_size: int,
        query_ids: np.ndarray | None = None,
    ) -> KnnResult:
        """Search validated float32 queries. With ``query_ids``, row q excludes index
        ``query_ids[q]`` (see :func:`drop_self`); then ``k + 1 <= ntotal`` is required."""
        batch_size = _check_batch_size(batch_size)
        need = k if query_ids is None else k + 1
        n_fetch = min(need + _RERANK_PAD, self.ntotal)
        if self._gpu is not None:  # pragma: no cover - GPU only
            n_fetch = min(n_fetch, GPU_MAX_K)
        if self._prunes(q.shape[0]):
            return self._search_partitioned(q, k, need, n_fetch, batch_size, query_ids)
        data = self.data()
        nq = q.shape[0]
        out_d = np.empty((nq, k), dtype=np.float64)
        out_i = np.empty((nq, k), dtype=np.int64)
        with faiss_threads(self.threads):
            for start in range(0, nq, batch_size):
                qb = q[start : start + batch_size]
                _, cand = self._index.search(qb, n_fetch)
                dist, cand = rerank_exact(qb, data, cand)
                if query_ids is not None:
                    res = drop_self(KnnResult(dist, cand), query_ids[start : start + batch_size], k)
                    dist, cand = res.distances, res.indices
                out_d[start : start + qb.shape[0]] = dist[:, :k]
                out_i[start : start + qb.shape[0]] = cand[:, :k]
        return KnnResult(out_d, out_i, pair_share=1.0)

    def _prunes(self, n_queries: int) -> bool:
        """Whether a search of ``n_queries`` queries goes through the partition."""
        if self.method != "auto":
            return self.method == "partitioned"
        n = self.ntotal
        return (
            self._gpu is None
            and n >= _PARTITION_MIN_ROWS
            and n_queries >= _PARTITION_QUERIES_PER_LIST * default_n_lists(n)
        )

    def search_order(self, n_queries: int) -> np.ndarray:
        """An order of the rows that keeps neighbours together, for searches whose queries are
        this index's own rows sent in batches (the sharded within-set search).

        When a search of ``n_queries`` queries is pruned (see the class docstring), the rows
        sorted by partition list: a batch then holds whole lists, so its queries form large
        groups, as in one search of all rows at once. Otherwise ``0 .. ntotal - 1``.
        """
        if not self._prunes(n_queries):
            return np.arange(self.ntotal, dtype=np.int64)
        return self._get_partition().order.copy()

    def _get_partition(self) -> Partition:
        if self._partition is None:
            with faiss_threads(self.threads):
                self._partition = build_partition(self.data(), default_n_lists(self.ntotal))
        return self._partition

    def _search_partitioned(
        self,
        q: np.ndarray,
        k: int,
        need: int,
        n_fetch: int,
        batch_size: int,
        query_ids: np.ndarray | None,
    ) -> KnnResult:
        partition = self._get_partition()
        with faiss_threads(self.threads):
            dist, idx, stats = partitioned_candidates(
                self.data(), q, need, n_fetch, partition=partition, batch_size=batch_size
            )
        if query_ids is not None:
            return drop_self(KnnResult(dist, idx, stats.pair_share), query_ids, k)
        return KnnResult(
            np.ascontiguousarray(dist[:, :k]), np.ascontiguousarray(idx[:, :k]), stats.pair_share
        )


def drop_self(result: KnnResult, query_ids: np.ndarray, k: int) -> KnnResult:
    """Remove each query's own index from its neighbour list and keep ``k`` neighbours.

    ``result`` must hold at least ``k + 1`` neighbours per row, sorted by (distance, index);
    ``query_ids[q]`` is the index of query q in the same numbering. Exclusion is by index, not by
    distance: with exact duplicates the point itself need not come first among equal
    distances. When the point's index is present it is removed, else the last neighbour is
    dropped (the point then has at least k + 1 exact duplicates ranked before it).
    """
    query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
    nq, m = result.indices.shape
    if query_ids.shape[0] != nq:
        raise UserInputError(f"drop_self: {query_ids.shape[0]} query ids for {nq} result rows")
    if m < k + 1:
        raise UserInputError(f"drop_self needs k + 1 = {k + 1} neighbours per row, got {m}")
    dist, idx = drop_self_rows(result.distances, result.indices, query_ids, k)
    return KnnResult(dist, idx, result.pair_share)


def merge_topk(results: Sequence[KnnResult], offsets: Sequence[int], k: int) -> KnnResult:
    """Combine per-shard results into the global ``k`` nearest neighbours.

    ``results[s]`` holds shard s's neighbours of the same queries, with shard-local indices;
    ``offsets[s]`` is the global index of shard s's first row. Rows are merged by (distance,
    global index), so the result equals one index over all shards when each shard returned its
    own top ``min(k, shard size)``.
    """
    if len(results) == 0 or len(results) != len(offsets):
        raise UserInputError(
            f"merge_topk needs one offset per shard result, got {len(results)} results and "
            f"{len(offsets)} offsets"
        )
    nq = results[0].distances.shape[0]
    if any(r.distances.shape[0] != nq for r in results):
        raise UserInputError("merge_topk: shard results cover different numbers of queries")
    dist = np.concatenate([np.asarray(r.distances, dtype=np.float64) for r in results], axis=1)
    idx = np.concatenate(
        [
            np.asarray(r.indices, dtype=np.int64) + int(o)
            for r, o in zip(results, offsets, strict=True)
        ],
        axis=1,
    )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= dist.shape[1]:
        raise UserInputError(
            f"merge_topk: k must be between 1 and the {dist.shape[1]} neighbours the shards "
            f"returned, got {k!r}"
        )
    dist, idx = sort_rows(dist, idx)
    return KnnResult(np.ascontiguousarray(dist[:, :k]), np.ascontiguousarray(idx[:, :k]))


def knn_search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    batch_size: int = 4096,
    threads: int | None = None,
    device: str = "cpu",
    method: KnnMethod = "auto",
) -> KnnResult:
    """The ``k`` nearest ``database`` rows of each ``queries`` row (exact Euclidean).

    Distances are exact float64 (see :func:`~raycollapse.neighbors.distances.pair_distances`), rows sorted by (distance, index).
    Queries are searched ``batch_size`` rows at a time. ``threads`` sets FAISS's OpenMP threads
    for the call (None: FAISS default). ``device='cuda'`` uses a FAISS GPU index and raises
    UserInputError when faiss-gpu is not installed (no silent CPU fallback). ``method``: see
    :class:`ExactIndex` (the result does not depend on it).
    """
    db = as_features(database, "database", min_rows=1)
    index = ExactIndex(db.shape[1], device=device, threads=threads, method=method)
    q = index._check_queries(queries)
    k = _check_search_k(k, db.shape[0], gpu=index._gpu is not None)
    index.add(db)
    return index._search(q, k, batch_size=batch_size)


def knn_self(
    x: np.ndarray,
    k: int,
    *,
    batch_size: int = 4096,
    threads: int | None = None,
    device: str = "cpu",
    method: KnnMethod = "auto",
) -> KnnResult:
    """The ``k`` nearest neighbours of every row of ``x`` among the other rows (1 <= k < N).

    Each point is excluded by index (see :func:`drop_self`), so an exact duplicate of a point
    is a neighbour at distance 0.0. Other arguments as in :func:`knn_search`. On the CPU with
    ``method='auto'`` the rows partition pruning gives up on are searched by symmetric products
    (:mod:`raycollapse.neighbors.self_search`, each pair computed once; ``threads`` Python
    threads, default BLAS's), with the same result.
    """
    x = as_features(x, "features")
    k = check_k(k, x.shape[0])
    index = ExactIndex(x.shape[1], device=device, threads=threads, method=method)
    if index._gpu is not None and k + 1 > GPU_MAX_K:  # pragma: no cover - GPU only
        raise UserInputError(f"k={k} exceeds the FAISS GPU limit; lower --k or use 'cpu'")
    index.add(x)
    _check_batch_size(batch_size)
    if index._gpu is None and method == "auto" and screen_applies(x):
        # Symmetric products for the rows pruning leaves, all rows where it cannot pay (same result).
        prunes = index._prunes(x.shape[0]) and partition_may_pay(x, k)
        part = index._get_partition() if prunes else None
        n_fetch = min(k + 1 + _RERANK_PAD, x.shape[0])
        with faiss_threads(threads):
            dist, idx, share = self_knn_cpu(x, k, n_fetch, part, workers=threads)
        return KnnResult(dist, idx, share)
    return index._search(
        x, k, batch_size=batch_size, query_ids=np.arange(x.shape[0], dtype=np.int64)
    )
