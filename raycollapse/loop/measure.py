"""The metrics row of one iteration, its sample grid and its most memorized pairs.

Definitions (docs/design.md, "KL entropy", "Generalization score", "Memorized fraction"): KL
entropy of the training set, of the whole pool and of as many generated samples as the training
set holds (the first pool ids, so the two compare); generalization score = mean distance from a
generated sample to its nearest training sample; memorized fraction = share with d1 < d2/3;
Fréchet distance to the real data per feature space; precision / recall / density / coverage
(Naeem et al. 2020) against the real data. Runs on a mixture of Gaussians (``data.source=mog``)
add ``entropy_true``, the true entropy of the mixture the real data come from (docs/design.md,
"Mixture of Gaussians"); their sample grid is a scatter plot of the real data, the training set
and the pool (first two coordinates), and their nearest pairs hold vectors instead of images.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pyarrow as pa

from raycollapse.curation.entropy import entropy_from_knn_distances
from raycollapse.curation.paradigms import lineage
from raycollapse.curation.refs import Refs
from raycollapse.data.records import encode_png
from raycollapse.data.vectors import vector_array
from raycollapse.io import storage
from raycollapse.io.embedding_stream import (
    CHUNK_BYTES,
    chunk_rows_for,
    embedding_dim,
    embedding_files,
    read_smallest_ids,
)
from raycollapse.io.grids import image_grid
from raycollapse.loop import layout
from raycollapse.loop.catalog import Catalog, Ref, origin_of
from raycollapse.loop.pool_metrics import MEMORIZED_RATIO as MEMORIZED_RATIO  # re-exported
from raycollapse.loop.pool_metrics import feature_metrics, pool_kth_distances, train_embeddings
from raycollapse.metrics.paper import paper_metrics
from raycollapse.neighbors.knn import knn_search

# Per feature space, suffixed with the space's name after the first one.
_PER_FEATURE = (
    "entropy_train", "entropy_pool", "entropy_generated", "generalization_score",
    "memorized_fraction",
)  # fmt: skip
NEAREST_PAIRS = 16
GRID_SAMPLES = 64


def iteration_metrics(
    cat: Catalog,
    iteration: int,
    train_refs: list[Ref],
    *,
    features: list[str],
    k: int,
    eps: float,
    fid_available: bool,
    paper: dict[str, Any] | None = None,
    shards: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """The metrics row of ``iteration`` (timings are added by the loop); ``paper``: the paper's
    metric variants (``metrics.paper.paper_settings``), None = none. ``shards > 1``: the kNN
    within the pool (its entropy, its PRDC radii) on that many Ray actors that read the pool's
    embedding files themselves (the same values). The pool's vectors reach the driver
    ``chunk_bytes`` at a time (whole, once, for the in-process kNN when ``shards <= 1``); see
    :mod:`raycollapse.loop.pool_metrics`."""
    gen = origin_of(iteration)
    row: dict[str, Any] = {"iteration": iteration, "train_size": len(train_refs)}
    for i, f in enumerate(features):
        suffix = "" if i == 0 else f"_{f}"
        # Pool rows are streamed from the files (loop/pool_metrics.py): never cached here.
        got = feature_metrics(
            cat, gen, train_refs, f, k=k, eps=eps, shards=shards, with_prdc=i == 0,
            chunk_bytes=chunk_bytes,
        )  # fmt: skip
        for name in _PER_FEATURE:
            row[f"{name}{suffix}"] = got[name]
        row[f"fd_{f}"] = got["fd"]
        if i == 0:
            row.update({m: got[m] for m in ("precision", "recall", "density", "coverage")})
    row["fid"] = row.get("fd_inception") if fid_available else None
    mog = cat.mog_meta()
    if mog is not None:
        row["entropy_true"] = float(mog["entropy_true"])
    if paper is not None:
        row.update(paper_metrics(paper, generated=LazyImages(cat, Refs.of_origin(gen, cat.image_ids(gen))),
                                 train=LazyImages(cat, Refs.of(train_refs)), real=cat.images("real")[1], iteration=iteration))  # fmt: skip
    # Every origin so far gets a share (0 when absent) so lineage columns line up across rows.
    row.update({f"share_{o}": 0.0 for o in ["real", *(origin_of(k) for k in range(iteration))]})
    row.update(lineage([o for o, _ in train_refs]))
    return {
        k_: (None if isinstance(v, float) and not math.isfinite(v) else v) for k_, v in row.items()
    }


def pool_entropy_sharded(uri: str, n: int, k: int, eps: float, shards: int) -> float | None:
    """KL entropy of the ``n`` rows of the embedding shards under ``uri`` on ``min(shards, n)``
    kNN shard actors that read their rows from the files (the driver gets back r_k, 8 bytes per
    row); the same r_k as in-process, so the same value up to the order of the final sum when
    the files do not hold the rows in id order."""
    if n <= k:
        return None
    d, r = pool_kth_distances(embedding_files(uri), n, [k], shards)
    return entropy_from_knn_distances(r[k], d, k, eps).entropy


def write_samples_png(cat: Catalog, iteration: int, uri: str) -> None:
    """A grid of the first generated samples of the iteration (vector data: a scatter plot of
    the real data, the training set and the pool)."""
    gen = origin_of(iteration)
    if cat.holds_vectors(gen):
        from raycollapse.loop.catalog import read_train_refs
        from raycollapse.report.scatter import scatter_png

        # The scatter shows every vector (a few floats each): the whole pool is read here.
        refs = read_train_refs(layout.iter_path(cat.run, iteration, layout.TRAIN_SET))
        png = scatter_png(
            cat.images("real")[1], cat.gather_images(refs)[0], cat.images(gen)[1],
            title=f"iteration {iteration}",
        )  # fmt: skip
        storage.write_bytes_atomic(uri, png)
        return
    from PIL import Image

    # Only the first GRID_SAMPLES images (by id) are read and decoded, not the pool.
    images, _ = cat.gather_images(Refs.of_origin(gen, cat.image_ids(gen)[:GRID_SAMPLES]))
    grid = Image.fromarray(image_grid(images))
    scale = max(1, -(-192 // max(grid.size)))  # tiny 8x8 digits stay visible
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    storage.write_bytes_atomic(uri, buf.getvalue())


def write_nearest(
    cat: Catalog, iteration: int, train_refs: Refs | list[Ref], features: str, uri: str
) -> None:
    """The generated samples closest to a training sample (smallest d1/d2), beside that sample."""
    gen = origin_of(iteration)
    train_refs = Refs.of(train_refs)
    # The training set's rows and the pool's first len(train) rows by id only, in bounded
    # chunks: never the whole pool (nor the earlier pools a training set may come from).
    files = embedding_files(cat.embeddings_uri(gen, features))
    chunk = chunk_rows_for(embedding_dim(files) or 1)
    train_x = train_embeddings(cat, train_refs, features, chunk)
    gen_ids, gen_x = read_smallest_ids(files, len(train_refs), chunk)
    nn = knn_search(train_x, gen_x, 2)
    d1, d2 = nn.distances[:, 0], nn.distances[:, 1]
    ratio = d1 / np.maximum(d2, 1e-12)
    order = np.lexsort((d1, ratio))[:NEAREST_PAIRS]
    # Only the NEAREST_PAIRS shown pairs are read and decoded, by id.
    gen_images, _ = cat.gather_images(Refs.of_origin(gen, gen_ids[order]))
    train_images, _ = cat.gather_images(train_refs[nn.indices[order, 0]])
    if gen_images.ndim == 2:  # vectors: no images to show, the vectors themselves instead
        n = len(order)
        pictures = {
            "gen_image": pa.nulls(n, pa.binary()),
            "train_image": pa.nulls(n, pa.binary()),
            "gen_vector": vector_array(gen_images),
            "train_vector": vector_array(train_images),
        }
    else:
        pictures = {
            "gen_image": pa.array([encode_png(im) for im in gen_images], pa.binary()),
            "train_image": pa.array([encode_png(im) for im in train_images], pa.binary()),
        }
    table = pa.table(
        {
            "gen_id": pa.array(gen_ids[order], pa.int64()),
            "train_id": pa.array(nn.indices[order, 0], pa.int64()),
            "d1": pa.array(d1[order], pa.float64()),
            "d2": pa.array(d2[order], pa.float64()),
            **pictures,
        }
    )
    storage.write_parquet_atomic(table, uri)


class LazyImages:
    """The images of ``refs`` for :func:`~raycollapse.metrics.paper.paper_metrics`, read only
    when indexed (a slice or an integer array: those rows, :meth:`Catalog.gather_images`), so
    the metric reads the first pool images and the training subset it uses, not the pool."""

    def __init__(self, cat: Catalog, refs: Refs) -> None:
        self.cat, self.refs = cat, refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        return self.cat.gather_images(self.refs[key])[0]


def nearest_uri(run: str, iteration: int) -> str:
    return layout.iter_path(run, iteration, layout.NEAREST)
