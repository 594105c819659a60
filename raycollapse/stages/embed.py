"""Embedding stage: image pools -> Parquet shards of embeddings, on a Ray Data actor pool.

Two levels, both built on ``features.extractors`` (which holds all the model code):

- ``EmbedStage``: the batch-level stage, ``{"id", "image"} -> {"id", "embedding"}``; the model
  is built once per worker in ``setup``. Usable in any Ray Data pipeline and callable without Ray.
- ``embed_pool``: the shard-level driver. One output shard per input shard, with the same file
  name (``part-00007.parquet`` -> ``OUT/part-00007.parquet``), each written atomically by the actor
  that embedded it. Ray Data maps an ``EmbedShardStage`` over a dataset of shard descriptions
  (``batch_size=1``), so the unit of scheduling and of retry is a shard: a restarted actor
  rewrites the same file, and re-running the command skips the shards already complete.

Output columns: ``id`` (int64), ``embedding`` (``fixed_size_list<float32|float16>[dim]``) and
``label`` when the input has one. The Parquet schema metadata holds ``raycollapse.features``,
``raycollapse.dim`` and ``raycollapse.embedding`` (JSON: everything that determines the vectors),
which is how resume recognises a complete shard and refuses to mix two feature spaces in one
folder.

Errors: weights and resources are checked on the driver before any work. Errors inside an actor
(a corrupt image, weights that do not fit the model) come back as a row with an ``error`` field
instead of an exception, because Ray Data loses the exception type on the way (a model-load
failure surfaces as ``ActorDiedError`` after init retries); the driver re-raises the first one
as ``UserInputError`` naming the shard, and every shard finished before it stays on disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raycollapse.config import FeaturesConfig, plain_section
from raycollapse.errors import UserInputError
from raycollapse.features.extractors import Extractor, extractor_from_config
from raycollapse.features.weights import ResolvedWeights, check_weights_available
from raycollapse.io import storage
from raycollapse.io.images import decode_image
from raycollapse.stages.base import (
    Batch,
    Stage,
    check_resources,
    map_stage,
    shard_is_complete,
    shard_scheduling,
    worker_device,
)
from raycollapse.stages.embed_inputs import SHARD_ROWS, ShardTask, iter_shard, plan_shards
from raycollapse.stages.runtime import ensure_ray

META_FEATURES = b"raycollapse.features"
META_DIM = b"raycollapse.dim"
META_SIGNATURE = b"raycollapse.embedding"


# ---------------------------------------------------------------------------------------------
# Helpers shared by both stages


def features_dict(features: Any, batch_size: int | None = None) -> dict[str, Any]:
    """A plain dict of a ``features`` section (DictConfig, dataclass or dict) over the defaults.

    Plain data travels to the actors; a DictConfig would drag OmegaConf's struct flags along.
    """
    out = plain_section(features, FeaturesConfig)
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


def images_from_column(values: Any, *, name: str = "") -> list[np.ndarray]:
    """An ``image`` column (encoded bytes, or arrays) -> a list of uint8 ``H x W x C`` arrays."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        arr = values if values.ndim == 4 else values[..., None]
        return list(arr)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes | bytearray):
            out.append(decode_image(bytes(v), name=f"{name} row {i}"))
        elif v is None:
            raise UserInputError(
                f"{name} row {i}: the image is null; drop the row or regenerate the pool."
            )
        else:
            arr = np.asarray(v)
            out.append(arr if arr.ndim == 3 else arr[..., None])
    return out


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


# ---------------------------------------------------------------------------------------------
# The batch-level stage


