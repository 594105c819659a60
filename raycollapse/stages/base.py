"""The one stage contract, and the thin adapter that runs any stage on Ray Data.

A stage (like NeMo Curator's ``ProcessingStage``):

- declares its resources per worker (:class:`Resources`) and the columns it reads and writes
  (``inputs()`` / ``outputs()``; the adapter checks the input before any work, and every
  returned batch);
- loads its model once per worker in ``setup()``;
- does its work in ``process_batch(batch) -> batch``, a plain function of numpy columns that
  tests call without Ray.

``map_stage`` turns a stage into ``Dataset.map_batches`` over an actor pool. Stages that write
files work shard by shard (``stages.shard_job``), which is also how their user errors reach the
driver: Ray Data drops the cause of a failed batch on its way to the driver, so a
``UserInputError`` raised in a ``map_batches`` worker arrives as ``UserCodeException`` with only a
traceback string.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import ray

from raycollapse.errors import UserInputError

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Resources:
    """What one worker (actor, Ray Train worker) asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class Stage(ABC):
    """Base class: subclasses set ``name``, declare their columns and override ``process_batch``."""

    name: str = "stage"
    resources: Resources = Resources()

    def inputs(self) -> tuple[str, ...]:
        """The columns every batch must have."""
        return ()

    def outputs(self) -> tuple[str, ...]:
        """The columns every returned batch has."""
        return ()

    def setup(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Load models and other per-worker state. Called once per worker, before any batch."""

    @abstractmethod
    def process_batch(self, batch: Batch) -> Batch:
        """Transform one batch of numpy columns; pure apart from the state built in ``setup``."""

    def setup_failed(self, error: Exception, batch: Batch) -> Batch:
        """What a worker whose ``setup`` raised ``error`` returns for ``batch``: by default it
        raises ``error`` (the Ray Data job fails with it)."""
        raise error


def check_inputs(stage: Stage, columns: Iterable[str]) -> None:
    """Refuse input ``columns`` that lack one the stage reads: a UserInputError naming it."""
    have = list(columns)
    missing = [c for c in stage.inputs() if c not in have]
    if missing:
        raise UserInputError(
            f"{stage.name}: the input has no column {', '.join(repr(c) for c in missing)} "
            f"(it has: {', '.join(have) or 'no columns'}); {stage.name} reads "
            f"{', '.join(stage.inputs())}."
        )


class _StageWorker:
    """The callable class Ray Data instantiates once per actor: setup once, then batches.

    A failed ``setup`` is kept and handed to ``stage.setup_failed`` with each batch instead of
    being raised from ``__init__``: raised there, Ray Data retries the actor's start and then
    fails with ``ActorDiedError``, which reads as a lost actor instead of the user's error.
    A returned batch lacking a declared output column is the stage's bug (RuntimeError).
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.setup_error: Exception | None = None
        try:
            self.stage.setup()
        except Exception as exc:  # noqa: BLE001 - handed to setup_failed, see above
            self.setup_error = exc

    def __call__(self, batch: Batch) -> Batch:
        if self.setup_error is not None:
            out = self.stage.setup_failed(self.setup_error, batch)
        else:
            out = self.stage.process_batch(batch)
        missing = [c for c in self.stage.outputs() if c not in out]
        if missing:
            raise RuntimeError(
                f"{self.stage.name} returned no column {missing} (it has {list(out)})."
            )
        return out


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


def check_resources(resources: Resources, count: int, name: str) -> None:
    """Fail fast (instead of waiting forever) when the cluster can never place ``count`` workers.

    Checks the running cluster: one worker's CPUs and GPUs must fit on some node, and all
    workers together must fit in the cluster's totals. ``name`` starts the messages.
    """
    if count < 0:
        raise UserInputError(f"{name}: actors must be >= 0, got {count}.")
    if count == 0:  # the calling process runs it (a GPU there is checked by worker_device)
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    for resource, need in (("GPU", resources.num_gpus), ("CPU", resources.num_cpus)):
        if need <= 0:
            continue
        best = max((r.get(resource, 0.0) for r in per_node), default=0.0)
        total = sum(r.get(resource, 0.0) for r in per_node)
        if need > best:
            raise UserInputError(
                f"{name}: each actor asks for {need:g} {resource} but the largest node has "
                f"{best:g}; lower the per-actor {resource} request or add bigger nodes."
            )
        if need * count > total:
            raise UserInputError(
                f"{name}: {count} actors x {need:g} {resource} = {need * count:g} {resource}, "
                f"but the cluster has {total:g}; use fewer actors or add nodes."
            )


def map_stage(
    ds: ray.data.Dataset,
    stage: Stage,
    *,
    actors: int,
    min_actors: int | None = None,
    batch_size: int | None = None,
) -> ray.data.Dataset:
    """Run ``stage`` over ``ds`` with an actor pool of ``actors`` workers (``min_actors``: start
    with that many, up to ``actors``; default all).

    Checks first, on the driver: the dataset has the stage's input columns, the cluster can
    place the actors.
    """
    check_inputs(stage, ds.schema().names)
    check_resources(stage.resources, actors, stage.name)
    return ds.map_batches(
        _StageWorker,
        fn_constructor_args=(stage,),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_actors or actors, max_size=actors),
        num_cpus=stage.resources.num_cpus,
        num_gpus=stage.resources.num_gpus,
    )
