"""How each iteration's training set is built from real data and generated pools.

docs/design.md, "Paradigms" (Shi et al., NeurIPS 2025, Sec. 5):

- ``replace``: candidates are the last generation's pool; the training set is a selection of B.
- ``accumulate``: candidates are the real training set and every generation so far; the training
  set is a selection of fixed size B.
- ``accumulate_all``: the training set grows: the previous training set plus a selection of B from
  the last pool.
- ``fresh``: round(λ·B) fresh real images (never used before in this run, seeded) plus a selection
  of B − round(λ·B) from the last pool.

Everything here works on *row references* ``(source, id)`` so that it is pure and testable; the
loop turns references into images. References are :class:`~raycollapse.curation.refs.Refs` (an
origin code and an id per row, 12 bytes, where a list of tuples would cost about 100 bytes a row
for pools of m x B candidates); sequences of ``(origin, id)`` tuples are accepted too.
Selection ``none`` takes a seeded random subset (the whole set when it has exactly the needed
size) — with a pool of exactly B, that is the whole pool, as in the
paper's no-filtering baseline. ``loop.accumulate_baseline=per_generation`` instead takes equal
shares from each origin, as the paper's code builds its accumulate baseline
(:func:`per_generation_indices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raycollapse.config.schema import PARADIGMS
from raycollapse.curation.greedy import random_select
from raycollapse.curation.refs import Refs
from raycollapse.errors import UserInputError
from raycollapse.seeds import derive_rng

_PER_GENERATION = 0xACC  # seed purpose of the per-generation shares (docs/design.md, "Seeding")


@dataclass(frozen=True)
class Plan:
    """What the next training set is made of.

    ``keep``: rows carried over unchanged (``accumulate_all``); ``candidates``: rows the selection
    chooses ``n_select`` from; ``fresh``: how many fresh real rows to add.
    """

    keep: Refs
    candidates: Refs
    n_select: int
    n_fresh: int


def fresh_count(train_size: int, fresh_fraction: float) -> int:
    """round(λ·B), the number of fresh real images per training set for paradigm ``fresh``."""
    return int(round(fresh_fraction * train_size))


def plan_next(
    paradigm: str,
    *,
    train_size: int,
    previous_train: Refs | Sequence[tuple[str, int]],
    pools: Sequence[Refs | Sequence[tuple[str, int]]],
    real_train: Refs | Sequence[tuple[str, int]],
    fresh_fraction: float = 0.0,
) -> Plan:
    """The plan for iteration ``len(pools)``'s training set.

    ``pools[k]`` are the rows generated in iteration k; ``real_train`` is iteration 0's training
    set; ``previous_train`` the last training set. The plan's rows are :class:`Refs`.
    """
    if not pools:
        raise ValueError("plan_next needs at least one generated pool")
    last = Refs.of(pools[-1])
    none = Refs(np.zeros(0), np.zeros(0))
    if paradigm == "replace":
        return Plan(none, last, train_size, 0)
    if paradigm == "accumulate":
        cands = Refs.concat([Refs.of(real_train), *(Refs.of(p) for p in pools)])
        return Plan(none, cands, train_size, 0)
    if paradigm == "accumulate_all":
        return Plan(Refs.of(previous_train), last, train_size, 0)
    if paradigm == "fresh":
        n_fresh = fresh_count(train_size, fresh_fraction)
        return Plan(none, last, train_size - n_fresh, n_fresh)
    raise UserInputError(f"unknown paradigm '{paradigm}'; use one of {', '.join(PARADIGMS)}.")


def pick_fresh_real(
    real_ids: np.ndarray, used: set[int] | np.ndarray, n: int, seed: int, iteration: int
) -> np.ndarray:
    """``n`` of ``real_ids`` never used before in this run, chosen by a seed of (run seed, iteration)."""
    available = np.setdiff1d(
        np.asarray(real_ids, dtype=np.int64), np.fromiter(used, dtype=np.int64, count=len(used))
    )
    if n > len(available):
        raise UserInputError(
            f"paradigm fresh needs {n} unused real images at iteration {iteration} but only "
            f"{len(available)} remain; lower loop.fresh_fraction or loop.iterations, or use more real data."
        )
    rng = derive_rng(seed, iteration, 0xF5E5)  # docs/design.md, "Seeding"
    return np.sort(rng.choice(available, size=n, replace=False))


def lineage(origins: list[str]) -> dict[str, float]:
    """Share of a training set from each origin: ``share_real``, ``share_gen_0``, ..."""
    if not origins:
        return {}
    values, counts = np.unique(np.asarray(origins), return_counts=True)
    total = float(len(origins))
    return {f"share_{v}": c / total for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def per_generation_indices(origins: Sequence[str] | np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` positions of ``origins`` (one origin per candidate: names, or the origin codes of
    :class:`Refs`) in equal shares per origin.

    The paper's code (``train_unconditional.py``, syn_type ``accumulated``): with G origins in
    order of first appearance (real, gen_0, gen_1, ...), each contributes the first
    ``n // G + 1`` of a seeded permutation of its rows, oldest first, and the concatenation is
    cut to ``n``, so the newest origin gets what is left. An origin with fewer rows gives all it has.
    """
    arr = np.asarray(origins)
    # Origins in order of first appearance, without a Python object per candidate.
    uniq, first = np.unique(arr, return_index=True)
    names = uniq[np.argsort(first)]
    if n < 0 or n > len(arr):
        raise UserInputError(f"cannot take {n} of {len(arr)} candidates.")
    if len(names) == 0:
        return np.zeros(0, dtype=np.int64)
    share = n // len(names) + 1
    rng = derive_rng(seed, _PER_GENERATION)
    parts = []
    for name in names:
        rows = np.flatnonzero(arr == name)
        parts.append(rows[rng.permutation(len(rows))[:share]])
    out = np.concatenate(parts)[:n].astype(np.int64)
    if len(out) < n:  # only when some origin held fewer than its share: fill uniformly
        rest = np.setdiff1d(np.arange(len(arr)), out)
        out = np.concatenate([out, rng.choice(rest, size=n - len(out), replace=False)])
    return out


def baseline_indices(
    candidates: Refs | Sequence[tuple[str, int]], n: int, *, seed: int, method: str, shares: str
) -> np.ndarray:
    """The rows a ``random`` / ``none`` selection takes (the loop's baseline).

    ``shares`` (loop.accumulate_baseline): ``uniform``, a seeded random subset of all candidates
    (``random_select``, what the loop always did), or ``per_generation`` for ``method=none``
    (:func:`per_generation_indices`); ``random`` stays uniform.
    """
    if shares == "per_generation" and method == "none":
        return per_generation_indices(Refs.of(candidates).codes, n, seed)
    if shares not in ("uniform", "per_generation"):
        raise UserInputError(
            f"loop.accumulate_baseline must be uniform or per_generation, got {shares!r}."
        )
    return random_select(len(candidates), n, seed=seed)
