"""Row references ``(origin, id)`` as two numpy arrays instead of Python tuples.

A loop's candidates are whole pools (m x B rows each, every generation for ``accumulate``): as a
list of ``(str, int)`` tuples they cost about 100 bytes per row on the driver. :class:`Refs` keeps
an origin code (int32: ``-1`` for ``real``, ``k`` for ``gen_k``) and an id (int64) per row,
12 bytes, and still reads as a sequence of ``(origin, id)`` tuples where a caller wants one
(iteration, ``refs[i]``, equality with a list of tuples).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

REAL_CODE = -1


def origin_code(name: str) -> int:
    """``real`` -> -1, ``gen_k`` -> k."""
    if name == "real":
        return REAL_CODE
    head, _, tail = str(name).partition("_")
    if head != "gen" or not tail.isdigit():
        raise ValueError(f"unknown origin '{name}': origins are 'real' and 'gen_<k>'")
    return int(tail)


def origin_name(code: int) -> str:
    """-1 -> ``real``, k -> ``gen_k``."""
    return "real" if int(code) == REAL_CODE else f"gen_{int(code)}"


class Refs(Sequence):
    """Row references: ``codes[i]`` (origin code) and ``ids[i]`` of row i, in order.

    Indexing with an int gives the tuple ``(origin, id)``; with a slice or an integer array, a
    :class:`Refs` of those rows. Equal to another :class:`Refs` or to a sequence of tuples with
    the same rows in the same order.
    """

    __slots__ = ("codes", "ids")

    def __init__(self, codes: Any, ids: Any) -> None:
        self.codes = np.asarray(codes, dtype=np.int32).reshape(-1)
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self.codes) != len(self.ids):
            raise ValueError("codes and ids must have the same length")

    @classmethod
    def of_origin(cls, origin: str, ids: Any) -> Refs:
        """Every id of ``ids`` in one origin."""
        ids = np.asarray(ids, dtype=np.int64)
        return cls(np.full(len(ids), origin_code(origin), dtype=np.int32), ids)

    @classmethod
    def of(cls, refs: Refs | Iterable[tuple[str, int]]) -> Refs:
        """``refs`` itself, or the :class:`Refs` of a sequence of ``(origin, id)`` tuples."""
        if isinstance(refs, Refs):
            return refs
        pairs = list(refs)
        return cls([origin_code(o) for o, _ in pairs], [int(i) for _, i in pairs])

    @classmethod
    def from_names(cls, names: Any, ids: Any) -> Refs:
        """From a column of origin names (strings) and one of ids."""
        names = np.asarray(names, dtype=object)
        if len(names) == 0:
            return cls(np.zeros(0), np.zeros(0))
        uniq, inverse = np.unique(names, return_inverse=True)
        codes = np.array([origin_code(u) for u in uniq], dtype=np.int32)
        return cls(codes[inverse], ids)

    @staticmethod
    def concat(parts: Sequence[Refs]) -> Refs:
        """The rows of ``parts``, one after the other."""
        if not parts:
            return Refs(np.zeros(0), np.zeros(0))
        return Refs(
            np.concatenate([p.codes for p in parts]), np.concatenate([p.ids for p in parts])
        )

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, key: int) -> tuple[str, int]: ...

    @overload
    def __getitem__(self, key: slice | np.ndarray | list[int]) -> Refs: ...

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int | np.integer):
            return origin_name(self.codes[key]), int(self.ids[key])
        return Refs(self.codes[key], self.ids[key])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        names = {c: origin_name(c) for c in np.unique(self.codes).tolist()}
        for c, i in zip(self.codes.tolist(), self.ids.tolist(), strict=True):
            yield names[c], i

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Refs):
            return np.array_equal(self.codes, other.codes) and np.array_equal(self.ids, other.ids)
        if isinstance(other, list | tuple):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __add__(self, other: Refs | Sequence[tuple[str, int]]) -> Refs:
        return Refs.concat([self, Refs.of(other)])

    def __repr__(self) -> str:
        head = ", ".join(repr(r) for r in self[:4].tolist())
        return f"Refs({len(self)} rows: [{head}{', ...' if len(self) > 4 else ''}])"

    def tolist(self) -> list[tuple[str, int]]:
        """The rows as ``(origin, id)`` tuples (for small sets: about 100 bytes a row)."""
        return list(self)

    def names(self) -> np.ndarray:
        """The origin name of every row (a numpy string array, for Arrow columns)."""
        uniq, inverse = np.unique(self.codes, return_inverse=True)
        return np.array([origin_name(c) for c in uniq.tolist()] or [""])[inverse.reshape(-1)]

    def groups(self) -> list[tuple[int, np.ndarray]]:
        """``(origin code, positions)`` per origin, origins in order of first appearance."""
        uniq, first = np.unique(self.codes, return_index=True)
        return [(int(c), np.flatnonzero(self.codes == c)) for c in uniq[np.argsort(first)]]
