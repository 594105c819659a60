"""Where sharded selection and entropy get their rows without gathering them on the driver:
Parquet embedding shards (footers only here) or ``.npy`` files (headers only here); each actor
then reads its own row ranges with :func:`read_pieces`.

A pool may also be a list of files, some of them :class:`FileRows`: chosen rows of several
files in a chosen order (the loop's candidates, subsets of several pools). Its row count is
``len(rows)``, and an actor reads and keeps only its rows of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raycollapse.data.inputs import EMBEDDING_COLUMN
from raycollapse.errors import UserInputError
from raycollapse.io.parquet import list_column_to_matrix
from raycollapse.io.storage import open_fs, read_parquet
from raycollapse.neighbors.validate import as_features
from raycollapse.stages.knn_shard_inputs import Piece, embedding_parquet_files, parquet_row_counts

__all__ = ["FileRows", "Pool", "npy_shape", "pool_of", "read_pieces"]


class FileRows(str):
    """Rows of several Parquet files in a chosen order: row i is row ``rows[i]`` of
    ``files[file_no[i]]``.

    A ``str`` (the first file's path) so that the row-range planning (:func:`plan_pieces`)
    carries it unchanged into the :class:`Piece` an actor reads; :func:`read_pieces` then reads
    each file the piece touches once and takes its rows ``start .. stop-1``. Pickles with its
    arrays (12 bytes per row; they travel to the actors).
    """

    files: list[str]
    file_no: np.ndarray
    rows: np.ndarray

    def __new__(cls, files: Sequence[str], file_no: np.ndarray, rows: np.ndarray) -> FileRows:
        obj = super().__new__(cls, files[0])
        obj.files = [str(f) for f in files]
        obj.file_no = np.asarray(file_no, dtype=np.int32)
        obj.rows = np.asarray(rows, dtype=np.int64)
        if obj.file_no.shape != obj.rows.shape:
            raise ValueError("file_no and rows must have one entry per row")
        return obj

    def __reduce__(self) -> tuple:
        return (FileRows, (self.files, self.file_no, self.rows))


@dataclass(frozen=True)
class Pool:
    """N rows either in memory (``array``) or in ``files`` with ``counts`` rows each."""

    n: int
    array: np.ndarray | None = None
    files: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a ``.npy`` file from its header (no data read)."""
    fs, inner = open_fs(path)
    try:
        with fs.open_input_file(inner) as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, fortran, dtype = header(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read '{path}' as a .npy array ({exc})") from None
    if fortran or len(shape) != 2 or not np.issubdtype(dtype, np.number):
        raise UserInputError(
            f"'{path}' holds a {'Fortran-ordered ' if fortran else ''}{dtype} array of shape "
            f"{shape}; sharded selection needs N x d numeric embeddings (np.save of a C array)"
        )
    return shape, dtype, offset


def pool_of(
    source: np.ndarray | str | Path | Sequence[str], column: str = EMBEDDING_COLUMN
) -> Pool:
    """The pool behind ``source``: an (N, d) array, Parquet embedding shards (file, folder or
    URI), ``.npy`` embedding files (a file or a folder of them, in sorted order) or an explicit
    list of Parquet files and :class:`FileRows` (rows in list order)."""
    if isinstance(source, list | tuple) and source and all(isinstance(f, str) for f in source):
        return _listed_pool(list(source), column)
    if not isinstance(source, (str, Path)):
        x = as_features(source, "features", min_rows=1)
        return Pool(len(x), array=x)
    text = str(source)
    if "://" not in text and not Path(text).exists():
        raise UserInputError(
            f"input '{text}' does not exist; pass a .npy file, Parquet embedding shards (a "
            "file, folder or URI) or a folder of .npy files"
        )
    files = embedding_parquet_files(text, column)
    if files is not None:
        counts = []
        for f in files:
            try:
                counts += parquet_row_counts([f], column)
            except (OSError, pa.ArrowInvalid) as exc:
                raise UserInputError(f"cannot read Parquet shard '{f}' ({exc})") from None
    else:
        p = Path(text)
        files = [str(f) for f in sorted(p.rglob("*.npy"))] if p.is_dir() else [text]
        if not files or not all(f.endswith(".npy") for f in files):
            raise UserInputError(
                f"'{text}' is neither Parquet with an '{column}' column nor .npy embeddings; "
                "run `raycollapse embed` first or pass .npy embeddings"
            )
        shapes = [npy_shape(f)[0] for f in files]
        if len({s[1] for s in shapes}) != 1:
            raise UserInputError(f"the .npy files under '{text}' differ in dimension; re-embed")
        counts = [s[0] for s in shapes]
    n = int(sum(counts))
    if n == 0:
        raise UserInputError(f"input '{text}' holds no rows; pass a non-empty pool")
    return Pool(n, files=files, counts=counts)


def _listed_pool(files: list[str], column: str) -> Pool:
    counts = []
    for f in files:
        parts = f.files if isinstance(f, FileRows) else [f]
        try:
            full = parquet_row_counts(parts, column)  # also checks the column is in every file
        except (OSError, pa.ArrowInvalid) as exc:
            raise UserInputError(f"cannot read Parquet shard '{f}' ({exc})") from None
        if isinstance(f, FileRows):
            if len(f.rows) and (
                f.file_no.min() < 0
                or f.file_no.max() >= len(parts)
                or f.rows.min() < 0
                or np.any(f.rows >= np.asarray(full)[f.file_no])
            ):
                raise UserInputError(f"rows outside the Parquet shards asked of '{f}' and others")
            counts.append(len(f.rows))
        else:
            counts.append(full[0])
    n = int(sum(counts))
    if n == 0:
        raise UserInputError("the listed Parquet shards hold no rows; pass a non-empty pool")
    return Pool(n, files=files, counts=counts)


def read_pieces(pieces: Sequence[Piece], column: str) -> np.ndarray:
    """The float32 rows of ``pieces`` (Parquet, ``.npy`` or :class:`FileRows` row ranges),
    concatenated."""
    parts = []
    for p in pieces:
        path = p.path
        try:
            if isinstance(path, FileRows):
                parts.append(_chosen_rows(path, p.start, p.stop, column))
            elif path.endswith(".npy"):
                parts.append(_npy_rows(p))
            else:
                table = read_parquet(path, columns=[column]).slice(p.start, p.stop - p.start)
                values = table.column(column).combine_chunks()
                parts.append(list_column_to_matrix(values, column, path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise UserInputError(
                f"cannot read shard file '{path}' ({exc}); it was listed when the selection "
                "started: restore it or rerun on the files that exist"
            ) from None
    x = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return x.astype(np.float32, copy=False)


def _chosen_rows(fr: FileRows, start: int, stop: int, column: str) -> np.ndarray:
    """Rows ``start .. stop-1`` of ``fr``, reading each file they lie in once."""
    nos, rows = fr.file_no[start:stop], fr.rows[start:stop]
    out: np.ndarray | None = None
    for no in np.unique(nos):
        at = np.flatnonzero(nos == no)
        table = read_parquet(fr.files[no], columns=[column]).take(pa.array(rows[at]))
        x = list_column_to_matrix(table.column(column).combine_chunks(), column, fr.files[no])
        if out is None:
            out = np.empty((stop - start, x.shape[1]), dtype=np.float32)
        out[at] = x
    assert out is not None, "a piece holds at least one row"
    return out


def _npy_rows(p: Piece) -> np.ndarray:
    (_, d), dtype, offset = npy_shape(p.path)
    fs, inner = open_fs(p.path)
    with fs.open_input_file(inner) as f:
        f.seek(offset + p.start * d * dtype.itemsize)
        data = f.read((p.stop - p.start) * d * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(p.stop - p.start, d)