@dataclass
class EmbedStage(Stage):
    """``process_batch({"id", "image"}) -> {"id", "embedding"}`` with the configured extractor."""

    name: str = "embed"
    features: dict[str, Any] = field(default_factory=lambda: features_dict(None))

    def setup(self) -> None:
        self.extractor = extractor_from_config(
            self.features,
            device=worker_device(self.num_gpus, "embed", "resources.embed_gpus_per_actor"),
        )

    def process_batch(self, batch: Batch) -> Batch:
        if "image" not in batch:
            raise UserInputError(
                f"embed: the batch has no 'image' column (it has: {', '.join(batch)})."
            )
        images = images_from_column(batch["image"], name="batch")
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
class EmbedShardStage(EmbedStage):
    """Ray Data stage over shard descriptions: reads, embeds and writes one shard per row.

    ``process_batch`` returns ``{"shard", "rows", "seconds", "node_id", "error"}``; it never
    raises for user errors (see the module docstring), and neither does ``setup``: a failed model
    load is reported on every shard this actor is given, so the driver fails in seconds.
    """

    signature: dict[str, Any] = field(default_factory=dict)
    image_column: str = "image"

    def setup(self) -> None:
        self._setup_error: str | None = None
        try:
            super().setup()
        except Exception as exc:  # noqa: BLE001 - reported per shard, re-raised by the driver
            self._setup_error = f"{type(exc).__name__}: {exc}"

    def process_shard(self, task: ShardTask) -> int:
        """Embed one shard and write it atomically; returns its row count."""
        batch_size = int(self.features["batch_size"])
        ids_parts, emb_parts, label_parts = [], [], []
        for ids, images, labels in iter_shard(task, batch_size, self.image_column):
            ids_parts.append(ids)
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

    def process_batch(self, batch: Batch) -> Batch:
        # which node did the work (tests check that shards spread); "" when called without Ray
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        rows: dict[str, list] = {
            "shard": [],
            "rows": [],
            "seconds": [],
            "node_id": [],
            "error": [],
            "user_error": [],
        }
        for i in range(len(batch["out"])):
            task = ShardTask.from_batch(batch, i)
            start = time.perf_counter()
            n, error, user = 0, "", True
            if self._setup_error:
                error = self._setup_error
                user = self._setup_error.startswith(UserInputError.__name__)
            else:
                try:
                    n = self.process_shard(task)
                except UserInputError as exc:
                    error = str(exc)
            rows["shard"].append(task.out)
            rows["rows"].append(n)
            rows["seconds"].append(time.perf_counter() - start)
            rows["node_id"].append(node)
            rows["error"].append(error)
            rows["user_error"].append(user)
        return {k: np.asarray(v) for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# The driver


def embed_pool(
    input_uri: str | Path,
    out_uri: str | Path,
    features_cfg: Any = None,
    *,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int | None = None,
    shard_rows: int = SHARD_ROWS,
    image_column: str = "image",
) -> dict[str, Any]:
    """Embed every shard of ``input_uri`` into ``out_uri`` (same shard names); resume-safe.

    Returns metrics: features, dim, rows, shards, shards_embedded, shards_skipped, rows_embedded,
    seconds, images_per_second (rows embedded / wall seconds of the Ray part), actors, nodes
    (distinct nodes that embedded a shard) and node_ids.
    """
    start = time.perf_counter()
    features = features_dict(features_cfg, batch_size)
    weights = resolve_weights(features)  # before any work: a missing file fails here, in seconds
    sig = signature(features, weights)
    ensure_ray()
    stage = EmbedShardStage(
        num_cpus=float(cpus_per_actor), num_gpus=float(gpus_per_actor),
        features=features, signature=sig, image_column=image_column,
    )  # fmt: skip
    check_resources(stage, int(actors))
    tasks = plan_shards(
        str(input_uri), str(out_uri), shard_rows=shard_rows, image_column=image_column
    )
    todo = [
        t for t in tasks
        if not shard_is_complete(
            t.out, t.rows, sig, META_SIGNATURE, "different embeddings",
            "Pass another --out, or delete that folder to recompute.",
        )
    ]  # fmt: skip
    results: list[dict[str, Any]] = []
    run_start = time.perf_counter()
    n_actors = max(1, min(int(actors), len(todo)))
    if todo:
        storage.makedirs(out_uri)
        with shard_scheduling():
            ds = ray.data.from_items([t.to_item() for t in todo], override_num_blocks=len(todo))
            out = map_stage(ds, stage, actors=n_actors, batch_size=1)
            for row in out.iter_rows():
                if row["error"]:
                    cls = UserInputError if row["user_error"] else RuntimeError
                    raise cls(f"embedding shard '{row['shard']}' failed: {row['error']}")
                results.append(row)
    run_seconds = time.perf_counter() - run_start
    embedded = sum(int(r["rows"]) for r in results)
    node_ids = sorted({str(r["node_id"]) for r in results})
    return {
        "features": features["name"],
        "pretrained": weights.describe(),
        "dim": _read_dim(tasks[0].out) if tasks else None,
        "rows": sum(t.rows for t in tasks),
        "shards": len(tasks),
        "shards_embedded": len(results),
        "shards_skipped": len(tasks) - len(todo),
        "rows_embedded": embedded,
        "seconds": time.perf_counter() - start,
        "images_per_second": embedded / run_seconds if embedded and run_seconds > 0 else 0.0,
        "actors": n_actors if todo else 0,
        "nodes": len(node_ids),
        "node_ids": node_ids,
        "out": str(out_uri),
    }


def _read_dim(uri: str) -> int | None:
    fs, path = storage.open_fs(uri)
    try:
        meta = pq.read_metadata(path, filesystem=fs).schema.to_arrow_schema().metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    return int(meta[META_DIM]) if META_DIM in meta else None
