"""Generation stage: checkpoint -> a pool of ``n`` samples as Parquet shards, on a Ray Data actor pool.

- ``GenerateStage``: the shard-level stage. ``setup`` loads the checkpoint once per actor (CUDA
  when Ray gave the actor a GPU, else CPU); ``process_batch`` takes shard specs
  ``{shard, id_start, id_end}``, samples those ids with ``diffusion.sampling.sample_images`` and writes
  ``part-{shard:05d}.parquet`` atomically, returning ``{shard, rows, seconds, node_id, error}``.
  Callable without Ray (tests do).
- ``generate_pool``: the driver. Checks the checkpoint and the resources before any Ray work, maps
  the stage over a dataset of shard specs (``batch_size=1``: a shard is the unit of scheduling and
  of retry), skips shards already complete (resume), and returns metrics.

Rows: ``id`` (int64, 0 … n−1), ``image`` (PNG bytes), ``label`` (nullable int64: null for an
unconditional model), ``iteration`` (int64), ``seed`` (int64). The Parquet schema metadata holds
``raycollapse.generate`` (JSON: everything that determines the samples), which is how resume
recognises a complete shard and refuses to mix two pools in one folder.

Why the pool does not depend on the number of actors: sample ``i`` depends only on (checkpoint,
seed, ``i``, sampler settings, ``group_size``) (see ``diffusion.sampling``), and shard boundaries are
multiples of ``group_size``, so every network batch is the same aligned group of ids whichever
actor computes it (bit-identical on one kind of device; CPU and GPU kernels round differently).

Failures: an actor that crashes is restarted by Ray Data (its actor pool sets ``max_restarts=-1``
and ``max_task_retries=-1`` by default) and its shard recomputed and rewritten under the same
name. An actor killed for good (``ray.kill`` without ``no_restart=False``, a lost node) makes Ray
Data fail the job with ``ActorDiedError``; ``generate_pool`` then runs the stage again for the
shards not yet on disk (``STAGE_RETRIES`` times at most). Either way every id is written once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.stages.base import (
    Batch,
    Stage,
    check_resources,
    map_stage,
    shard_is_complete,
    shard_scheduling,
    worker_device,
)
from raycollapse.stages.runtime import ensure_ray

logger = logging.getLogger(__name__)

META_KEY = b"raycollapse.generate"
# whole-stage re-runs after an actor is lost for good (each redoes only the missing shards)
STAGE_RETRIES = 3
SAMPLE_KEYS = ("sampler", "steps", "eta", "guidance", "label", "group_size")
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("iteration", pa.int64()),
        ("seed", pa.int64()),
    ]
)


def shard_name(shard: int) -> str:
    """The deterministic file name of shard ``shard``."""
    return f"part-{int(shard):05d}.parquet"


def shard_specs(n: int, shard_size: int) -> list[dict[str, int]]:
    """``[{shard, id_start, id_end}, ...]`` covering ids ``0 … n−1`` in shards of ``shard_size``."""
    if n < 1:
        raise UserInputError(f"the number of samples must be >= 1, got {n}.")
    if shard_size < 1:
        raise UserInputError(f"the shard size must be >= 1, got {shard_size}.")
    return [
        {"shard": s, "id_start": lo, "id_end": min(n, lo + shard_size)}
        for s, lo in enumerate(range(0, n, shard_size))
    ]


def sample_settings(sample_cfg: Any) -> dict[str, Any]:
    """The sampler settings that determine the samples, as plain data (travels to the actors).

    ``sample_cfg``: the ``sample`` config section (DictConfig or dataclass) or a dict; missing keys
    take the ``SampleConfig`` defaults.
    """

    from raycollapse.config import SampleConfig, plain_section

    merged = plain_section(sample_cfg, SampleConfig)
    out = {k: merged[k] for k in SAMPLE_KEYS}
    out.update(steps=int(out["steps"]), eta=float(out["eta"]), group_size=int(out["group_size"]))
    if out["group_size"] < 1:
        raise UserInputError(f"sample.group_size must be >= 1, got {out['group_size']}.")
    return {**out, "batch_size": int(merged["batch_size"])}


def _weights_digest(checkpoint: Path) -> str:
    """A short SHA-256 of the UNet weights: a pool is tied to the weights, not to a folder name."""
    h = hashlib.sha256()
    for f in sorted((checkpoint / "unet").glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class GenerateStage(Stage):
    """Ray Data stage over shard specs: samples, encodes and writes one shard per row.

    ``process_batch`` never raises for user errors: like the embed stage, a failure comes back as
    a row with ``error`` set (Ray Data loses exception types, and a failed ``setup`` would surface
    as ``ActorDiedError`` after init retries); ``generate_pool`` re-raises it.
    """

    name: str = "generate"
    checkpoint: str = ""
    out_uri: str = ""
    seed: int = 0
    iteration: int = 0
    sample: dict[str, Any] = field(default_factory=lambda: sample_settings(None))
    signature: dict[str, Any] = field(default_factory=dict)

    def setup(self) -> None:
        self._setup_error: str | None = None
        try:
            from raycollapse.diffusion.checkpoint import load_checkpoint

            self.device = worker_device(
                self.num_gpus, "generate", "resources.generate_gpus_per_actor"
            )
            self.ckpt = load_checkpoint(self.checkpoint, device=self.device)
            self.labels_for(np.zeros(1, dtype=np.int64))  # label / guidance problems, once
        except Exception as exc:  # noqa: BLE001 - reported per shard, re-raised by the driver
            self._setup_error = f"{type(exc).__name__}: {exc}"

    def labels_for(self, ids: np.ndarray) -> np.ndarray | None:
        """Each id's class (``None`` for an unconditional model): a function of the id only."""
        from raycollapse.diffusion.sampling import resolve_labels

        meta = self.ckpt.meta
        return resolve_labels(
            ids,
            class_conditional=bool(meta["class_conditional"]),
            num_classes=int(meta["num_classes"]),
            label=self.sample["label"],
            guidance=self.sample["guidance"],
        )

    def sample_ids(self, ids: np.ndarray) -> np.ndarray:
        """uint8 ``N x H x W x C`` samples for these ids (the core sampler, aligned groups)."""
        from raycollapse.diffusion.sampling import sample_images

        s = self.sample
        return sample_images(
            self.ckpt.unet, self.ckpt.scheduler, ids, seed=self.seed, sampler=s["sampler"],
            steps=s["steps"], eta=s["eta"], labels_for=self.labels_for, guidance=s["guidance"],
            null_label=self.ckpt.null_label, group_size=s["group_size"], device=self.device,
        )  # fmt: skip

    def shard_table(self, id_start: int, id_end: int) -> pa.Table:
        """The rows of ids ``id_start … id_end−1`` as an Arrow table with the signature metadata."""
        from raycollapse.data.records import encode_png

        ids = np.arange(id_start, id_end, dtype=np.int64)
        images = self.sample_ids(ids)
        labels = self.labels_for(ids)
        n = len(ids)
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "image": pa.array([encode_png(im) for im in images], pa.binary()),
                "label": pa.nulls(n, pa.int64()) if labels is None else pa.array(labels),
                "iteration": pa.array(np.full(n, self.iteration, np.int64)),
                "seed": pa.array(np.full(n, self.seed, np.int64)),
            },
            schema=SCHEMA,
        )
        return table.replace_schema_metadata({META_KEY: json.dumps(self.signature, sort_keys=True)})

    def process_shard(self, shard: int, id_start: int, id_end: int) -> int:
        """Generate one shard and write it atomically under its deterministic name; its row count."""
        table = self.shard_table(id_start, id_end)
        storage.write_parquet_atomic(table, storage.join(self.out_uri, shard_name(shard)))
        return table.num_rows

    def process_batch(self, batch: Batch) -> Batch:
        # which node did the work (tests check that shards spread); "" when called without Ray
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        rows: list[tuple] = []
        for shard, lo, hi in zip(batch["shard"], batch["id_start"], batch["id_end"], strict=True):
            start = time.perf_counter()
            n, error = 0, self._setup_error or ""
            if not error:
                try:
                    n = self.process_shard(int(shard), int(lo), int(hi))
                except UserInputError as exc:
                    error = f"{UserInputError.__name__}: {exc}"
            user = not error or error.startswith(UserInputError.__name__)
            rows.append((int(shard), n, time.perf_counter() - start, node, error, user))
        names = ("shard", "rows", "seconds", "node_id", "error", "user_error")
        return {k: np.asarray(col) for k, col in zip(names, zip(*rows, strict=True), strict=True)}


