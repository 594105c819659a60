"""The shard-job runner: a stage that writes one output file per shard, on a Ray Data actor pool.

Generation and embedding are shard jobs. Each is a :class:`ShardStage` (what one shard computes
and where it goes) plus a list of shard specs (one plain row each); :func:`run_shard_job` does
the rest, the same way for both:

- resume: a shard whose output is complete and carries the stage's signature is skipped
  (:func:`shard_is_complete`); another signature is refused, a truncated file is redone;
- scheduling: ``batch_size=1`` (a shard is the unit of scheduling and of retry), one shard in
  flight per actor, the whole pool up before dispatching (:func:`shard_scheduling`);
- status: each shard comes back as a :class:`ShardStatus` row (shard, rows, seconds, node id,
  error);
- errors: a ``UserInputError`` in ``setup`` or in a shard comes back as the ``error`` of its
  status (Ray Data would drop the exception's type and message on the way to the driver) and is
  raised on the driver with the user's message, once; shards finished before it stay on disk;
- in process: ``actors=0`` runs the shards in the calling process instead (no Ray Data, no actor
  start-up: for pools of seconds, the MoG laboratory), with the same files as a result;
- retries: an actor lost for good (``ray.kill`` without restart, a lost node) fails the Ray Data
  job with ``RayActorError``; the runner then runs the job again for the shards not yet on disk,
  ``STAGE_RETRIES`` times at most. Actors that crash are restarted by Ray Data itself (its pool
  sets ``max_restarts=-1``, ``max_task_retries=-1``) and their shard recomputed. Each shard is
  written atomically under a deterministic name, so either way every row is written once.

See docs/design.md, "Stage contract".
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.stages.base import Batch, Resources, Stage, check_inputs, map_stage

logger = logging.getLogger(__name__)

# whole-job re-runs after an actor is lost for good (each redoes only the missing shards)
STAGE_RETRIES = 3


@dataclass(frozen=True)
class ShardStatus:
    """What a worker reports for one shard: its output URI, rows, seconds, Ray node and
    ``error``, the user's message of a ``UserInputError`` that stopped it ("" when written)."""

    shard: str
    rows: int
    seconds: float
    node_id: str
    error: str = ""

    @staticmethod
    def columns() -> tuple[str, ...]:
        return tuple(f.name for f in fields(ShardStatus))

    @staticmethod
    def encode(statuses: list[ShardStatus]) -> Batch:
        """Statuses as a batch of numpy columns (what a Ray Data worker returns)."""
        return {k: np.asarray([getattr(s, k) for s in statuses]) for k in ShardStatus.columns()}

    @staticmethod
    def decode(row: dict[str, Any]) -> ShardStatus:
        """One row of the job's output back into a status."""
        return ShardStatus(str(row["shard"]), int(row["rows"]), float(row["seconds"]),
                           str(row["node_id"]), str(row["error"]))  # fmt: skip


