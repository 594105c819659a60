"""Vector data (``data.source=mog``): records of float vectors instead of images.

Vectors need no image encoding. Every Parquet table of vector data (the real data, pools,
training sets) holds them directly in a ``vector`` column (``list<float32>``) where image data
has its ``image`` column; the rest of a row is as for images (``id``, ``label``, ...). Feature
space ``pixel`` of vector data is the raw values (no scaling): the embedding of a vector is the
vector (docs/design.md, "Mixture of Gaussians").

The real data of a ``mog`` run carry their mixture in the Parquet schema metadata
(``raycollapse.mog``: parameters and true entropy), which is where the loop's metrics find
``entropy_true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raycollapse.data.mog import mixture_entropy, mixture_from_config, sample_mixture
from raycollapse.errors import UserInputError
from raycollapse.seeds import derive_seed

VECTOR_COLUMN = "vector"
MOG_META = b"raycollapse.mog"


def vector_array(vectors: np.ndarray) -> pa.Array:
    """float ``N x d`` -> a ``list<float32>`` column (one list of d values per row)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = v.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    return pa.ListArray.from_arrays(offsets, pa.array(v.reshape(-1)))


def column_vectors(values: pa.Array | pa.ChunkedArray, source: str) -> np.ndarray:
    """A ``vector`` column -> float32 ``N x d`` (errors name the source)."""
    from raycollapse.io.parquet import list_column_to_matrix

    return list_column_to_matrix(values, VECTOR_COLUMN, source)


def is_vector_schema(names: list[str]) -> bool:
    """Whether a table with these column names holds vectors (a ``vector`` and no ``image``)."""
    return VECTOR_COLUMN in names and "image" not in names


@dataclass
class VectorRecords:
    """A set of vectors in memory; ``labels`` (the mixture component) is -1 where there is none."""

    ids: np.ndarray  # int64 (N,)
    vectors: np.ndarray  # float32 (N, d)
    labels: np.ndarray  # int64 (N,)
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    skipped_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.vectors.shape[0] != n or self.labels.shape[0] != n or self.vectors.ndim != 2:
            raise ValueError("ids, vectors (N x d) and labels must have the same length")

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def to_arrow_table(self) -> pa.Table:
        """``{id: int64, vector: list<float32>, label: nullable int64, source: string}``; the
        mixture (``meta``) in the schema metadata under ``raycollapse.mog``."""
        table = pa.table(
            {
                "id": pa.array(self.ids, pa.int64()),
                VECTOR_COLUMN: vector_array(self.vectors),
                "label": pa.array(self.labels, pa.int64(), mask=self.labels < 0),
                "source": pa.array([self.source] * len(self), pa.string()),
            }
        )
        if not self.meta:
            return table
        return table.replace_schema_metadata({MOG_META: json.dumps(self.meta).encode()})


def mog_records(cfg: Any) -> VectorRecords:
    """``data.n`` exact samples of the mixture ``data.mog`` drawn with ``data.seed``.

    Labels are the components; ``meta`` holds the mixture and its true entropy (closed form for
    K = 1, Monte Carlo with its standard error for K > 1; ``data/mog.py``).
    """
    if cfg.n is None:
        raise UserInputError(
            "data.source=mog needs data.n, the number of real vectors to draw (e.g. data.n=2000)."
        )
    if cfg.n < 1:
        raise UserInputError(f"data.n must be >= 1, got {cfg.n}.")
    mix = mixture_from_config(cfg.mog)
    # Separate streams for the data and for the entropy estimate: changing mc_samples never
    # changes the data.
    x, comp = sample_mixture(mix, int(cfg.n), np.random.default_rng(derive_seed(cfg.seed, 0)))
    h = mixture_entropy(mix, mc_samples=int(cfg.mog.mc_samples), seed=derive_seed(cfg.seed, 1))
    meta = {
        **mix.to_dict(),
        "entropy_true": h.value,
        "entropy_true_stderr": h.stderr,
        "entropy_method": h.method,
        "entropy_samples": h.samples,
    }
    source = f"mog:K={mix.components},d={mix.dim}"
    return VectorRecords(
        np.arange(len(x), dtype=np.int64), x.astype(np.float32), comp, source, meta
    )


def read_mog_meta(schema_metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The ``raycollapse.mog`` metadata of a real-data table, or ``None``."""
    if not schema_metadata or MOG_META not in schema_metadata:
        return None
    return json.loads(schema_metadata[MOG_META])
