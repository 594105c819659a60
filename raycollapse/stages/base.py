"""The one stage contract, and the thin adapter that runs any stage on Ray Data.

A stage (like NeMo Curator's ``ProcessingStage``):

- declares its resources per worker (``num_cpus``, ``num_gpus``);
- loads its model once per worker in ``setup()``;
- does its work in ``process_batch(batch) -> batch``, a plain function of numpy columns that
  tests call without Ray.

``map_stage`` turns a stage into ``Dataset.map_batches`` over an actor pool. Stages that write
files work shard by shard (``process_shard``), each shard to a deterministic name written
atomically, so a retried task or a restarted actor rewrites the same file: no row is lost or
duplicated.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raycollapse.errors import UserInputError
from raycollapse.io import storage

Batch = dict[str, np.ndarray]


@dataclass
class Stage(ABC):
    """Base class: subclasses set ``name`` and override ``setup`` / ``process_batch``."""

    name: str = "stage"
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def setup(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Load models and other per-worker state. Called once per worker, before any batch."""

    @abstractmethod
    def process_batch(self, batch: Batch) -> Batch:
        """Transform one batch of numpy columns; pure apart from the state built in ``setup``."""


class _StageWorker:
    """The callable class Ray Data instantiates once per actor: setup once, then batches."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch: Batch) -> Batch:
        return self.stage.process_batch(batch)


def worker_device(num_gpus: float, stage: str, config_key: str) -> str:
    """CUDA when Ray gave this actor a GPU; a GPU request without CUDA is an error, never the CPU."""
    if num_gpus <= 0:
        return "cpu"
    import os

    import torch

    if not torch.cuda.is_available():
        raise UserInputError(
            f"the {stage} actor was given {num_gpus:g} GPU by Ray (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but torch sees no CUDA device; install a "
            f"CUDA build of torch on the workers, or set {config_key}=0 to run on CPUs."
        )
    return "cuda"


def check_resources(stage: Stage | Any, actors: int) -> None:
    """Fail fast (instead of waiting forever) when the cluster can never place the actors.

    Checks the running cluster: one actor's CPUs and GPUs must fit on some node, and all actors
    together must fit in the cluster's totals. ``stage``: anything with ``name``, ``num_cpus`` and
    ``num_gpus`` (a Stage, or the resource declaration of plain actors).
    """
    if actors < 1:
        raise UserInputError(f"{stage.name}: actors must be >= 1, got {actors}.")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    for resource, need in (("GPU", stage.num_gpus), ("CPU", stage.num_cpus)):
        if need <= 0:
            continue
        best = max((r.get(resource, 0.0) for r in per_node), default=0.0)
        total = sum(r.get(resource, 0.0) for r in per_node)
        if need > best:
            raise UserInputError(
                f"{stage.name}: each actor asks for {need:g} {resource} but the largest node has "
                f"{best:g}; lower the per-actor {resource} request or add bigger nodes."
            )
        if need * actors > total:
            raise UserInputError(
                f"{stage.name}: {actors} actors x {need:g} {resource} = {need * actors:g} {resource}, "
                f"but the cluster has {total:g}; use fewer actors or add nodes."
            )


def map_stage(
    ds: ray.data.Dataset,
    stage: Stage,
    *,
    actors: int,
    batch_size: int | None = None,
    **map_kwargs: Any,
) -> ray.data.Dataset:
    """Run ``stage`` over ``ds`` with an actor pool of ``actors`` workers."""
    check_resources(stage, actors)
    return ds.map_batches(
        _StageWorker,
        fn_constructor_args=(stage,),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus,
        **map_kwargs,
    )


@contextlib.contextmanager
def shard_scheduling() -> Iterator[None]:
    """Ray Data settings for shard-sized tasks, restored afterwards.

    One shard in flight per actor (a queue behind a busy actor leaves others idle at the end);
    wait for the whole pool before dispatching (else the first actor to load its model takes
    most shards); progress bars on. ``ray.data.from_items`` copies the current DataContext.
    """
    ctx = ray.data.DataContext.get_current()
    wanted = {
        "max_tasks_in_flight_per_actor": 1,
        "wait_for_min_actors_s": 600,
        "enable_progress_bars": True,
    }
    saved = {k: getattr(ctx, k) for k in wanted}
    for k, v in wanted.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def shard_is_complete(
    uri: str, rows: int, signature: dict[str, Any], meta_key: bytes, what: str, fix: str
) -> bool:
    """True when ``uri`` is a complete shard made with ``signature`` (resume skips it).

    A shard written by something else (another signature under ``meta_key``) is refused with
    ``fix`` rather than silently mixed in; an unreadable leftover is made again (writes are
    atomic, so this is rare).
    """
    if not storage.exists(uri):
        return False
    fs, path = storage.open_fs(uri)
    try:
        md = pq.read_metadata(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError):
        return False
    meta = md.schema.to_arrow_schema().metadata or {}
    try:
        found = json.loads(meta.get(meta_key, b"{}").decode())
    except json.JSONDecodeError:
        found = {}
    if found != signature:
        raise UserInputError(
            f"'{uri}' already holds {what} ({found or 'not written by raycollapse'}); "
            f"this run makes {signature}. {fix}"
        )
    return md.num_rows == rows
