"""Recovery of the long-lived shard actors (kNN shards, selection shards) lost mid-computation.

A shard actor holds state that a plain task retry cannot bring back (its rows, its index, its
running selection state), so Ray's own retries do not apply. Instead, when a call fails because
an actor died (killed, crashed, or its node lost) or one of its results was lost with a node,
the driver finds the dead shards by pinging every actor, starts a replacement for each, rebuilds
its state deterministically (the same rows, then the same calls in the same order) and sends the
failed call again. The state is a pure function of the rows and of the calls, so the result
equals the uninterrupted run exactly. Each shard is replaced at most :data:`SHARD_RESTARTS`
times per computation; after that :class:`ShardLostError` names the shard.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ray

from raycollapse.stages.errors import raise_if_user_error

__all__ = [
    "LOST",
    "_get",
    "_pipelined",
    "SHARD_RESTARTS",
    "ShardLostError",
    "Restarts",
    "dead_shards",
    "wait_started",
]

# Replacements of one shard within one computation (as STAGE_RETRIES for the shard jobs).
SHARD_RESTARTS = 3

# Failures that mean "an actor or its output is gone", not an error of the computation itself.
LOST: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.ObjectLostError,
)


class ShardLostError(RuntimeError):
    """A shard actor was lost more often than :data:`SHARD_RESTARTS`, or cannot be replaced."""


def dead_shards(actors: Sequence[Any]) -> list[int]:
    """The positions of the actors that no longer answer (a ping each, in parallel)."""
    pings = [a.__ray_ready__.remote() for a in actors]
    dead = []
    for s, ping in enumerate(pings):
        try:
            ray.get(ping)
        except LOST:
            dead.append(s)
    return dead


def wait_started(actor: Any, what: str, timeout: float | None) -> None:
    """Wait until a replacement ``actor`` runs; ShardLostError naming ``what`` when no node can
    host it within ``timeout`` seconds (its node is gone and the others are full)."""
    ready = actor.__ray_ready__.remote()
    done, _ = ray.wait([ready], timeout=timeout)
    if not done:
        ray.kill(actor)
        raise ShardLostError(
            f"{what} was lost and its replacement did not start within {timeout:g} s: no node "
            "has its CPUs/GPUs free; add a node or use fewer shards, then run again"
        )
    ray.get(ready)


class Restarts:
    """Counts the replacements of each shard; raises ShardLostError past the bound."""

    def __init__(self, shards: int) -> None:
        self.count = [0] * shards

    def note(self, shard: int, what: str, cause: BaseException | None = None) -> None:
        """Record one replacement of ``shard`` (``what``: how to name it in the error)."""
        self.count[shard] += 1
        if self.count[shard] > SHARD_RESTARTS:
            why = f" (last: {type(cause).__name__})" if cause is not None else ""
            raise ShardLostError(
                f"{what} was lost {self.count[shard]} times{why}; giving up after "
                f"{SHARD_RESTARTS} replacements: check the cluster's nodes (memory, preemption) "
                "and run again"
            )


# Query batches submitted ahead of the one being merged: keeps every actor busy while the
# driver merges, and bounds the object-store memory used by in-flight batches.
_WINDOW = 4


def _get(refs: Any) -> Any:
    """``ray.get`` that re-raises a remote UserInputError as itself (clean CLI message)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        raise_if_user_error(exc)
        raise


def _pipelined(
    items: Iterable[Any],
    submit: Callable[[Any], list],
    recover: Callable[[BaseException], None] | None = None,
) -> Iterator[tuple[Any, list]]:
    """Yield ``(item, results)`` in order, with up to ``_WINDOW`` items submitted ahead.

    An item whose actor (or a result it needs) was lost is submitted again after ``recover``
    (which replaces the dead actors), ``SHARD_RESTARTS`` times at most.
    """
    pending: deque[tuple[Any, list]] = deque()

    def result(item: Any, refs: list) -> list:
        for attempt in range(SHARD_RESTARTS + 1):
            try:
                return _get(refs)
            except LOST as exc:
                if recover is None or attempt == SHARD_RESTARTS:
                    raise
                recover(exc)
                refs = submit(item)
        raise AssertionError("unreachable")

    for item in items:
        pending.append((item, submit(item)))
        if len(pending) >= _WINDOW:
            done, refs = pending.popleft()
            yield done, result(done, refs)
    while pending:
        done, refs = pending.popleft()
        yield done, result(done, refs)