@dataclass
class ShardStage(Stage):
    """A stage over shard specs: each input row names one shard, which it writes atomically.

    Subclasses declare ``inputs()`` (the columns of a spec), ``META_KEY`` / ``HOLDS`` / ``FIX``
    (the Parquet metadata key holding ``signature``, and the words of the refusal when a shard
    holds another signature), and implement ``shard_out``, ``shard_rows`` and
    ``process_shard``. ``signature``: everything that determines the output, stored in each shard.
    """

    META_KEY: ClassVar[bytes]
    HOLDS: ClassVar[str]
    FIX: ClassVar[str]

    signature: dict[str, Any] = field(default_factory=dict)

    def outputs(self) -> tuple[str, ...]:
        return ShardStatus.columns()

    @abstractmethod
    def shard_out(self, spec: dict[str, Any]) -> str:
        """The URI the shard of ``spec`` is written to (deterministic)."""

    @abstractmethod
    def shard_rows(self, spec: dict[str, Any]) -> int:
        """How many rows the complete shard of ``spec`` holds."""

    @abstractmethod
    def process_shard(self, spec: dict[str, Any]) -> int:
        """Compute and write the shard of ``spec`` atomically; its row count."""

    def process_batch(self, batch: Batch) -> Batch:
        """Write the shard of every row of ``batch``; their :class:`ShardStatus` columns.

        A UserInputError becomes the shard's ``error`` (naming the shard), not an exception:
        Ray Data would drop its type and message on the way to the driver.
        """
        statuses = []
        for spec in _specs(self, batch):
            start = time.perf_counter()
            rows, error = 0, ""
            try:
                rows = self.process_shard(spec)
            except UserInputError as exc:
                error = f"{self.name} shard '{self.shard_out(spec)}' failed: {exc}"
            statuses.append(
                ShardStatus(self.shard_out(spec), rows, time.perf_counter() - start, _node(), error)
            )
        return ShardStatus.encode(statuses)

    def setup_failed(self, error: Exception, batch: Batch) -> Batch:
        """A UserInputError in ``setup`` is every shard's ``error``, with the user's message
        alone; any other error is raised (the job fails with it)."""
        if not isinstance(error, UserInputError):
            raise error
        statuses = [ShardStatus(self.shard_out(s), 0, 0.0, _node(), str(error))
                    for s in _specs(self, batch)]  # fmt: skip
        return ShardStatus.encode(statuses)


def _specs(stage: ShardStage, batch: Batch) -> list[dict[str, Any]]:
    """The shard specs in a batch (one per row)."""
    n = len(batch[stage.inputs()[0]])
    return [{k: batch[k][i] for k in stage.inputs()} for i in range(n)]


