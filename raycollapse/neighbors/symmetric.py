"""Exact self-kNN by symmetric blocked products: each pair of points is computed once (CPU).

A within-set search (every row's neighbours among the other rows) has a symmetric distance
matrix. A flat search computes it in full; here each pair of row blocks (I, J), I <= J, needs
one float32 product, whose entries screen candidates for the rows of I and, transposed, for the
rows of J: half the flops. Used where partition pruning gives up (data without clusters).

Exactness (the same neighbours, distances and tie order as the flat search, i.e. the k nearest
other rows by (canonical distance, index), see docs/design.md "KL entropy"):

* The product is a float32 screen ``A_ij ~ ||xc_i - xc_j||^2`` of a centred copy ``xc``, with
  the norms folded into the product (columns ``[xc, |xc|^2, 1]`` times ``[-2 xc, 1, |xc|^2]``).
  ``|A_ij - dhat_ij^2| <= c (n_i + n_j)`` rigorously (:func:`screen_error_constant`), where
  ``dhat`` is the canonical float64 distance (:func:`~raycollapse.neighbors.distances.pair_distances`)
  and ``n = |xc|^2``: dot-product rounding of any summation order, rounding of the centring and
  of the norms, and the canonical formula's own rounding, times a safety factor.
* Each row keeps its current k best candidates with canonical distances, sorted by (distance,
  index); ``kth`` bounds the square of its k-th canonical distance from above. An entry is a
  candidate only if ``A_ij - c (n_i + n_j) <= kth_i``; every other pair is certainly farther
  than the row's final k-th neighbour (kth only decreases), so it is never needed, ties
  included. Candidates get canonical distances and are merged exactly.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.threads import blas_single_threaded

__all__ = ["screen_error_constant", "symmetric_self_knn"]

_U32 = 2.0**-24
_U64 = 2.0**-53
_SAFETY = 1.5
# Absolute slack on squared distances for float32 underflow (gradual, numpy's default): each
# subnormal operation errs by at most 2^-150 absolutely, far below this for any d.
_ABS = 2.0**-100
# Row block of the products: a 512 x 512 float32 block (1 MiB) stays in L2 cache, where
# OpenBLAS's sgemm ran ~2x faster than with 2048-row blocks on the dev machine.
_BLOCK = 512
# Largest squared norm of a centred row for which the float32 screen is used; beyond it float32
# products could overflow (the caller then searches another way).
MAX_SCREEN_NORM2 = 1e30
_CHUNK = 65536


def screen_error_constant(d: int) -> float:
    """The constant c of the rigorous bound ``|A_ij - dhat_ij^2| <= c (n_i + n_j)``.

    Terms (u = 2^-24, m = d + 2 columns of the screen product):
    * float32 dot product of m terms, any order and FMA: ``gamma_m * sum |terms|`` with
      ``sum |terms| = 2 |xc_i . xc_j| + n_i + n_j <= 2 (n_i + n_j)``;
    * the norms rounded to float32 (from float64): ``u (n_i + n_j)``, plus float64 error;
    * centring ``xc = fl32(x - mu)``: ``| ||xc_i - xc_j||^2 - ||x_i - x_j||^2 | <= 4.01 u
      (n_i + n_j)``;
    * the canonical float64 distance's own rounding: ``4 (d + 4) u64 (n_i + n_j)``.
    The sum is multiplied by 1.5 so that the float64 arithmetic of the bounds is covered too.
    """
    m = d + 2
    gamma = m * _U32 / (1.0 - m * _U32)
    c = 2.0 * gamma * (1.0 + _U32) + 1.01 * _U32 + 4.01 * _U32 + 4.0 * (d + 4) * _U64
    return _SAFETY * c


class _Store:
    """The k best candidates of the rows of one block, exact, plus pending screen hits."""

    def __init__(self, rows: np.ndarray, k: int, norms: np.ndarray, c: float) -> None:
        self.rows = rows  # original indices of the block's rows
        self.k = k
        self.n_rows = norms[rows]
        self.c = c
        self.lock = threading.Lock()
        self.best_r = np.empty(0, dtype=np.int64)  # local row, sorted by (row, dist, col)
        self.best_c = np.empty(0, dtype=np.int64)
        self.best_d = np.empty(0, dtype=np.float64)
        self.pend: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_pend = 0
        self.kth = np.full(rows.size, np.inf)

    @property
    def kth(self) -> np.ndarray:
        """Upper bound of each row's squared k-th canonical distance (inf: fewer than k known)."""
        return self._state[0]

    @kth.setter
    def kth(self, value: np.ndarray) -> None:
        # A row's screen limit against a block of largest norm nmax is base + c * nmax. The
        # tuple is replaced, never written in place: readers on other threads see one state.
        base = value + self.c * self.n_rows + _ABS
        self._state = (value, base, float(base.max()) if base.size else -np.inf)

    def limits(self) -> tuple[np.ndarray, float]:
        """(base, max base): the rows' screen limits are ``base + c * nmax`` (float64)."""
        _, base, top = self._state
        return base, top

    def add(self, r: np.ndarray, cols: np.ndarray, a: np.ndarray, x: np.ndarray, n: np.ndarray):
        """Queue screen hits (local rows ``r``, original columns ``cols``, screen values)."""
        with self.lock:
            self.pend.append((r, cols, a))
            self.n_pend += r.size
            # Merging as soon as each row got ~k + 1 hits on average keeps kth tight.
            if self.n_pend >= self.rows.size * (self.k + 1):
                self._merge(x, n)

    def _merge(self, x: np.ndarray, n: np.ndarray) -> None:
        if not self.pend:
            return
        r = np.concatenate([p[0] for p in self.pend])
        cols = np.concatenate([p[1] for p in self.pend])
        a = np.concatenate([p[2] for p in self.pend])
        self.pend, self.n_pend = [], 0
        # Screen again with the current kth (it may have dropped since the hit was queued).
        keep = a - self.c * (self.n_rows[r] + n[cols]) - _ABS <= self.kth[r]
        r, cols = r[keep], cols[keep]
        dist = pair_distances(x[self.rows[r]], x[cols])
        r = np.concatenate([self.best_r, r])
        cols = np.concatenate([self.best_c, cols])
        dist = np.concatenate([self.best_d, dist])
        order = np.lexsort((cols, dist, r))
        r, cols, dist = r[order], cols[order], dist[order]
        first = np.searchsorted(r, r, side="left")
        top = np.arange(r.size) - first < self.k
        self.best_r, self.best_c, self.best_d = r[top], cols[top], dist[top]
        counts = np.bincount(self.best_r, minlength=self.rows.size)
        kth = self.kth.copy()  # an earlier bound stays valid (kth only decreases)
        full = np.flatnonzero(counts == self.k)
        ends = np.cumsum(counts)
        dk = self.best_d[ends[full] - 1]
        # Squared in float64 and nudged up: an upper bound of the real square.
        kth[full] = np.minimum(kth[full], dk * dk * (1.0 + 4 * _U64))
        self.kth = kth

    def finish(self, x: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, k) distances and original indices, rows sorted by (distance, index)."""
        with self.lock:
            self._merge(x, n)
        if self.best_r.size != self.rows.size * self.k:  # pragma: no cover - invariant
            raise RuntimeError("symmetric kNN: a row ended with fewer than k candidates")
        return (
            self.best_d.reshape(self.rows.size, self.k),
            self.best_c.reshape(self.rows.size, self.k),
        )


def _centred_norms(x: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """float64 squared norms of the float32 centred rows ``fl32(x - mu)``."""
    norms = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], _CHUNK):
        xc = (x[s : s + _CHUNK] - mu).astype(np.float32).astype(np.float64)
        norms[s : s + _CHUNK] = np.einsum("ij,ij->i", xc, xc)
    return norms


def _screen_factors(
    x: np.ndarray, mu: np.ndarray, order: np.ndarray, norms: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``order`` of the centred float32 data with norms folded in: ``P[i] . Q[j]``
    screens ``|x_i - x_j|^2`` (columns [xc, n, 1] and [-2 xc, 1, n])."""
    n, d = order.size, x.shape[1]
    p = np.empty((n, d + 2), dtype=np.float32)
    q = np.empty((n, d + 2), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        rows = order[s : s + _CHUNK]
        xc = (x[rows] - mu).astype(np.float32)
        p[s : s + rows.size, :d] = xc
        q[s : s + rows.size, :d] = xc * np.float32(-2.0)  # exact: a power of two
        p[s : s + rows.size, d] = norms[rows]
        q[s : s + rows.size, d + 1] = norms[rows]
    p[:, d + 1] = 1.0
    q[:, d] = 1.0
    return p, q


def symmetric_self_knn(
    x: np.ndarray, k: int, rows: np.ndarray | None = None, *, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of each row of ``x`` (or of the rows ``rows``), exact.

    Returns ``(distances, indices)``, (len(rows), k) float64 canonical distances and int64 row
    numbers, each row sorted by (distance, index), the row itself excluded by index (an exact
    duplicate is a neighbour at distance 0.0). ``1 <= k < N``; ``x`` float32 (N, d) with
    squared norms about its mean below ``MAX_SCREEN_NORM2`` (callers check). Pairs among
    ``rows`` are computed once; pairs of ``rows`` with other rows once, for the query only.
    ``workers``: Python threads sharing the block pairs, BLAS single-threaded (None: as many
    as BLAS had threads).
    """
    n_total, d = x.shape
    if rows is None:
        rows = np.arange(n_total, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    nq = rows.size
    if nq == 0:
        return np.empty((0, k)), np.empty((0, k), dtype=np.int64)
    mu = x.mean(axis=0, dtype=np.float64)
    norms = _centred_norms(x, mu)
    # Query rows first, then the others: blocks before `nqb` hold queries. Each part sorted by
    # norm, so that a block's rows have similar thresholds and one scalar screens the block.
    rest = np.setdiff1d(np.arange(n_total, dtype=np.int64), rows, assume_unique=True)
    by_norm = np.argsort(norms[rows], kind="stable")
    order = np.concatenate([rows[by_norm], rest[np.argsort(norms[rest], kind="stable")]])
    p, q = _screen_factors(x, mu, order, norms)
    norms_o = norms[order]
    c = screen_error_constant(d)
    block = max(_BLOCK, k + 1)
    starts = list(range(0, n_total, block))
    nqb = (nq + block - 1) // block
    nmax = [float(norms_o[s : s + block].max()) for s in starts]
    stores = [_Store(order[s : min(s + block, nq)], k, norms, c) for s in starts[:nqb]]

    def pair(bi: int, bj: int, out: np.ndarray, buf: np.ndarray) -> None:
        """Screen block pair (bi, bj), bj >= bi, for the query rows of both blocks."""
        i0, j0 = starts[bi], starts[bj]
        i1, j1 = min(i0 + block, n_total), min(j0 + block, n_total)
        st_i = stores[bi]
        ni = min(i1, nq) - i0  # query rows of block bi (the last query block may hold others)
        a = out[: i1 - i0, : j1 - j0]
        np.matmul(p[i0:i1], q[j0:j1].T, out=a)
        st_j = stores[bj] if bj != bi and bj < nqb else None
        nj = 0 if st_j is None else min(j1, nq) - j0
        if bj == bi:
            np.fill_diagonal(a, np.inf)  # the row itself is excluded by index
            if i1 - i0 > k:
                _seed(st_i, a[:ni], k, nmax[bi])
        elif bi == 0 and st_j is not None and ni >= k:
            # Block 0 holds the queries nearest the mean (rows sorted by norm), close to most
            # rows: their k-th nearest among it seeds every later block's bounds before the
            # transposed hits of other blocks arrive.
            _seed(st_j, a[:ni, :nj].T, k, nmax[0])
        base_i, top_i = st_i.limits()
        top_i += c * nmax[bj]
        if st_j is not None:
            base_j, top_j = st_j.limits()
            top_i = max(top_i, top_j + c * nmax[bi])
        # One float32 scalar screens the block (its rows have similar norms, hence limits),
        # rounded up so that every entry within a row's float64 limit passes.
        tau = np.float32(top_i)
        if tau < top_i:
            tau = np.nextafter(tau, np.float32(np.inf))
        flat = a.ravel()
        mask = buf[: flat.size]
        np.less_equal(flat, tau, out=mask)
        hits = np.flatnonzero(mask)
        if hits.size == 0:
            return
        r, cc = np.divmod(hits, j1 - j0)
        av = flat[hits].astype(np.float64)  # float64 from here: exact comparisons with limits
        m = (r < ni) & (av <= base_i[np.minimum(r, ni - 1)] + c * nmax[bj])
        if m.any():
            st_i.add(r[m], order[j0 + cc[m]], av[m], x, norms)
        if st_j is not None:
            m = (cc < nj) & (av <= base_j[np.minimum(cc, nj - 1)] + c * nmax[bi])
            if m.any():
                st_j.add(cc[m], order[i0 + r[m]], av[m], x, norms)

    def first(bj: int) -> None:
        """Seeding pairs: the diagonal block of bj and the pair (0, bj)."""
        out, buf = np.empty((block, block), dtype=np.float32), np.empty(block * block, dtype=bool)
        if bj < nqb:
            pair(bj, bj, out, buf)
        if bj > 0:
            pair(0, bj, out, buf)

    def row(bi: int) -> None:
        out, buf = np.empty((block, block), dtype=np.float32), np.empty(block * block, dtype=bool)
        for bj in range(bi + 1, len(starts)):
            pair(bi, bj, out, buf)

    with blas_single_threaded() as blas_threads:
        n_workers = max(1, int(workers or blas_threads))
        # Seeding pairs first, so every row has bounds before other transposed hits arrive.
        if n_workers == 1:
            for bj in range(len(starts)):
                first(bj)
            for bi in range(1, nqb):
                row(bi)
        else:
            first(0)  # block 0 seeded before its pairs hit it from other threads
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                list(pool.map(first, range(1, len(starts))))
                list(pool.map(row, range(1, nqb)))
    dist = np.empty((nq, k), dtype=np.float64)
    idx = np.empty((nq, k), dtype=np.int64)
    for bi, st in enumerate(stores):
        out_rows = by_norm[starts[bi] : starts[bi] + st.rows.size]
        dist[out_rows], idx[out_rows] = st.finish(x, norms)
    return dist, idx


def _seed(st: _Store, a: np.ndarray, k: int, nmax: float) -> None:
    """First kth bounds of a block's rows: the k smallest screen values of its diagonal block
    (self excluded) bound the k-th canonical distance by value + c (n_i + nmax)."""
    part = np.partition(a, k - 1, axis=1)[:, k - 1].astype(np.float64)
    if part.size < st.kth.size:  # a partial last block: its other rows keep their bounds
        part = np.concatenate([part, np.full(st.kth.size - part.size, np.inf)])
    with st.lock:
        st.kth = np.minimum(st.kth, part + st.c * (st.n_rows + nmax) + _ABS)