# ---------------------------------------------------------------------------------------------
# The driver


def check_checkpoint(checkpoint: str | Path, sample: dict[str, Any]) -> dict[str, Any]:
    """Driver-side checks before any Ray work; the checkpoint's metadata.

    A missing folder, a folder that is not a model (no ``raycollapse.json``, no UNet weights, no
    scheduler), a label/guidance the model cannot use, or DDIM steps out of range fail here, in
    a second, with a ``UserInputError`` — not as an actor failure minutes later.
    """
    from diffusers import DDPMScheduler

    from raycollapse.diffusion.checkpoint import read_meta
    from raycollapse.diffusion.sampling import resolve_labels, sampling_scheduler

    root = Path(checkpoint)
    meta = read_meta(root)
    if not (root / "unet" / "config.json").is_file() or not list(
        (root / "unet").glob("*.safetensors")
    ):
        raise UserInputError(
            f"'{root}' is not a model: it has no unet/config.json and unet/*.safetensors; "
            "pass a folder written by `raycollapse train`."
        )
    try:
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"cannot read the noise scheduler of checkpoint '{root}': {exc}"
        ) from None
    sampling_scheduler(scheduler, sample["sampler"], sample["steps"])
    resolve_labels(
        np.zeros(1, dtype=np.int64), class_conditional=bool(meta["class_conditional"]),
        num_classes=int(meta["num_classes"]), label=sample["label"], guidance=sample["guidance"],
    )  # fmt: skip
    return meta