def _node() -> str:
    """The Ray node of this worker (tests check that shards spread); "" without Ray."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


@dataclass
class ShardJob:
    """A stage, its shard specs (plain rows), where the shards go and how many actors to use."""

    stage: ShardStage
    specs: list[dict[str, Any]]
    out: str
    actors: int


@dataclass
class ShardJobResult:
    """What :func:`run_shard_job` did: shards planned, skipped (complete), written, and how."""

    shards: int
    shards_written: int
    shards_skipped: int
    rows_written: int
    statuses: list[ShardStatus]
    actors: int
    stage_retries: int
    run_seconds: float

    @property
    def node_ids(self) -> list[str]:
        """The distinct Ray nodes that wrote a shard, sorted."""
        return sorted({s.node_id for s in self.statuses})

    def metrics(self, written: str, started: float) -> dict[str, Any]:
        """The metrics dict: ``shards_{written}`` / ``rows_{written}`` (e.g. "generated"),
        ``seconds`` since ``started`` (a ``time.perf_counter()``), ``images_per_second`` (rows
        written / wall seconds of the Ray part, actor start-up included), ``shard_seconds``
        (time in the workers' shard functions, summed), actors, nodes, node_ids, stage_retries."""
        rows, run = self.rows_written, self.run_seconds
        return {
            "shards": self.shards,
            f"shards_{written}": self.shards_written,
            "shards_skipped": self.shards_skipped,
            f"rows_{written}": rows,
            "seconds": time.perf_counter() - started,
            "images_per_second": rows / run if rows and run > 0 else 0.0,
            "shard_seconds": float(sum(s.seconds for s in self.statuses)),
            "actors": self.actors,
            "nodes": len(self.node_ids),
            "node_ids": self.node_ids,
            "stage_retries": self.stage_retries,
        }


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


def missing_shards(job: ShardJob) -> list[dict[str, Any]]:
    """The specs of ``job`` whose shard is not complete on disk (what a run still has to do)."""
    st = job.stage
    return [
        s for s in job.specs
        if not shard_is_complete(st.shard_out(s), st.shard_rows(s), st.signature, st.META_KEY,
                                 st.HOLDS, st.FIX)
    ]  # fmt: skip


def _placeable(resources: Resources, wanted: int) -> int:
    """How many of ``wanted`` actors the cluster's free CPUs and GPUs hold now (at least 1)."""
    free = ray.available_resources()
    n = wanted
    for key, need in (("CPU", resources.num_cpus), ("GPU", resources.num_gpus)):
        if need > 0:
            n = min(n, int(free.get(key, 0.0) // need))
    return max(1, n)


def _run_in_process(
    stage: ShardStage, todo: list[dict[str, Any]], statuses: list[ShardStatus]
) -> None:
    """``todo`` in the calling process, as one actor of the stage's resources would write it:
    ``setup`` once, one shard per call, torch with the threads Ray gives such an actor
    (``OMP_NUM_THREADS``: its CPUs rounded down, at least 1), so the shards are the same files.
    Raises the first shard's UserInputError, once (shards written before it stay)."""
    import math

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, math.floor(stage.resources.num_cpus)))
    try:
        stage.setup()
        for spec in todo:
            batch = {k: np.asarray([spec[k]]) for k in stage.inputs()}
            out = stage.process_batch(batch)
            status = ShardStatus.decode({k: out[k][0] for k in ShardStatus.columns()})
            if status.error:
                raise UserInputError(status.error)
            statuses.append(status)
    finally:
        torch.set_num_threads(threads)


def _run_once(
    stage: ShardStage,
    todo: list[dict[str, Any]],
    actors: int,
    min_actors: int,
    statuses: list[ShardStatus],
) -> ShardStatus | None:
    """One Ray Data job over ``todo``; appends each shard's status as it arrives. Stops at the
    first status with an error and returns it (leaving the loop releases the job's actors)."""
    actors = min(actors, len(todo))
    with shard_scheduling():
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        out = map_stage(ds, stage, actors=actors, min_actors=min(min_actors, actors), batch_size=1)
        for row in out.iter_rows():
            status = ShardStatus.decode(row)
            if status.error:
                return status
            statuses.append(status)
    return None


def run_shard_job(job: ShardJob) -> ShardJobResult:
    """Write every shard of ``job`` not already complete; the caller has connected to Ray and
    checked the resources (``check_resources``) before planning.

    Raises a worker's UserInputError (in ``setup`` or a shard) on the driver as a
    UserInputError with its message, once; ``RayActorError`` after ``STAGE_RETRIES`` re-runs.
    """
    for spec in job.specs:  # every shard spec has the columns the stage reads, before any work
        check_inputs(job.stage, spec)
    todo = missing_shards(job)
    planned = list(todo)
    actors = max(1, min(int(job.actors), len(todo)))
    statuses: list[ShardStatus] = []
    retries = 0
    start = time.perf_counter()
    if todo:
        storage.makedirs(job.out)
    if int(job.actors) == 0:  # in this process: no Ray Data, no actor start-up
        _run_in_process(job.stage, todo, statuses)
        todo = []
        actors = 0
    min_actors = actors  # the whole pool, the first time
    while todo:
        try:
            failed = _run_once(job.stage, todo, actors, min_actors, statuses)
            if failed is not None:
                raise UserInputError(failed.error)
            break
        except ray.exceptions.RayActorError as exc:
            retries += 1
            if retries > STAGE_RETRIES:
                raise
            logger.warning("%s: %s; running the unfinished shards again", job.stage.name,
                           type(exc).__name__)  # fmt: skip
        # Ray Data releases the failed pool's surviving actors by dropping its handles, but the
        # failed iterator's frames and the exception form a reference cycle: collect it, so
        # that those actors give back their CPUs and GPUs. Anything still holding the exception
        # (a logging handler that keeps records) keeps them, and a lost node takes its own
        # away: the re-run starts with the actors that fit now instead of waiting for all.
        gc.collect()
        min_actors = _placeable(job.stage.resources, actors)
        # The shards written so far are complete files: running again redoes only the rest.
        todo = missing_shards(job)
    return ShardJobResult(
        shards=len(job.specs),
        shards_written=len(planned),
        shards_skipped=len(job.specs) - len(planned),
        rows_written=sum(job.stage.shard_rows(s) for s in planned),
        statuses=statuses,
        actors=actors if planned else 0,
        stage_retries=retries,
        run_seconds=time.perf_counter() - start,
    )
