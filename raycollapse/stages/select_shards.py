"""Selection on Ray actors that each own one shard of the pool (docs/design.md, "Distributed
selection").

Rows are cut into ``S`` contiguous shards as for the sharded kNN
(:mod:`raycollapse.stages.knn_shards`); each :class:`SelectShard` actor loads its own rows
(Parquet embedding shards or a ``.npy`` file, read by the actor: the driver reads only footers
and headers; or an array from the driver through the object store, as the loop passes it) and
holds the shard's selection state (:mod:`raycollapse.curation.greedy_shards`,
:mod:`raycollapse.curation.threshold_shards`). The driver exchanges only batches of centres,
candidates and accepted points: its memory depends on the budget and ``S``, not on N.

* ``greedy``: exact, equal to :func:`~raycollapse.curation.greedy.greedy_select` index for index;
  ``approximate=True``: greedy inside each shard, then over the union of the shard selections.
* ``threshold``: exact, equal to :func:`~raycollapse.curation.threshold.threshold_select`.
* ``random``: :func:`~raycollapse.curation.greedy.random_select` (no actors: needs only N).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raycollapse.curation.greedy import check_budget, random_select
from raycollapse.curation.greedy_shards import GreedyShard, common_space, sharded_greedy
from raycollapse.curation.select import METHODS, Selection
from raycollapse.curation.threshold import (
    check_threshold_args,
    tau0_from_distances,
    tau0_pairs,
)
from raycollapse.curation.threshold_shards import (
    ThresholdShard,
    sharded_threshold,
    two_round_greedy,
)
from raycollapse.data.inputs import EMBEDDING_COLUMN
from raycollapse.errors import UserInputError
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.validate import as_features
from raycollapse.stages.base import Resources, check_resources
from raycollapse.stages.knn_shard_inputs import check_shards, plan_pieces
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.select_inputs import Pool, pool_of, read_pieces
from raycollapse.stages.shard_recovery import LOST, Restarts, _get, wait_started

__all__ = ["SelectShard", "auto_cpus_per_shard", "select_sharded"]


@ray.remote
class SelectShard:
    """One shard of the pool: global rows ``offset`` .. ``offset + rows - 1``."""

    def __init__(self, shard: int, offset: int) -> None:
        self.shard, self.offset = shard, offset
        self.x = np.empty((0, 0), dtype=np.float32)
        self.greedy: GreedyShard | None = None
        self.threshold: ThresholdShard | None = None

    def load(self, source: Any, column: str) -> tuple[int, int, np.ndarray]:
        """Rows from an array (object store) or from file pieces read here; returns (rows, d,
        float64 column sums)."""
        x = source if isinstance(source, np.ndarray) else read_pieces(source, column)
        name = f"embeddings of shard {self.shard} (rows {self.offset}..{self.offset + len(x) - 1})"
        self.x = as_features(x, name, min_rows=1)
        return len(self.x), self.x.shape[1], self.x.sum(axis=0, dtype=np.float64)

    def rows_at(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``index`` of this shard's rows, those rows)."""
        local = index - self.offset
        mine = np.flatnonzero((local >= 0) & (local < len(self.x)))
        return mine, self.x[local[mine]]

    def greedy_space(self, mean: np.ndarray) -> float:
        self.greedy = GreedyShard(self.x, self.offset, mean)
        return self.greedy.norm_max()

    def greedy_begin(self, budget: int, smax: float) -> None:
        assert self.greedy is not None, "greedy_space first"
        self.greedy.begin(budget, smax)

    def greedy_step(self, index: np.ndarray, rows: np.ndarray, t: int) -> Any:
        """Add centres, return the next candidates (:meth:`GreedyShard.top`)."""
        assert self.greedy is not None, "greedy_space first"
        self.greedy.add(index, rows)
        return self.greedy.top(t)

    def greedy_local(self, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Single-node greedy of ``min(budget, rows)`` of this shard's rows (global indices)."""
        from raycollapse.curation.greedy import greedy_select

        idx = greedy_select(self.x, min(budget, len(self.x)), seed)
        return idx + self.offset, self.x[idx]

    def threshold_begin(self, n: int, budget: int, seed: int) -> None:
        self.threshold = ThresholdShard(self.x, self.offset, n, budget, seed)

    def threshold_open(
        self, index: np.ndarray, rows: np.ndarray, start: int, stop: int, tau: float
    ) -> Any:
        assert self.threshold is not None, "threshold_begin first"
        self.threshold.accept(index, rows)
        return self.threshold.open_rows(start, stop, tau)

    def threshold_duplicates(self, index: np.ndarray, rows: np.ndarray) -> bool:
        assert self.threshold is not None, "threshold_begin first"
        self.threshold.accept(index, rows)
        return self.threshold.only_duplicates()

    def replay(self, calls: list[tuple[str, tuple]]) -> None:
        """Run the state-changing ``calls`` (method name, arguments) of a lost shard again, in
        order: the same rows and calls give the same state (a replacement's rebuild)."""
        for name, args in calls:
            getattr(self, name)(*args)


def auto_cpus_per_shard(shards: int) -> float:
    """One CPU per shard, or an equal share of the cluster's CPUs when it has fewer than
    ``shards`` (so every shard can be placed: a 2-CPU local Ray runs 4 shards at 0.5 each)."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1e-4, math.floor(min(1.0, total / shards) * 1e4) / 1e4)


def select_sharded(
    source: np.ndarray | str | Path | Sequence[str],
    method: str,
    budget: int,
    *,
    shards: int,
    seed: int = 0,
    tau0: float | None = None,
    decay: float = 0.9,
    max_passes: int = 10_000,
    approximate: bool = False,
    num_cpus_per_shard: float | None = None,
    spread: bool = True,
    column: str = EMBEDDING_COLUMN,
    start_timeout_s: float | None = 600.0,
) -> Selection:
    """:func:`~raycollapse.curation.select.select` on ``shards`` actors; same result.

    ``source``: an (N, d) array, Parquet embedding shards (file, folder, URI or a list of files,
    or a ``FileRows`` subset of their rows, as the loop passes its candidates) or a ``.npy`` file
    (each actor reads its own rows). ``approximate``: greedy only, the two-round greedy
    (not equal to the exact one). ``num_cpus_per_shard``: Ray CPUs per actor (None:
    :func:`auto_cpus_per_shard`). Bad arguments raise UserInputError before any actor starts.
    """
    if method not in METHODS:
        raise UserInputError(
            f"selection method must be one of {', '.join(METHODS)}, got {method!r}; "
            "e.g. select.method=greedy"
        )
    if approximate and method != "greedy":
        raise UserInputError(
            f"--approximate applies to greedy selection only, not {method!r}; drop it"
        )
    if method == "threshold":
        check_threshold_args(decay, max_passes, tau0)
    pool = pool_of(source, column)
    budget = check_budget(budget, pool.n)
    shards = check_shards(shards, pool.n)
    if method == "random":
        return Selection(random_select(pool.n, budget, seed=seed), method)
    ensure_ray()
    cpus = auto_cpus_per_shard(shards) if num_cpus_per_shard is None else num_cpus_per_shard
    check_resources(Resources(cpus, 0.0), shards, "selection shards")
    with _Shards(pool, shards, cpus, spread, column, start_timeout_s) as sh:
        if method == "greedy" and approximate:

            def local(seeds: list[int]) -> list:
                return sh._call("greedy_local", [(budget, s) for s in seeds])

            return Selection(two_round_greedy(local, shards, budget, seed), method)
        if method == "greedy":
            return sh.greedy(budget, seed)
        return sh.threshold(budget, seed, tau0, decay, max_passes)


class _Shards:
    """The started actors of one selection (a context manager that kills them)."""

    def __init__(
        self,
        pool: Pool,
        shards: int,
        cpus: float,
        spread: bool,
        column: str,
        timeout: float | None,
    ) -> None:
        self.n = pool.n
        bounds = (np.arange(shards + 1, dtype=np.int64) * pool.n) // shards
        opts: dict[str, Any] = {"num_cpus": cpus}
        if spread:
            opts["scheduling_strategy"] = "SPREAD"
        # What a replacement of shard s needs (see _call): class, options, offset, its source;
        # ``log``: every state-changing call so far, replayed on the replacement in order.
        self.cls, self.opts, self.column, self.timeout = SelectShard, opts, column, timeout
        self.bounds = [int(b) for b in bounds]
        self.log: list[tuple[str, tuple]] = []
        self.restarts = Restarts(shards)
        self.actors = [self.cls.options(**opts).remote(s, self.bounds[s]) for s in range(shards)]
        try:
            _, pending = ray.wait(
                [a.__ray_ready__.remote() for a in self.actors], num_returns=shards, timeout=timeout
            )
            if pending:
                raise UserInputError(
                    f"{len(pending)} of {shards} selection shard actors did not start within "
                    f"{timeout:g} s: no node has {cpus:g} CPU(s) free; free them, add nodes, "
                    "use fewer shards or pass fewer CPUs per shard"
                )
            if pool.array is not None:
                srcs = [ray.put(pool.array[bounds[s] : bounds[s + 1]]) for s in range(shards)]
            else:
                srcs = plan_pieces(pool.files, pool.counts, bounds)
            self.srcs = srcs  # kept: a replacement loads its rows again
            info = _get([a.load.remote(p, column) for a, p in zip(self.actors, srcs, strict=True)])
        except BaseException:
            self.shutdown()
            raise
        dims = {d for _, d, _ in info}
        if len(dims) != 1:
            self.shutdown()
            raise UserInputError(f"embedding shards differ in dimension {sorted(dims)}; re-embed")
        self.d = dims.pop()
        self.sums = [s for _, _, s in info]
        self.counts = [r for r, _, _ in info]

    def _call(self, name: str, args: list[tuple], log: bool = False) -> list:
        """``name(*args[s])`` on every shard s; a shard lost on the way is replaced (its rows
        loaded again and ``self.log`` replayed, so its state is what it was) and asked again.
        ``log``: the call changes the shards' state (all get the same arguments)."""
        refs = [getattr(a, name).remote(*x) for a, x in zip(self.actors, args, strict=True)]
        out = []
        for s, ref in enumerate(refs):
            while True:
                try:
                    out.append(_get(ref))
                    break
                except LOST as exc:
                    self._replace(s, exc)
                    ref = getattr(self.actors[s], name).remote(*args[s])
        if log:
            self.log.append((name, args[0]))
        return out

    def _all(self, name: str, *args: Any, log: bool = False) -> list:
        return self._call(name, [args] * len(self.actors), log)

    def _replace(self, s: int, cause: BaseException) -> None:
        what = f"selection shard {s} (rows {self.bounds[s]}..{self.bounds[s + 1] - 1})"
        self.restarts.note(s, what, cause)
        actor = self.cls.options(**self.opts).remote(s, self.bounds[s])
        wait_started(actor, what, self.timeout)
        _get(actor.load.remote(self.srcs[s], self.column))
        _get(actor.replay.remote(self.log))
        ray.kill(self.actors[s])
        self.actors[s] = actor

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Global rows ``index`` gathered from their shards."""
        out = np.empty((len(index), self.d), dtype=np.float32)
        for pos, rows in self._all("rows_at", index):
            out[pos] = rows
        return out

    def greedy(self, budget: int, seed: int) -> Selection:
        mean = common_space(self.sums, self.counts)
        smax = max(self._all("greedy_space", mean, log=True))
        self._all("greedy_begin", budget, smax, log=True)

        def add_top(index: np.ndarray, rows: np.ndarray, t: int) -> list:
            return self._all("greedy_step", index, rows, t, log=True)

        idx, trips = sharded_greedy(
            self.n, budget, seed, lambda i: self.rows(np.array([i]))[0], add_top
        )
        return Selection(idx, "greedy", batches=trips)

    def threshold(
        self, budget: int, seed: int, tau0: float | None, decay: float, max_passes: int
    ) -> Selection:
        if tau0 is None:  # default_tau0's rule on rows fetched from the shards
            tau0 = 1.0
            if self.n >= 2:
                i, j = tau0_pairs(self.n, seed)
                tau0 = tau0_from_distances(pair_distances(self.rows(i), self.rows(j)))
        self._all("threshold_begin", self.n, budget, seed, log=True)

        def open_rows(index: np.ndarray, rows: np.ndarray, a: int, b: int, tau: float) -> list:
            return self._all("threshold_open", index, rows, a, b, tau, log=True)

        def dups(index: np.ndarray, rows: np.ndarray) -> bool:
            return all(self._all("threshold_duplicates", index, rows, log=True))

        res, _ = sharded_threshold(
            self.n, self.d, budget, float(tau0), float(decay), int(max_passes), open_rows, dups
        )
        return Selection(res.indices, "threshold", res.tau0, res.tau_final, res.passes)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
