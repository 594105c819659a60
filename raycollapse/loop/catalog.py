"""Every image a run knows, addressed by ``(origin, id)``: real data and each generation's pool.

Training sets are such references (``curation.refs.Refs``: an origin code and an id per row); the
catalog turns them into images and into embeddings in any feature space. Images of a set of
references are read row by row from their files (:meth:`Catalog.iter_images`: only the files and
rows wanted, a bounded chunk at a time, nothing cached), so the loop's driver never decodes a
whole pool to build a training set; :meth:`Catalog.images` (a whole origin, cached) stays for the
callers that want all of it.

Vector data (``data/vectors.py``) go through the same calls: the "images" of a vector origin are
its float32 ``N x d`` vectors (shards with a ``vector`` column), and a training set of vectors
stores them in a ``vector`` column instead of PNG images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.curation.refs import Refs, origin_name
from raycollapse.data.records import encode_png
from raycollapse.data.vectors import (
    VECTOR_COLUMN,
    column_vectors,
    is_vector_schema,
    read_mog_meta,
    vector_array,
)
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.images import decode_column
from raycollapse.io.parquet import read_embeddings, read_images
from raycollapse.loop import layout

Ref = tuple[str, int]
AnyRefs = Refs | Sequence[Ref]
# Rows of images the driver decodes at once when it streams a training set (a row group of the
# written file): bounded whatever the pool or training-set size.
CHUNK_ROWS = 4096
_BATCH_ROWS = 1024  # rows per record batch read from a source file


def real_dir(run: str, *parts: str) -> str:
    return storage.join(run, "real", *parts)


def origin_of(iteration: int) -> str:
    return f"gen_{iteration}"


@dataclass
class Catalog:
    """Lazy, cached access to the images and embeddings of a run, by origin."""

    run: str
    channels: int
    _images: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    _emb: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    chunk_rows: int = CHUNK_ROWS  # rows per chunk (and row group) of a written training set
    rows_decoded: int = 0  # rows read and decoded by the row reader (:meth:`iter_images`)

    def images_uri(self, origin: str) -> str:
        if origin == "real":
            return real_dir(self.run, "data")
        return layout.iter_path(self.run, int(origin.split("_")[1]), layout.POOL)

    def embeddings_uri(self, origin: str, features: str) -> str:
        if origin == "real":
            return real_dir(self.run, layout.EMBEDDINGS, features)
        return layout.iter_path(self.run, int(origin.split("_")[1]), layout.EMBEDDINGS, features)

    def images(self, origin: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, images, labels)`` of one origin, in id order (images: float32 ``N x d``
        vectors for vector data)."""
        if origin not in self._images:
            uri = self.images_uri(origin)
            if self.holds_vectors(origin):
                self._images[origin] = read_vectors(uri)
            else:
                self._images[origin] = read_images(uri, self.channels)
        return self._images[origin]

    def holds_vectors(self, origin: str) -> bool:
        """Whether the shards of ``origin`` hold vectors rather than images."""
        return is_vector_schema(_first_schema(self.images_uri(origin)).names)

    def mog_meta(self) -> dict[str, Any] | None:
        """The mixture of the real data (``raycollapse.mog`` metadata), ``None`` for other data."""
        return read_mog_meta(_first_schema(self.images_uri("real")).metadata)

    def embeddings(self, origin: str, features: str) -> tuple[np.ndarray, np.ndarray]:
        key = (origin, features)
        if key not in self._emb:
            self._emb[key] = read_embeddings(self.embeddings_uri(origin, features))
        return self._emb[key]

    def ids(self, origin: str, features: str) -> np.ndarray:
        """The ids of ``origin`` embedded in ``features``, in id order (the order of
        :meth:`embeddings`), reading only the id column when the vectors are not loaded."""
        key = (origin, features)
        if key in self._emb:
            return self._emb[key][0]
        uri = self.embeddings_uri(origin, features)
        return np.sort(np.concatenate([_file_ids(f) for f in _files(uri)]))

    def embedding_rows(
        self, refs: AnyRefs, features: str
    ) -> list[str | tuple[list[str], np.ndarray, np.ndarray]]:
        """Where the embeddings of ``refs`` lie on storage, in ``refs`` order, without reading a
        vector: per run of consecutive refs of one origin, either that origin's Parquet files
        (when the run is all their rows in stored order) or ``(files, file_no, rows)``: ref i
        of the run is row ``rows[i]`` of ``files[file_no[i]]``. Concatenated, they are
        :meth:`gather_embeddings` of ``refs`` row for row. Reads each file's id column once."""
        refs = Refs.of(refs)
        out: list[str | tuple[list[str], np.ndarray, np.ndarray]] = []
        bounds = [0, *(np.flatnonzero(np.diff(refs.codes)) + 1).tolist(), len(refs)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            if stop > start:
                origin = origin_name(refs.codes[start])
                out += self._origin_rows(origin, refs.ids[start:stop], features)
        return out

    def _origin_rows(
        self, origin: str, wanted: np.ndarray, features: str
    ) -> list[str | tuple[list[str], np.ndarray, np.ndarray]]:
        files = _files(self.embeddings_uri(origin, features))
        index = _FileIndex.of(files)
        nos, rows = index.locate(wanted, origin)
        if np.array_equal(nos, index.stored_nos) and np.array_equal(rows, index.stored_rows):
            return list(files)  # every row, in stored order: the files themselves
        return [(files, nos, rows)]

    def _rows(self, ids: np.ndarray, wanted: np.ndarray, origin: str) -> np.ndarray:
        pos = np.searchsorted(ids, wanted)
        if np.any(pos >= len(ids)) or np.any(ids[np.minimum(pos, len(ids) - 1)] != wanted):
            raise KeyError(f"some ids are missing from origin '{origin}'")
        return pos

    def image_ids(self, origin: str) -> np.ndarray:
        """The ids of the images of ``origin``, in id order, reading only the id column."""
        if origin in self._images:
            return self._images[origin][0]
        return np.sort(np.concatenate([_file_ids(f) for f in _files(self.images_uri(origin))]))

    def gather_images(self, refs: AnyRefs) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of ``refs``, in their order (only the files and rows they need are
        read; nothing is cached)."""
        refs = Refs.of(refs)
        parts = list(self.iter_images(refs, max(1, len(refs))))
        return np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])

    def iter_images(
        self, refs: AnyRefs, chunk_rows: int | None = None
    ) -> Iterator[tuple[int, Refs, np.ndarray, np.ndarray]]:
        """``(start, refs[start:stop], images, labels)`` for consecutive chunks of at most
        ``chunk_rows`` refs (default :attr:`chunk_rows`), in order. Per origin the id columns
        are read once per call; each chunk then reads only the files holding its rows, record
        batch by record batch, and decodes only its rows: the driver holds one chunk (plus one
        batch of encoded rows), whatever the size of the origins."""
        refs = Refs.of(refs)
        chunk_rows = chunk_rows or self.chunk_rows
        indexes: dict[int, _FileIndex] = {}
        for start in range(0, len(refs), chunk_rows):
            part = refs[start : start + chunk_rows]
            images: np.ndarray | None = None
            labels = np.empty(len(part), dtype=np.int64)
            for code, idx in part.groups():
                origin = origin_name(code)
                if code not in indexes:
                    indexes[code] = _FileIndex.of(_files(self.images_uri(origin)))
                for at, im, lab in self._read_rows(origin, indexes[code], part.ids[idx]):
                    # Written in place: one decoded copy of the chunk, whatever its origins.
                    if images is None:
                        images = np.empty((len(part), *im.shape[1:]), dtype=im.dtype)
                    images[idx[at]] = im
                    labels[idx[at]] = lab
            assert images is not None
            yield start, part, images, labels

    def _read_rows(
        self, origin: str, index: _FileIndex, ids: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per file holding some of ``ids`` of ``origin``: ``(positions in ids, images (or
        vectors), labels)`` of those rows."""
        vectors = self.holds_vectors(origin)
        column = VECTOR_COLUMN if vectors else "image"
        nos, rows = index.locate(ids, origin)
        by_file = np.argsort(nos, kind="stable")
        bounds = np.flatnonzero(np.diff(nos[by_file])) + 1
        for at in np.split(by_file, bounds) if len(ids) else []:
            path = index.files[int(nos[at[0]])]
            table = _take_rows(path, rows[at], [column, "label"])
            if vectors:
                data = column_vectors(table.column(VECTOR_COLUMN), path)
            else:
                data = np.stack(decode_column(table.column("image"), self.channels, name=path))
            labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
            self.rows_decoded += len(at)
            yield at, data, labels

    def write_train_set(self, refs: AnyRefs, uri: str) -> int:
        """Write the training set of ``refs`` (:func:`train_set_table`) as one Parquet file at
        ``uri``, atomically, one row group per chunk of :attr:`chunk_rows` rows
        (:meth:`iter_images`); its row count."""
        tables = (
            train_set_table(part, images, labels, start=start)
            for start, part, images, labels in self.iter_images(refs, self.chunk_rows)
        )
        return storage.write_parquet_tables_atomic(tables, uri)

    def gather_embeddings(self, refs: AnyRefs, features: str) -> np.ndarray:
        """Embeddings of ``refs`` in feature space ``features``, in their order."""
        refs = Refs.of(refs)
        parts: list[np.ndarray] = []
        order: list[np.ndarray] = []
        for code, idx in refs.groups():
            origin = origin_name(code)
            ids, x = self.embeddings(origin, features)
            parts.append(x[self._rows(ids, refs.ids[idx], origin)])
            order.append(idx)
        perm = np.argsort(np.concatenate(order), kind="stable")
        return np.concatenate(parts)[perm]


@dataclass(frozen=True)
class _FileIndex:
    """Where each id of a shard folder is: per-row scalars (ids sorted, file number, row in the
    file; 20 bytes a row), read from the id columns only."""

    files: list[str]
    ids: np.ndarray  # sorted
    nos: np.ndarray  # file of ids[i]
    rows: np.ndarray  # row of ids[i] in its file
    stored_nos: np.ndarray  # the same in stored order (files in order, rows in order)
    stored_rows: np.ndarray

    @classmethod
    def of(cls, files: list[str]) -> _FileIndex:
        per_file = [_file_ids(f) for f in files]
        ids = np.concatenate(per_file)
        nos = np.repeat(np.arange(len(files), dtype=np.int32), [len(a) for a in per_file])
        rows = np.concatenate([np.arange(len(a), dtype=np.int64) for a in per_file])
        order = np.argsort(ids, kind="stable")
        return cls(files, ids[order], nos[order], rows[order], nos, rows)

    def locate(self, wanted: np.ndarray, origin: str) -> tuple[np.ndarray, np.ndarray]:
        """``(file number, row)`` of every id of ``wanted``, in its order (KeyError naming
        ``origin`` for an id it does not hold)."""
        wanted = np.asarray(wanted, dtype=np.int64)
        pos = np.searchsorted(self.ids, wanted)
        if (
            len(self.ids) == 0
            or np.any(pos >= len(self.ids))
            or np.any(self.ids[np.minimum(pos, len(self.ids) - 1)] != wanted)
        ):
            raise KeyError(f"some ids are missing from origin '{origin}'")
        return self.nos[pos], self.rows[pos]


def _take_rows(path: str, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows ``rows`` (in that order) of ``columns`` of one Parquet file, reading it record batch
    by record batch and keeping only those rows."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    parts: list[pa.Table] = []
    fs, inner = storage.open_fs(path)
    try:
        with fs.open_input_file(inner) as src:
            offset = 0
            for batch in pq.ParquetFile(src).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                lo, hi = np.searchsorted(ordered, [offset, offset + batch.num_rows])
                if hi > lo:
                    parts.append(pa.Table.from_batches([batch]).take(ordered[lo:hi] - offset))
                offset += batch.num_rows
                if hi == len(ordered):
                    break
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(
            f"cannot read Parquet file '{path}': {exc}. The file is damaged or incomplete: "
            "replace it, or remove it and re-run the command that wrote it."
        ) from None
    if sum(p.num_rows for p in parts) != len(rows):
        raise UserInputError(f"Parquet file '{path}' holds fewer rows than its id column says.")
    table = pa.concat_tables(parts)
    return table.take(np.argsort(order, kind="stable"))


def _files(uri: str) -> list[str]:
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet shards under '{uri}'")
    return files


def _file_ids(path: str) -> np.ndarray:
    return storage.read_parquet(path, columns=["id"]).column("id").to_numpy().astype(np.int64)


def _first_schema(uri: str) -> pa.Schema:
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet shards under '{uri}'")
    fs, path = storage.open_fs(files[0])
    return pq.read_schema(path, filesystem=fs)


def read_vectors(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, float32 vectors N x d, labels with -1 for none)`` of a vector shard folder."""
    files = storage.list_files(uri)
    table = pa.concat_tables(
        storage.read_parquet(f, columns=["id", VECTOR_COLUMN, "label"]) for f in files
    ).sort_by("id")
    ids = table.column("id").to_numpy().astype(np.int64)
    labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
    return ids, column_vectors(table.column(VECTOR_COLUMN), uri), labels


def train_set_table(
    refs: AnyRefs, images: np.ndarray, labels: np.ndarray, *, start: int = 0
) -> pa.Table:
    """A training set as Parquet rows ``{id, image, label, source, origin, origin_id}`` (for
    vectors, float ``N x d``: ``vector`` instead of ``image``); ``start``: the id of the first
    row (a chunk of a larger set)."""
    refs = Refs.of(refs)
    names = refs.names()
    if images.ndim == 2:
        data = {VECTOR_COLUMN: vector_array(images)}
    else:
        data = {"image": pa.array([encode_png(im) for im in images], pa.binary())}
    return pa.table(
        {
            "id": pa.array(np.arange(start, start + len(refs)), pa.int64()),
            **data,
            "label": pa.array(labels, pa.int64(), mask=labels < 0),
            "source": pa.array(names, pa.string()),
            "origin": pa.array(names, pa.string()),
            "origin_id": pa.array(refs.ids, pa.int64()),
        }
    )


def read_train_refs(uri: str) -> Refs:
    """The references of a training set folder, in row (id) order."""
    table = pa.concat_tables(
        storage.read_parquet(f, columns=["id", "origin", "origin_id"])
        for f in storage.list_files(uri)
    )
    table = table.sort_by("id")
    return Refs.from_names(
        table.column("origin").to_numpy(zero_copy_only=False),
        table.column("origin_id").to_numpy().astype(np.int64),
    )
