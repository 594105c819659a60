"""Where the sharded kNN index gets its rows: shard counts, Parquet embedding files and the
row ranges of each file that make up each shard (footers only: no vectors are read here)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raycollapse.data.inputs import EMBEDDING_COLUMN
from raycollapse.errors import UserInputError
from raycollapse.io.storage import list_files, open_fs

__all__ = ["Piece", "check_shards", "embedding_parquet_files", "parquet_row_counts", "plan_pieces"]


def check_shards(shards: Any, n: int) -> int:
    """``shards`` as an int in 1..n, else UserInputError: every shard needs at least one row."""
    if isinstance(shards, bool) or not isinstance(shards, numbers.Integral) or shards < 1:
        raise UserInputError(f"shards must be an integer >= 1, got {shards!r}; pass --shards S")
    if shards > n:
        raise UserInputError(
            f"--shards {shards} is larger than the number of rows N={n}; every shard needs at "
            f"least one row, pass --shards <= {n} (1 runs in-process without Ray)"
        )
    return int(shards)


@dataclass(frozen=True)
class Piece:
    """Rows ``start`` .. ``stop - 1`` of one Parquet file."""

    path: str
    start: int
    stop: int


def embedding_parquet_files(path: str | Path, column: str = EMBEDDING_COLUMN) -> list[str] | None:
    """The Parquet files of INPUT, in :func:`load_features`' row order, when INPUT is a Parquet
    file or folder (local or URI) whose first file has ``column``; else None."""
    text = str(path)
    if "://" in text:
        files = list_files(text)
    else:
        p = Path(text)
        if p.is_file() and p.suffix == ".parquet":
            files = [text]
        elif p.is_dir():
            # Same order as load_features (sorted Paths), so global row i is its row i.
            files = [str(f) for f in sorted(p.rglob("*.parquet"))]
        else:
            return None
    if not files:
        return None
    fs, inner = open_fs(files[0])
    return files if column in pq.read_schema(inner, filesystem=fs).names else None


def parquet_row_counts(files: Sequence[str], column: str) -> list[int]:
    """Rows per file from the Parquet footers (no data read); checks ``column`` is present."""
    counts = []
    for f in files:
        fs, inner = open_fs(f)
        meta = pq.read_metadata(inner, filesystem=fs)
        if column not in meta.schema.to_arrow_schema().names:
            raise UserInputError(
                f"Parquet shard '{f}' has no '{column}' column; every shard needs it"
            )
        counts.append(meta.num_rows)
    return counts


def plan_pieces(
    files: Sequence[str], counts: Sequence[int], bounds: np.ndarray
) -> list[list[Piece]]:
    """For each shard [bounds[s], bounds[s+1]): the file row ranges that make it up, in order."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    plan = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        pieces = [
            Piece(f, int(max(a, fs) - fs), int(min(b, fe) - fs))
            for f, fs, fe in zip(files, starts[:-1], starts[1:], strict=True)
            if fs < b and fe > a
        ]
        plan.append(pieces)
    return plan
