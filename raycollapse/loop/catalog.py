"""Every image a run knows, addressed by ``(origin, id)``: real data and each generation's pool.

Training sets are lists of such references; the catalog turns them into images and into
embeddings in any feature space, reading each shard folder once.

Vector data (``data/vectors.py``) go through the same calls: the "images" of a vector origin are
its float32 ``N x d`` vectors (shards with a ``vector`` column), and a training set of vectors
stores them in a ``vector`` column instead of PNG images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.data.records import encode_png
from raycollapse.data.vectors import (
    VECTOR_COLUMN,
    column_vectors,
    is_vector_schema,
    read_mog_meta,
    vector_array,
)
from raycollapse.io import storage
from raycollapse.io.parquet import read_embeddings, read_images
from raycollapse.loop import layout

Ref = tuple[str, int]


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
        self, refs: list[Ref], features: str
    ) -> list[str | tuple[list[str], np.ndarray, np.ndarray]]:
        """Where the embeddings of ``refs`` lie on storage, in ``refs`` order, without reading a
        vector: per run of consecutive refs of one origin, either that origin's Parquet files
        (when the run is all their rows in stored order) or ``(files, file_no, rows)``: ref i
        of the run is row ``rows[i]`` of ``files[file_no[i]]``. Concatenated, they are
        :meth:`gather_embeddings` of ``refs`` row for row. Reads each file's id column once."""
        out: list[str | tuple[list[str], np.ndarray, np.ndarray]] = []
        origins = [o for o, _ in refs]
        start = 0
        while start < len(refs):
            stop = start + 1
            while stop < len(refs) and origins[stop] == origins[start]:
                stop += 1
            out += self._origin_rows(origins[start], [i for _, i in refs[start:stop]], features)
            start = stop
        return out

    def _origin_rows(
        self, origin: str, wanted: list[int], features: str
    ) -> list[str | tuple[list[str], np.ndarray, np.ndarray]]:
        files = _files(self.embeddings_uri(origin, features))
        per_file = [_file_ids(f) for f in files]
        ids = np.concatenate(per_file)
        nos = np.repeat(np.arange(len(files), dtype=np.int32), [len(a) for a in per_file])
        rows = np.concatenate([np.arange(len(a), dtype=np.int64) for a in per_file])
        order = np.argsort(ids, kind="stable")
        pos = order[self._rows(ids[order], np.asarray(wanted, dtype=np.int64), origin)]
        if len(pos) == len(ids) and np.array_equal(pos, np.arange(len(ids))):
            return list(files)  # every row, in stored order: the files themselves
        return [(files, nos[pos], rows[pos])]

    def _rows(self, ids: np.ndarray, wanted: np.ndarray, origin: str) -> np.ndarray:
        pos = np.searchsorted(ids, wanted)
        if np.any(pos >= len(ids)) or np.any(ids[np.minimum(pos, len(ids) - 1)] != wanted):
            raise KeyError(f"some ids are missing from origin '{origin}'")
        return pos

    def gather_images(self, refs: list[Ref]) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of ``refs``, in their order."""
        out_img: list[np.ndarray] = []
        out_lab: list[np.ndarray] = []
        order: list[np.ndarray] = []
        for origin, idx in _group(refs):
            ids, images, labels = self.images(origin)
            rows = self._rows(ids, np.array([refs[i][1] for i in idx]), origin)
            out_img.append(images[rows])
            out_lab.append(labels[rows])
            order.append(idx)
        perm = np.argsort(np.concatenate(order), kind="stable")
        return np.concatenate(out_img)[perm], np.concatenate(out_lab)[perm]

    def gather_embeddings(self, refs: list[Ref], features: str) -> np.ndarray:
        """Embeddings of ``refs`` in feature space ``features``, in their order."""
        parts: list[np.ndarray] = []
        order: list[np.ndarray] = []
        for origin, idx in _group(refs):
            ids, x = self.embeddings(origin, features)
            parts.append(x[self._rows(ids, np.array([refs[i][1] for i in idx]), origin)])
            order.append(idx)
        perm = np.argsort(np.concatenate(order), kind="stable")
        return np.concatenate(parts)[perm]


def _group(refs: list[Ref]) -> list[tuple[str, np.ndarray]]:
    """Positions of ``refs`` grouped by origin (origins in first-seen order)."""
    groups: dict[str, list[int]] = {}
    for i, (origin, _) in enumerate(refs):
        groups.setdefault(origin, []).append(i)
    return [(o, np.asarray(ix, dtype=np.int64)) for o, ix in groups.items()]


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


def train_set_table(refs: list[Ref], images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """A training set as Parquet rows ``{id, image, label, source, origin, origin_id}`` (for
    vectors, float ``N x d``: ``vector`` instead of ``image``)."""
    if images.ndim == 2:
        data = {VECTOR_COLUMN: vector_array(images)}
    else:
        data = {"image": pa.array([encode_png(im) for im in images], pa.binary())}
    return pa.table(
        {
            "id": pa.array(np.arange(len(refs)), pa.int64()),
            **data,
            "label": pa.array(labels, pa.int64(), mask=labels < 0),
            "source": pa.array([o for o, _ in refs], pa.string()),
            "origin": pa.array([o for o, _ in refs], pa.string()),
            "origin_id": pa.array([i for _, i in refs], pa.int64()),
        }
    )


def read_train_refs(uri: str) -> list[Ref]:
    table = pa.concat_tables(
        storage.read_parquet(f, columns=["id", "origin", "origin_id"])
        for f in storage.list_files(uri)
    )
    table = table.sort_by("id")
    return list(
        zip(table.column("origin").to_pylist(), table.column("origin_id").to_pylist(), strict=True)
    )