def _run_shards(
    todo: list[dict[str, int]], stage: GenerateStage, actors: int, results: list[dict[str, Any]]
) -> None:
    """Map ``stage`` over the shard specs on an actor pool; append each shard's result row."""
    storage.makedirs(stage.out_uri)
    with shard_scheduling():
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        for row in map_stage(ds, stage, actors=min(actors, len(todo)), batch_size=1).iter_rows():
            if row["error"]:
                cls = UserInputError if row["user_error"] else RuntimeError
                raise cls(f"generating shard {shard_name(row['shard'])} failed: {row['error']}")
            results.append(row)


def generate_pool(
    checkpoint: str | Path,
    out_uri: str | Path,
    n: int,
    *,
    seed: int,
    sample_cfg: Any = None,
    iteration: int = 0,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    shard_size: int | None = None,
) -> dict[str, Any]:
    """Generate samples ``0 … n−1`` from ``checkpoint`` into Parquet shards under ``out_uri``.

    ``sample_cfg``: the ``sample`` config section (sampler, steps, eta, guidance, label,
    group_size, batch_size). ``shard_size`` (default ``sample.batch_size``) is rounded up to a
    multiple of ``group_size``. Re-running resumes: complete shards of the same pool are skipped.

    Returns metrics: rows, shards, shard_size, shards_generated, shards_skipped, rows_generated,
    seconds, images_per_second (rows generated / wall seconds of the Ray part, actor start-up
    included), shard_seconds (summed over shards), actors, nodes, node_ids, stage_retries, out.
    """
    start = time.perf_counter()
    sample = sample_settings(sample_cfg)
    root = Path(checkpoint).absolute()
    meta = check_checkpoint(root, sample)  # before Ray: a wrong path fails in a second
    group = sample["group_size"]
    size = int(shard_size) if shard_size is not None else sample["batch_size"]
    if size < 1:
        raise UserInputError(f"the shard size must be >= 1, got {size}.")
    size = -(-size // group) * group  # whole aligned groups: shards independent of actors
    specs = shard_specs(int(n), size)
    sig = {
        "weights": _weights_digest(root),
        "seed": int(seed),
        "iteration": int(iteration),
        "preset": meta["preset"],
        **{k: sample[k] for k in SAMPLE_KEYS},
    }
    out = str(out_uri)
    stage = GenerateStage(
        num_cpus=float(cpus_per_actor), num_gpus=float(gpus_per_actor), checkpoint=str(root),
        out_uri=out, seed=int(seed), iteration=int(iteration), sample=sample, signature=sig,
    )  # fmt: skip
    ensure_ray()
    check_resources(stage, int(actors))
    planned = {shard_name(s["shard"]) for s in specs}
    extra = [f for f in storage.list_files(out, ".parquet") if f.rsplit("/", 1)[-1] not in planned]
    if extra:
        raise UserInputError(
            f"'{out}' holds shards beyond this pool of {n} samples (e.g. '{extra[0]}'); "
            "pass another output folder, or delete that one."
        )

    def missing() -> list[dict[str, int]]:
        return [
            s
            for s in specs
            if not shard_is_complete(
                storage.join(out, shard_name(s["shard"])),
                s["id_end"] - s["id_start"],
                sig,
                META_KEY,
                "a different pool",
                "Pass another output folder, or delete that one to regenerate.",
            )  # fmt: skip
        ]

    todo = missing()
    shards_todo, rows_todo = len(todo), sum(s["id_end"] - s["id_start"] for s in todo)
    results: list[dict[str, Any]] = []
    n_actors = max(1, min(int(actors), len(todo)))
    retries = 0
    run_start = time.perf_counter()
    while todo:
        try:
            _run_shards(todo, stage, n_actors, results)
            break
        except ray.exceptions.RayActorError as exc:
            # An actor killed for good (ray.kill's default no_restart=True, a lost node) fails
            # the whole Ray Data job; actors that crash are restarted by Ray Data itself. The
            # shards written so far are complete files, so running again redoes only the rest.
            retries += 1
            if retries > STAGE_RETRIES:
                raise
            logger.warning("generate: %s; running the unfinished shards again", type(exc).__name__)
            todo = missing()
    run_seconds = time.perf_counter() - run_start
    node_ids = sorted({str(r["node_id"]) for r in results})
    return {
        "rows": int(n),
        "shards": len(specs),
        "shard_size": size,
        "shards_generated": shards_todo,
        "shards_skipped": len(specs) - shards_todo,
        "rows_generated": rows_todo,
        "seconds": time.perf_counter() - start,
        "images_per_second": rows_todo / run_seconds if rows_todo and run_seconds > 0 else 0.0,
        # time the actors spent in process_batch (sampling + encoding + writing), start-up excluded
        "shard_seconds": float(sum(float(r["seconds"]) for r in results)),
        "actors": n_actors if shards_todo else 0,
        "nodes": len(node_ids),
        "node_ids": node_ids,
        "stage_retries": retries,
        "out": out,
    }
