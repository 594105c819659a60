"""Exact kNN with partition pruning: k-means lists plus the triangle inequality (CPU).

A flat search compares every query with every database row. On clustered data (embeddings of
images are) most of that work is provably useless, and this module skips it without giving up
exactness:

1. The database is split into C lists by FAISS k-means (seeded, trained on a sample), each row
   in the list of its nearest centroid c_b, each list sorted by its rows' exact distance
   ``rho_p = ||p - c_b||``; list b's radius is ``r_b = max_{p in b} rho_p``.
2. Triangle inequality: for a query q and any row p of list b, ``||q - p|| >= ||q - c_b|| - rho_p
   >= ||q - c_b|| - r_b``.
3. Queries are handled in groups (the queries whose nearest centroid is the same). A group first
   searches the lists nearest to its centroid until they hold ``n_fetch`` rows; this gives every
   query an upper bound ``tau_q`` on the distance of its ``n_need``-th nearest row (the
   ``n_need``-th exact distance among the rows found). A row p of another list b can only be
   among those ``n_need`` nearest if ``rho_p >= ||q - c_b|| - tau_q``: whole lists drop out,
   and of the others only a suffix (the rows far enough from their centroid) is searched; the
   candidates are merged.

Candidates are then re-ranked exactly (:func:`~raycollapse.neighbors.distances.rerank_exact`), as in
the flat search, so both paths return the same neighbours, distances and tie order. The bounds
are computed in float64 and loosened by a slack far larger than their rounding error, so a list
is only skipped when it certainly holds no candidate.

Without cluster structure (isotropic Gaussians in high dimension) almost no list can be
skipped. A group whose surviving lists hold more than ``flat_fraction`` of the database is
searched flat instead, and once most groups went that way the remaining ones go flat without
trying; the cost is then the flat search plus the partition overhead (up to ~10%).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from raycollapse.neighbors.distances import pair_distances, rerank_exact, sort_rows
from raycollapse.neighbors.threads import (
    blas_single_threaded,
    faiss_blas_distances,
    faiss_threads,
)

__all__ = [
    "Partition",
    "PruneStats",
    "build_partition",
    "default_n_lists",
    "partitioned_candidates",
]

# k-means training rows per list; FAISS warns below 39.
_TRAIN_PER_LIST = 64
_KMEANS_ITERS = 10
# Relative slack on the float64 lower bounds: their rounding error is below ~5e-7 (|q| + |c|)
# even for d in the thousands (cancellation in |q|^2 + |c|^2 - 2 q.c), so 1e-5 is safe.
_BOUND_SLACK = 1e-5
# After this share of the queries, give up on pruning when most groups went flat.
_PROBE_SHARE = 0.05
_GIVE_UP_SHARE = 0.8
_ROWS_PER_BLOCK = 65536


@dataclass(frozen=True)
class Partition:
    """The database rows grouped into lists by nearest centroid.

    ``order[bounds[b]:bounds[b + 1]]`` are the rows of list b (no list is empty), ordered by
    their exact distance to the list's centroid ``centroids[b]``, ``rho`` (ascending);
    ``sorted_data`` is ``data[order]`` and ``radius[b]`` the largest ``rho`` of list b.
    """

    centroids: np.ndarray
    order: np.ndarray
    bounds: np.ndarray
    rho: np.ndarray
    sorted_data: np.ndarray

    @property
    def radius(self) -> np.ndarray:
        """Largest distance from a row of each list to its centroid."""
        return self.rho[self.bounds[1:] - 1]

    @property
    def counts(self) -> np.ndarray:
        """Rows per list."""
        return np.diff(self.bounds)


@dataclass(frozen=True)
class PruneStats:
    """How much work a partitioned search did.

    ``flat_queries``: queries searched flat because pruning would not pay off for their group;
    ``pair_share``: share of the ``queries x rows`` distances FAISS computed (1.0 = a flat
    search; on clustered data a small fraction). ``flat_rows``: with ``search_flat=False``,
    the (sorted) queries left for the caller, their result rows unset; else None.
    """

    flat_queries: int
    pair_share: float
    flat_rows: np.ndarray | None = None


def default_n_lists(n: int) -> int:
    """About sqrt(N) lists (at most N / 64 so k-means has data, between 1 and 4096)."""
    return int(max(1, min(4096, round(math.sqrt(n)), n // _TRAIN_PER_LIST)))


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    labels = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], _ROWS_PER_BLOCK):
        _, nn = faiss.knn(x[s : s + _ROWS_PER_BLOCK], centroids, 1)
        labels[s : s + _ROWS_PER_BLOCK] = nn[:, 0]
    return labels


def build_partition(data: np.ndarray, n_lists: int, seed: int = 0) -> Partition:
    """Split ``data`` (N, d) float32 into at most ``n_lists`` lists by seeded k-means.

    The partition only decides how much work is skipped, never the result: any assignment of
    rows to lists gives the same neighbours, since the radii are measured, not assumed.
    """
    n, d = data.shape
    n_lists = max(1, min(int(n_lists), n // _TRAIN_PER_LIST or 1))
    if n_lists == 1:
        centroids = data.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    else:
        rng = np.random.default_rng(seed)
        n_train = min(n, n_lists * _TRAIN_PER_LIST)
        train = data if n_train == n else data[np.sort(rng.choice(n, n_train, replace=False))]
        kmeans = faiss.Kmeans(
            d, n_lists, niter=_KMEANS_ITERS, seed=seed, verbose=False,
            max_points_per_centroid=_TRAIN_PER_LIST,
        )  # fmt: skip
        kmeans.train(np.ascontiguousarray(train))
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    labels = _nearest_centroid(data, centroids)
    counts = np.bincount(labels, minlength=centroids.shape[0])
    keep = counts > 0
    labels = (np.cumsum(keep) - 1)[labels]
    centroids = np.ascontiguousarray(centroids[keep])
    rho = np.empty(n, dtype=np.float64)
    for s in range(0, n, _ROWS_PER_BLOCK):
        rows = slice(s, s + _ROWS_PER_BLOCK)
        rho[rows] = pair_distances(data[rows], centroids[labels[rows]])
    order = np.lexsort((rho, labels))
    bounds = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
    return Partition(centroids, order, bounds, rho[order], data[order])


class _GroupSearch:
    """Searches the queries of one group (nearest centroid ``c_a``) against chosen lists."""

    def __init__(self, data: np.ndarray, part: Partition) -> None:
        self.data = data
        self.part = part
        self.c64 = part.centroids.astype(np.float64)

    def centroid_distances(self, a: int) -> np.ndarray:
        """(C,) exact distances from centroid a to every centroid."""
        return pair_distances(self.c64, self.part.centroids[a])

    def to_centroids(self, q: np.ndarray, centre: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(m, len(lists)): lower bounds of ``||q - c_b||``, exact distance minus a slack that
        exceeds its rounding error."""
        # float64 products of coordinates shifted by the group's centroid: the rounding error
        # of |q|^2 + |c|^2 - 2 q.c is then below 1e-15 d (|q| + |c|)^2, far inside the slack.
        c64 = centre.astype(np.float64)
        qs = q.astype(np.float64) - c64
        cs = self.c64[lists] - c64
        q2 = (qs * qs).sum(axis=1)
        c2 = (cs * cs).sum(axis=1)
        dist = np.sqrt(np.maximum(q2[:, None] + c2[None, :] - 2.0 * (qs @ cs.T), 0.0))
        r = self.part.radius[lists]
        return dist - _BOUND_SLACK * (np.sqrt(q2)[:, None] + np.sqrt(c2)[None, :] + r[None, :])

    def search(
        self, q: np.ndarray, starts: np.ndarray, ends: np.ndarray, n_fetch: int, centre: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """The ``n_fetch`` nearest of the sorted rows ``starts[i]:ends[i]`` for each query,
        exact and ordered by (distance, index).

        FAISS ranks with ``|q|^2 + |x|^2 - 2 q.x`` in float32; both sides are shifted by
        ``centre`` first (distances do not change) so that the norms, and with them the
        rounding error of that ranking, are those of the cluster, not of the whole data set.
        """
        pos = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
        n_fetch = min(n_fetch, pos.size)
        _, nn = faiss.knn(q - centre, self.part.sorted_data[pos] - centre, n_fetch)
        return rerank_exact(q, self.data, self.part.order[pos[nn]])


def _search_group(
    gs: _GroupSearch, q: np.ndarray, g: int, n_need: int, n_fetch: int, max_rows: float
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Neighbour candidates of the queries ``q`` of group g and the number of (query, row)
    distances computed, or None when pruning leaves more than ``max_rows`` database rows to
    search (then a flat search is cheaper)."""
    part, bounds, counts, radius = gs.part, gs.part.bounds, gs.part.counts, gs.part.radius
    centre = part.centroids[g]
    c_dist = gs.centroid_distances(g)
    by_bound = np.argsort(c_dist - radius, kind="stable")
    first = by_bound[: int(np.searchsorted(np.cumsum(counts[by_bound]), n_fetch)) + 1]
    dist, idx = gs.search(q, bounds[first], bounds[first + 1], n_fetch, centre)
    pairs = len(q) * int(counts[first].sum())
    tau = dist[:, n_need - 1]
    # One cheap bound for the whole group first: for q within `reach` of c_g and p in list b,
    # ||q - p|| >= ||c_g - c_b|| - ||q - c_g|| - r_b (triangle inequality twice).
    reach = float(pair_distances(q, centre).max())
    group_bound = c_dist - reach - radius - _BOUND_SLACK * (c_dist + reach + radius)
    maybe = np.flatnonzero(group_bound <= tau.max())
    maybe = maybe[~np.isin(maybe, first)]
    if maybe.size == 0:
        return dist, idx, pairs
    # Per query and row: ||q - p|| >= ||q - c_b|| - rho_p, so row p of list b can be within
    # tau_q of q only if rho_p >= ||q - c_b|| - tau_q: a suffix of the list (rows sorted by rho).
    need = gs.to_centroids(q, centre, maybe) - tau[:, None]
    asks = need <= radius[maybe][None, :]
    keep = asks.any(axis=0)
    lists, low = maybe[keep], need[:, keep].min(axis=0)
    starts = np.array(
        [
            bounds[b] + np.searchsorted(part.rho[bounds[b] : bounds[b + 1]], t)
            for b, t in zip(lists, low, strict=True)
        ],
        dtype=np.int64,
    )
    ends = bounds[lists + 1]
    if counts[first].sum() + (ends - starts).sum() > max_rows:
        return None
    sub = np.flatnonzero(asks[:, keep].any(axis=1))
    if sub.size:
        d2, i2 = gs.search(q[sub], starts, ends, n_fetch, centre)
        merged_d, merged_i = sort_rows(np.hstack([dist[sub], d2]), np.hstack([idx[sub], i2]))
        dist[sub] = merged_d[:, :n_fetch]
        idx[sub] = merged_i[:, :n_fetch]
        pairs += sub.size * int((ends - starts).sum())
    return dist, idx, pairs


def partitioned_candidates(
    data: np.ndarray,
    queries: np.ndarray,
    n_need: int,
    n_fetch: int,
    *,
    partition: Partition | None = None,
    n_lists: int | None = None,
    seed: int = 0,
    flat_fraction: float = 0.5,
    batch_size: int = 4096,
    search_flat: bool = True,
) -> tuple[np.ndarray, np.ndarray, PruneStats]:
    """The ``n_fetch`` nearest ``data`` rows of every query, exact, by partition pruning.

    ``n_need <= n_fetch <= N``: pruning keeps every row that can be among a query's ``n_need``
    nearest (the extra ``n_fetch - n_need`` candidates absorb FAISS's float32 ranking error, as
    in the flat search). Returns ``(distances, indices, stats)``: (nq, n_fetch) float64 exact
    distances and int64 row numbers, rows sorted by (distance, index), and the work done
    (:class:`PruneStats`).
    ``partition``: one built before by :func:`build_partition` from the same ``data`` (an index
    searched many times builds it once); else one with ``n_lists`` lists (default
    :func:`default_n_lists`) is built here, k-means seeded with ``seed``.

    Groups are searched single-threaded on as many Python threads as BLAS has threads (many
    small products scale that way, see :mod:`raycollapse.neighbors.threads`); the flat remainder
    uses FAISS's own threads. ``search_flat=False`` leaves the queries that would go flat to
    the caller (``stats.flat_rows``; the within-set search computes them symmetrically) and
    counts no pairs for them.
    """
    n, nq = data.shape[0], queries.shape[0]
    if not 1 <= n_need <= n_fetch <= n:
        raise ValueError(f"need 1 <= n_need ({n_need}) <= n_fetch ({n_fetch}) <= N ({n})")
    part = partition
    if part is None:
        part = build_partition(data, default_n_lists(n) if n_lists is None else n_lists, seed)
    elif part.bounds[-1] != n:
        raise ValueError(f"the partition covers {part.bounds[-1]} rows, the data has {n}")
    n_groups = part.centroids.shape[0]
    groups = _nearest_centroid(queries, part.centroids)
    q_order = np.argsort(groups, kind="stable")
    q_bounds = np.searchsorted(groups[q_order], np.arange(n_groups + 1))
    gs = _GroupSearch(data, part)
    out_d = np.empty((nq, n_fetch), dtype=np.float64)
    out_i = np.empty((nq, n_fetch), dtype=np.int64)
    flat: list[np.ndarray] = []

    def run(g: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, int] | None]:
        rows = q_order[q_bounds[g] : q_bounds[g + 1]]
        with faiss_threads(1):
            found = _search_group(gs, queries[rows], g, n_need, n_fetch, flat_fraction * n)
        return rows, found

    todo = [g for g in range(n_groups) if q_bounds[g + 1] > q_bounds[g]]
    seen = n_flat = pairs = 0
    with blas_single_threaded() as workers, faiss_blas_distances():
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Waves, so that pruning is abandoned early on data where it does not pay.
            wave = max(4 * workers, 1)
            for start in range(0, len(todo), wave):
                if seen > _PROBE_SHARE * nq and n_flat > _GIVE_UP_SHARE * seen:
                    rest = todo[start:]
                    flat += [q_order[q_bounds[g] : q_bounds[g + 1]] for g in rest]
                    n_flat += int(sum(q_bounds[g + 1] - q_bounds[g] for g in rest))
                    break
                for rows, found in pool.map(run, todo[start : start + wave]):
                    seen += rows.size
                    if found is None:
                        flat.append(rows)
                        n_flat += rows.size
                    else:
                        out_d[rows], out_i[rows], group_pairs = found
                        pairs += group_pairs
    flat_rows = np.sort(np.concatenate(flat)) if flat else np.empty(0, dtype=np.int64)
    if not search_flat:
        return out_d, out_i, PruneStats(n_flat, pairs / (nq * n) if nq else 1.0, flat_rows)
    if flat:
        rows = flat_rows
        for s in range(0, rows.size, batch_size):
            r = rows[s : s + batch_size]
            _, nn = faiss.knn(queries[r], data, n_fetch)
            out_d[r], out_i[r] = rerank_exact(queries[r], data, nn)
    pairs += n_flat * n
    return out_d, out_i, PruneStats(n_flat, pairs / (nq * n) if nq else 1.0)
