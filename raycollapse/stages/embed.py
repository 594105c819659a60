"""Embedding stage: image pools -> Parquet shards of embeddings, on a Ray Data actor pool.

Two levels, both built on ``features.extractors`` (which holds all the model code):

- ``EmbedStage``: the batch-level stage, ``{"id", "image"} -> {"id", "embedding"}``; the model
  is built once per worker in ``setup``. Usable in any Ray Data pipeline and callable without Ray.
- ``EmbedShardStage`` / ``embed_pool``: the shard job (``stages.shard_job``). One output shard per
  input shard, with the same file name (``part-00007.parquet`` -> ``OUT/part-00007.parquet``),
  each written atomically by the actor that embedded it; the shard-job runner handles resume,
  scheduling, retries and errors as for generation.

Vector shards (a ``vector`` column, ``data/vectors.py``) have one feature space, ``pixel``: the
embedding of a vector is its raw values (:func:`vector_features`); other spaces are refused.

Output columns: ``id`` (int64), ``embedding`` (``fixed_size_list<float32|float16>[dim]``) and
``label`` when the input has one. The Parquet schema metadata holds ``raycollapse.features``,
``raycollapse.dim`` and ``raycollapse.embedding`` (JSON: everything that determines the vectors),
which is how resume recognises a complete shard and refuses to mix two feature spaces in one
folder.

Errors: weights and resources are checked on the driver before any work. A user error inside an
actor (a corrupt image, weights that do not fit the model) is raised on the driver as
``UserInputError`` naming the shard, and every shard finished before it stays on disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.config import FeaturesConfig, to_dict
from raycollapse.errors import UserInputError
from raycollapse.features.extractors import Extractor, extractor_from_config
from raycollapse.features.weights import ResolvedWeights, check_weights_available
from raycollapse.io import storage
from raycollapse.io.images import decode_column
from raycollapse.stages.base import Batch, Resources, Stage, check_resources, worker_device
from raycollapse.stages.embed_inputs import SHARD_ROWS, ShardTask, iter_shard, plan_shards
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.shard_job import ShardJob, ShardStage, run_shard_job

META_FEATURES = b"raycollapse.features"
META_DIM = b"raycollapse.dim"
META_SIGNATURE = b"raycollapse.embedding"


# ---------------------------------------------------------------------------------------------
# Helpers shared by both stages


def features_dict(features: Any, batch_size: int | None = None) -> dict[str, Any]:
    """A plain dict of a ``features`` section (DictConfig, dataclass or dict) over the defaults.

    Plain data travels to the actors; a DictConfig would drag OmegaConf's struct flags along.
    """
    out = to_dict(features, FeaturesConfig)
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    if int(out["batch_size"]) < 1:
        raise UserInputError(f"features.batch_size must be >= 1, got {out['batch_size']}.")
    return out


def resolve_weights(features: dict[str, Any]) -> ResolvedWeights:
    """``check_weights_available`` for a features dict (the driver calls it before any work)."""
    return check_weights_available(
        features["name"],
        features.get("pretrained"),
        clip_model=features["clip_model"],
        dinov2_model=features["dinov2_model"],
    )


def signature(features: dict[str, Any], weights: ResolvedWeights) -> dict[str, Any]:
    """Everything that determines the embedding vectors; stored in and compared with each shard."""
    sig: dict[str, Any] = {
        "features": features["name"],
        "model": weights.model,
        "pretrained": weights.describe(),
        "dtype": features["dtype"],
        "normalize": bool(features["normalize"]),
    }
    if features["name"] == "dinov2":
        sig["image_size"] = int(features["dinov2_image_size"])
    return sig


def embed_images(extractor: Extractor, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Embed a list of images in mini-batches; images of different sizes are grouped by shape."""
    if not images:
        dim = extractor.dim or 0
        return np.zeros((0, dim), dtype=extractor.dtype)
    shapes = [im.shape for im in images]
    if len(set(shapes)) == 1:
        stacked = np.stack(images)
        parts = [extractor(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)]
        return np.concatenate(parts)
    results: list[np.ndarray | None] = [None] * len(images)
    for shape in dict.fromkeys(shapes):
        idx = [i for i, s in enumerate(shapes) if s == shape]
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            for i, vec in zip(chunk, extractor(np.stack([images[i] for i in chunk])), strict=True):
                results[i] = vec
    dims = {r.shape for r in results if r is not None}
    if len(dims) > 1:
        raise UserInputError(
            f"images differ in size ({', '.join(str(s) for s in dict.fromkeys(shapes))}), so their "
            f"{extractor.name} features differ in dimension; resize them to one size or use a model extractor."
        )
    return np.stack(results)  # type: ignore[arg-type]


