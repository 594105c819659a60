"""Exact kNN over a database split into shards, one Ray actor per shard.

Rows are cut into ``S`` contiguous shards (shard s holds global rows ``offsets[s]`` ..
``offsets[s] + sizes[s] - 1``); each :class:`KnnShard` actor holds one exact index of its rows
(:class:`~raycollapse.neighbors.knn.ExactIndex`: FAISS flat, pruned by a partition on the CPU for
large shards and query batches, as in the core path). A search sends every query batch to all
shards, each returns its own top-k with *global* indices, and the driver merges them with
:func:`~raycollapse.neighbors.knn.merge_topk`, ordering by (exact distance, global index). The
result is therefore the same as the in-process core path (:func:`~raycollapse.neighbors.knn.knn_search`
/ :func:`~raycollapse.neighbors.knn.knn_self`): same float64 distances bit for bit, same indices,
ties included.

Data reaches the actors either through the object store (an array on the driver) or, for
Parquet embedding shards (local folder or a ``s3://``-style URI), each actor reads its own
row range: the driver then reads only file footers and never holds the vectors. For a
within-set search the query batches are the shards' own rows, passed actor to actor as object
refs, so that path never ships the vectors through the driver either.

Memory per actor: its rows (n_s x d float32; twice that when partition-pruned, which keeps the
rows sorted by list) plus one query batch; on the driver: one batch of merged results per
in-flight batch, the (N, k) output and, for within-set searches, the shards' row orders (8 bytes
per row).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raycollapse.curation.entropy import EntropyResult, entropy_from_knn_distances
from raycollapse.data.inputs import EMBEDDING_COLUMN
from raycollapse.errors import UserInputError
from raycollapse.metrics.memorization import generalization_from_distances, memorized_from_distances
from raycollapse.neighbors.knn import ExactIndex, KnnMethod, KnnResult, drop_self, merge_topk
from raycollapse.neighbors.validate import as_features, check_k
from raycollapse.stages.base import Resources, check_resources
from raycollapse.stages.knn_shard_inputs import (
    Piece,
    check_shards,
    embedding_parquet_files,
    parquet_row_counts,
    plan_pieces,
)
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.select_inputs import npy_shape, read_pieces
from raycollapse.stages.shard_recovery import (
    Restarts,
    ShardLostError,
    _get,
    _pipelined,
    dead_shards,
    wait_started,
)

__all__ = [
    "KnnShard",
    "ShardedIndex",
    "check_shards",
    "embedding_parquet_files",
    "parquet_row_counts",
]


@ray.remote
class KnnShard:
    """One shard: an :class:`ExactIndex` of global rows ``offset`` .. ``offset + ntotal - 1``."""

    def __init__(
        self,
        shard: int,
        offset: int,
        *,
        threads: int,
        device: str = "cpu",
        method: KnnMethod = "auto",
    ) -> None:
        self.shard = shard
        self.offset = offset
        self.threads = threads
        self.device = device
        self.method = method
        self.index: ExactIndex | None = None
        self.order = np.empty(0, dtype=np.int64)  # see search_order

    def load_array(self, x: np.ndarray) -> tuple[int, int]:
        """Index the rows ``x`` (from the object store); returns (rows, d)."""
        name = f"embeddings of shard {self.shard} (rows {self.offset}..{self.offset + len(x) - 1})"
        x = as_features(x, name, min_rows=1)
        self.index = ExactIndex(
            x.shape[1], device=self.device, threads=self.threads, method=self.method
        )
        self.index.add(x)
        return self.index.ntotal, self.index.d

    def load_parquet(self, pieces: Sequence[Piece], column: str) -> tuple[int, int]:
        """Read this shard's rows from Parquet (or ``.npy``) files itself; returns (rows, d)."""
        return self.load_array(read_pieces(pieces, column))

    def search(self, queries: np.ndarray, k: int, batch_size: int) -> KnnResult:
        """This shard's ``min(k, rows)`` nearest rows of each query, with GLOBAL indices."""
        assert self.index is not None, "load_array/load_parquet first"
        res = self.index.search(queries, min(k, self.index.ntotal), batch_size=batch_size)
        return KnnResult(res.distances, res.indices + self.offset)

    def search_order(self, n_queries: int) -> np.ndarray:
        """Local row order for within-set batches (``ExactIndex.search_order``), kept here so
        that :meth:`self_search` and :meth:`rows` take positions in it."""
        assert self.index is not None, "load_array/load_parquet first"
        self.order = self.index.search_order(n_queries)
        return self.order

    def self_search(self, start: int, stop: int, k: int, batch_size: int) -> KnnResult:
        """:meth:`search` with this shard's rows at positions ``start`` .. ``stop - 1`` of its
        search order as queries."""
        return self.search(self.rows(start, stop), k, batch_size)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A copy of the rows at positions ``start`` .. ``stop - 1`` of the search order (query
        batches for other shards)."""
        assert self.index is not None, "load_array/load_parquet first"
        return self.index.data()[self.order[start:stop]]

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()


class ShardedIndex:
    """Driver-side handle on ``S`` :class:`KnnShard` actors; use :meth:`build`.

    Use as a context manager (or call :meth:`shutdown`) so the actors are killed promptly. A
    shard actor lost during a search is replaced and its batch redone (:meth:`_recover`).
    """

    def __init__(
        self, actors: list, offsets: list[int], sizes: list[int], d: int, batch_size: int
    ) -> None:
        self._actors = actors
        self.offsets = offsets
        self.sizes = sizes
        self.d = d
        self.batch_size = batch_size
        # How to start and load a replacement of shard s (set by build): the actor class and
        # options, its constructor kwargs, its load call; the within-set search order it had.
        self._start: tuple[Any, dict[str, Any], list[dict[str, Any]], float | None] | None = None
        self._loads: list[tuple[str, tuple]] = []
        self._order_n: int | None = None
        self._orders: list[np.ndarray] | None = None
        self._restarts = Restarts(len(actors))

    @property
    def shards(self) -> int:
        return len(self._actors)

    @property
    def n(self) -> int:
        """Rows in the database (all shards)."""
        return int(sum(self.sizes))

    @classmethod
    def build(
        cls,
        source: np.ndarray | str | Path | Sequence[str],
        shards: int,
        *,
        num_cpus_per_shard: float = 1.0,
        num_gpus_per_shard: float = 0.0,
        spread: bool = True,
        batch_size: int = 65536,
        column: str = EMBEDDING_COLUMN,
        start_timeout_s: float | None = 600.0,
        method: KnnMethod = "auto",
    ) -> ShardedIndex:
        """Start ``shards`` actors over the rows of ``source`` cut into contiguous shards.

        ``source``: an (N, d) array (sent through the object store), or a Parquet file, folder
        or URI, or an explicit list of Parquet (or ``.npy``) files, with an embedding ``column`` (each actor
        reads its own rows). ``spread``: place actors with the SPREAD strategy, so shards land
        on different nodes (memory per node). Each actor's FAISS uses ``max(1,
        int(num_cpus_per_shard))`` threads; ``num_gpus_per_shard > 0`` asks for a GPU index
        (an error when faiss-gpu is missing: never a silent CPU fallback). Actors not running
        after ``start_timeout_s`` (their CPUs/GPUs held by other work) raise UserInputError
        instead of waiting forever; None waits (e.g. for an autoscaler). ``method``: the
        shards' search, as in :class:`~raycollapse.neighbors.knn.ExactIndex` (same result); query
        batches of ``batch_size`` rows should hold several queries per partition list (about
        sqrt(rows per shard) lists) for the pruning to pay.
        """
        x: np.ndarray | None = None
        if isinstance(source, (str, Path)):
            files = embedding_parquet_files(source, column)
            if files is None:
                raise UserInputError(
                    f"'{source}' is not Parquet with an '{column}' column; pass an array "
                    "(e.g. from load_features) or Parquet embedding shards"
                )
        elif isinstance(source, Sequence) and source and all(isinstance(f, str) for f in source):
            files = list(source)
        else:
            x = as_features(source, "database", min_rows=1)
        if x is not None:
            counts = [x.shape[0]]
        elif all(f.endswith(".npy") for f in files):
            counts = [npy_shape(f)[0][0] for f in files]
        else:
            counts = parquet_row_counts(files, column)
        n = int(sum(counts))
        shards = check_shards(shards, n)
        bounds = (np.arange(shards + 1, dtype=np.int64) * n) // shards
        ensure_ray()
        check_resources(Resources(num_cpus_per_shard, num_gpus_per_shard), shards, "knn shards")
        opts: dict[str, Any] = {"num_cpus": num_cpus_per_shard, "num_gpus": num_gpus_per_shard}
        if spread:
            opts["scheduling_strategy"] = "SPREAD"
        device = "cuda" if num_gpus_per_shard > 0 else "cpu"
        threads = max(1, int(num_cpus_per_shard))
        actor_cls = KnnShard  # read once: a replacement is of the same class
        kwargs = [
            dict(shard=s, offset=int(bounds[s]), threads=threads, device=device, method=method)
            for s in range(shards)
        ]
        actors = [actor_cls.options(**opts).remote(**kw) for kw in kwargs]
        try:
            started = [a.node_id.remote() for a in actors]
            _, pending = ray.wait(started, num_returns=shards, timeout=start_timeout_s)
            if pending:
                raise UserInputError(
                    f"{len(pending)} of {shards} kNN shard actors did not start within "
                    f"{start_timeout_s:g} s: no node has {num_cpus_per_shard:g} CPU(s) and "
                    f"{num_gpus_per_shard:g} GPU(s) free (other work holds them); free them, "
                    "add nodes, use fewer shards or fewer CPUs per shard"
                )
            if x is not None:  # one object per shard: each node pulls only its own rows
                # The driver keeps these refs: a replacement shard loads from them again.
                parts = [ray.put(x[bounds[s] : bounds[s + 1]]) for s in range(shards)]
                load_calls = [("load_array", (p,)) for p in parts]
            else:
                plan = plan_pieces(files, counts, bounds)
                load_calls = [("load_parquet", (p, column)) for p in plan]
            info = _get(
                [
                    getattr(a, m).remote(*args)
                    for a, (m, args) in zip(actors, load_calls, strict=True)
                ]
            )
            dims = {d for _, d in info}
            if len(dims) != 1:
                raise UserInputError(
                    f"embedding shards differ in dimension {sorted(dims)}; re-embed"
                )
        except BaseException:  # never leave actors holding CPUs and memory behind
            for a in actors:
                ray.kill(a)
            raise
        sizes = [int(rows) for rows, _ in info]
        index = cls(actors, [int(b) for b in bounds[:-1]], sizes, dims.pop(), batch_size)
        index._start, index._loads = (actor_cls, opts, kwargs, start_timeout_s), load_calls
        return index

    # --- recovery ---------------------------------------------------------------------------

    def _recover(self, cause: BaseException) -> None:
        """Replace every shard actor that no longer answers (shard_recovery's scheme): a new
        actor with the same rows and search order; the caller redoes the failed batch."""
        for s in dead_shards(self._actors):
            what = f"kNN shard {s} (rows {self.offsets[s]}..{self.offsets[s] + self.sizes[s] - 1})"
            self._restarts.note(s, what, cause)
            if self._start is None:
                raise ShardLostError(f"{what} was lost ({type(cause).__name__})") from cause
            cls, opts, kwargs, timeout = self._start
            actor = cls.options(**opts).remote(**kwargs[s])
            wait_started(actor, what, timeout)
            method, args = self._loads[s]
            _get(getattr(actor, method).remote(*args))
            if self._order_n is not None:
                order = _get(actor.search_order.remote(self._order_n))
                if self._orders is not None and not np.array_equal(order, self._orders[s]):
                    raise ShardLostError(f"{what} was replaced but its search order changed")
            ray.kill(self._actors[s])
            self._actors[s] = actor

    # --- searches ---------------------------------------------------------------------------

    def _check_k(self, k: Any) -> int:
        if not self._actors:
            raise RuntimeError("this ShardedIndex was shut down; build a new one")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= self.n:
            raise UserInputError(f"k must be an integer in 1..N={self.n}, got {k!r}; lower --k")
        return int(k)

    def search(self, queries: np.ndarray, k: int, batch_size: int | None = None) -> KnnResult:
        """The ``k`` nearest database rows of each query row; equals ``knn_search``."""
        q = as_features(queries, "queries", min_rows=1)
        if q.shape[1] != self.d:
            raise UserInputError(
                f"queries have {q.shape[1]} features but the index has d={self.d}; embed "
                "queries and database with the same feature extractor"
            )
        k = self._check_k(k)
        bs = batch_size or self.batch_size
        out_d = np.empty((q.shape[0], k), dtype=np.float64)
        out_i = np.empty((q.shape[0], k), dtype=np.int64)

        def submit(start: int) -> list:
            ref = ray.put(q[start : start + bs])
            return [a.search.remote(ref, k, bs) for a in self._actors]

        for start, results in _pipelined(range(0, q.shape[0], bs), submit, self._recover):
            # Indices are already global: offsets of 0.
            merged = merge_topk(results, [0] * self.shards, k)
            out_d[start : start + bs], out_i[start : start + bs] = merged.distances, merged.indices
        return KnnResult(out_d, out_i)

    def _self_batches(
        self, k: int, batch_size: int | None
    ) -> Iterator[tuple[np.ndarray, KnnResult]]:
        """(global row ids, their k neighbours excluding self) per batch of database rows.

        Each shard issues its rows in its search order (partition lists together, so that a
        batch forms large query groups on every shard); ``ids`` says which rows a batch holds.
        """
        self._check_k(k)  # live actors
        k = check_k(k, self.n)
        bs = batch_size or self.batch_size
        self._order_n, self._orders = self.n, None  # a replacement computes its order too
        submit_orders = lambda _: [a.search_order.remote(self.n) for a in self._actors]  # noqa: E731
        _, orders = next(_pipelined([0], submit_orders, self._recover))
        self._orders = orders
        items = [
            (s, a, min(a + bs, size))
            for s, size in enumerate(self.sizes)
            for a in range(0, size, bs)
        ]

        def submit(item: tuple[int, int, int]) -> list:
            s, a, b = item
            owner = self._actors[s]
            # The owner searches its own rows in place; the others get them actor to actor.
            rows = owner.rows.remote(a, b) if self.shards > 1 else None
            return [
                owner.self_search.remote(a, b, k + 1, bs)
                if t == s
                else actor.search.remote(rows, k + 1, bs)
                for t, actor in enumerate(self._actors)
            ]

        for (s, a, b), results in _pipelined(items, submit, self._recover):
            # k + 1 from every shard, merged, then the point itself removed by global index:
            # exactly the core knn_self rule (drop_self), so duplicates rank the same way.
            merged = merge_topk(results, [0] * self.shards, k + 1)
            ids = self.offsets[s] + orders[s][a:b]
            yield ids, drop_self(merged, ids, k)

    def knn_self(self, k: int, batch_size: int | None = None) -> KnnResult:
        """The ``k`` nearest other rows of every database row; equals core ``knn_self``."""
        k = check_k(k, self.n)  # before allocating (N, k)
        out_d = np.empty((self.n, k), dtype=np.float64)
        out_i = np.empty((self.n, k), dtype=np.int64)
        for ids, res in self._self_batches(k, batch_size):
            out_d[ids], out_i[ids] = res.distances, res.indices
        return KnnResult(out_d, out_i)

    def kth_distances(self, k: int, batch_size: int | None = None) -> np.ndarray:
        """r_k: each row's distance to its k-th nearest other row (N floats, not (N, k))."""
        k = check_k(k, self.n)
        r_k = np.empty(self.n, dtype=np.float64)
        for ids, res in self._self_batches(k, batch_size):
            r_k[ids] = res.distances[:, k - 1]
        return r_k

    # --- metrics ----------------------------------------------------------------------------

    def entropy(
        self, k: int = 3, eps: float = 1e-10, *, bootstrap: int = 0, seed: int = 0
    ) -> EntropyResult:
        """KL entropy of the database rows; equals core ``kl_entropy``."""
        r_k = self.kth_distances(k)
        return entropy_from_knn_distances(r_k, self.d, k, eps, bootstrap=bootstrap, seed=seed)

    def generalization_score(self, generated: np.ndarray) -> float:
        """Mean distance of ``generated`` rows to their nearest database (training) row."""
        return generalization_from_distances(self.search(generated, 1).distances[:, 0])

    def memorized_fraction(self, generated: np.ndarray, ratio: float = 1 / 3) -> float:
        """Share of ``generated`` rows with d1 < d2 / (1 / ratio) against the database rows."""
        res = self.search(generated, 2)
        return memorized_from_distances(res.distances[:, 0], res.distances[:, 1], ratio)

    def shutdown(self) -> None:
        """Kill the shard actors (idempotent)."""
        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