def vector_features(vectors: np.ndarray, features: dict[str, Any]) -> np.ndarray:
    """Feature space ``pixel`` of vector data: the raw values (L2-normalised if asked), in the
    embedding dtype (docs/design.md, "Mixture of Gaussians")."""
    feats = np.asarray(vectors, dtype=np.float32)
    if features["normalize"]:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), np.float32(1e-12))
    return feats.astype(features["dtype"], copy=False)


def check_vector_features(tasks: list[ShardTask], name: str) -> None:
    """Vector data have one feature space, ``pixel`` (the raw values): refuse any other."""
    if name != "pixel" and any(t.vectors for t in tasks):
        raise UserInputError(
            f"the input holds vectors (a 'vector' column), which have no {name} features: the "
            "feature space of vector data is pixel (the raw values). Set features.name=pixel and "
            "loop.metric_features=[pixel]."
        )


# ---------------------------------------------------------------------------------------------
# The batch-level stage


def build_extractor(features: dict[str, Any], num_gpus: float) -> Extractor:
    """The configured extractor on this worker's device (CUDA when Ray gave it a GPU)."""
    device = worker_device(num_gpus, "embed", "resources.embed_gpus_per_actor")
    return extractor_from_config(features, device=device)


@dataclass
class EmbedStage(Stage):
    """``process_batch({"image"[, "id"]}) -> {"embedding"[, "id"]}`` with the configured extractor."""

    name: str = "embed"
    features: dict[str, Any] = field(default_factory=lambda: features_dict(None))

    def inputs(self) -> tuple[str, ...]:
        return ("image",)

    def outputs(self) -> tuple[str, ...]:
        return ("embedding",)

    def setup(self) -> None:
        self.extractor = build_extractor(self.features, self.resources.num_gpus)

    def process_batch(self, batch: Batch) -> Batch:
        images = decode_column(batch["image"], name="batch")
        out: Batch = {
            "embedding": embed_images(self.extractor, images, int(self.features["batch_size"]))
        }
        if "id" in batch:
            out = {"id": np.asarray(batch["id"], dtype=np.int64), **out}
        return out


def embeddings_table(
    ids: np.ndarray, emb: np.ndarray, labels: pa.Array | None, meta: dict[bytes, bytes]
) -> pa.Table:
    """``id``, ``embedding`` (fixed_size_list of the embedding dtype), optional ``label``, + metadata."""
    dim = emb.shape[1] if emb.ndim == 2 else 0
    values = pa.array(np.ascontiguousarray(emb).reshape(-1))
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
    }
    if labels is not None:
        cols["label"] = labels.cast(pa.int64())
    return pa.table(cols).replace_schema_metadata({**meta, META_DIM: str(dim).encode()})


@dataclass
class EmbedShardStage(ShardStage):
    """Shard stage over :class:`ShardTask` rows: reads, embeds and writes one shard per row."""

    META_KEY = META_SIGNATURE
    HOLDS = "different embeddings"
    FIX = "Pass another --out, or delete that folder to recompute."

    name: str = "embed"
    features: dict[str, Any] = field(default_factory=lambda: features_dict(None))
    image_column: str = "image"

    def inputs(self) -> tuple[str, ...]:
        return ShardTask.columns()

    def setup(self) -> None:
        self.extractor = build_extractor(self.features, self.resources.num_gpus)

    def shard_out(self, spec: dict[str, Any]) -> str:
        return str(spec["out"])

    def shard_rows(self, spec: dict[str, Any]) -> int:
        return int(spec["stop"]) - int(spec["start"])

    def process_shard(self, spec: dict[str, Any]) -> int:
        """Embed one shard and write it atomically; returns its row count."""
        task = ShardTask.from_spec(spec)
        batch_size = int(self.features["batch_size"])
        ids_parts, emb_parts, label_parts = [], [], []
        for ids, images, labels in iter_shard(task, batch_size, self.image_column):
            ids_parts.append(ids)
            if task.vectors:
                emb_parts.append(vector_features(images, self.features))
            else:
                emb_parts.append(embed_images(self.extractor, images, batch_size))
            if labels is not None:
                label_parts.append(labels)
        if emb_parts and len({p.shape[1] for p in emb_parts}) > 1:
            raise UserInputError(
                f"images in '{task.source}' differ in size, so their {self.features['name']} features differ "
                "in dimension; resize them to one size or use a model extractor (clip, dinov2, inception)."
            )
        dim = emb_parts[0].shape[1] if emb_parts else (self.extractor.dim or 0)
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        emb = np.concatenate(emb_parts) if emb_parts else np.zeros((0, dim), self.extractor.dtype)
        labels = pa.concat_arrays(label_parts) if task.has_label and label_parts else None
        meta = {
            META_FEATURES: str(self.features["name"]).encode(),
            META_SIGNATURE: json.dumps(self.signature, sort_keys=True).encode(),
        }
        storage.write_parquet_atomic(embeddings_table(ids, emb, labels, meta), task.out)
        return len(ids)


# ---------------------------------------------------------------------------------------------
# The driver


def plan_embedding(
    input_uri: str | Path,
    out_uri: str | Path,
    features_cfg: FeaturesConfig | Mapping[str, Any] | None = None,
    *,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int | None = None,
    shard_rows: int = SHARD_ROWS,
    image_column: str = "image",
) -> ShardJob:
    """The shard job that embeds INPUT (see :func:`embed_pool`); weights, resources and every
    input shard are checked here, before any Ray work."""
    features = features_dict(features_cfg, batch_size)
    weights = resolve_weights(features)  # before any work: a missing file fails here, in seconds
    ensure_ray()
    stage = EmbedShardStage(
        resources=Resources(num_cpus=float(cpus_per_actor), num_gpus=float(gpus_per_actor)),
        features=features, signature=signature(features, weights), image_column=image_column,
    )  # fmt: skip
    check_resources(stage.resources, int(actors), stage.name)
    tasks = plan_shards(
        str(input_uri), str(out_uri), shard_rows=shard_rows, image_column=image_column
    )
    check_vector_features(tasks, str(features["name"]))
    return ShardJob(stage, [t.to_item() for t in tasks], str(out_uri), int(actors))


def embed_pool(
    input_uri: str | Path,
    out_uri: str | Path,
    features_cfg: FeaturesConfig | Mapping[str, Any] | None = None,
    *,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int | None = None,
    shard_rows: int = SHARD_ROWS,
    image_column: str = "image",
) -> dict[str, Any]:
    """Embed every shard of ``input_uri`` into ``out_uri`` (same shard names); resume-safe.

    Returns metrics: features, pretrained, dim, rows, shards, shards_embedded, shards_skipped,
    rows_embedded, seconds, images_per_second (rows embedded / wall seconds of the Ray part),
    shard_seconds, actors, nodes (distinct nodes that embedded a shard), node_ids,
    stage_retries, out.
    """
    start = time.perf_counter()
    job = plan_embedding(
        input_uri, out_uri, features_cfg, actors=actors, gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor, batch_size=batch_size, shard_rows=shard_rows,
        image_column=image_column,
    )  # fmt: skip
    result = run_shard_job(job)
    sig = job.stage.signature
    return {
        "features": sig["features"],
        "pretrained": sig["pretrained"],
        "dim": _read_dim(job.specs[0]["out"]) if job.specs else None,
        "rows": sum(job.stage.shard_rows(s) for s in job.specs),
        **result.metrics("embedded", start),
        "out": str(out_uri),
    }


def _read_dim(uri: str) -> int | None:
    fs, path = storage.open_fs(uri)
    try:
        meta = pq.read_metadata(path, filesystem=fs).schema.to_arrow_schema().metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    return int(meta[META_DIM]) if META_DIM in meta else None
