"""Generation stage: checkpoint -> a pool of ``n`` samples as Parquet shards, on a Ray Data actor pool.

- ``GenerateStage``: the shard stage (``stages.shard_job``). ``setup`` loads the checkpoint once
  per actor (CUDA when Ray gave the actor a GPU, else CPU); ``process_shard`` takes a shard spec
  ``{shard, id_start, id_end}``, samples those ids with ``diffusion.sampling.sample_images`` and
  writes ``part-{shard:05d}.parquet`` atomically. Callable without Ray (tests do).
- ``plan_generation``: checks the checkpoint and the resources before any Ray work and returns
  the shard job; ``generate_pool`` runs it (``stages.shard_job.run_shard_job``: resume, actor
  pool, retries) and returns metrics.

Rows: ``id`` (int64, 0 … n−1), ``image`` (PNG bytes; for a vector model (preset ``mlp``)
``vector`` instead: ``list<float32>``, sampled by ``diffusion.vector_sampling``), ``label`` (nullable int64: null for an
unconditional model), ``iteration`` (int64), ``seed`` (int64). The Parquet schema metadata holds
``raycollapse.generate`` (JSON: everything that determines the samples), which is how resume
recognises a complete shard and refuses to mix two pools in one folder.

Why the pool does not depend on the number of actors: sample ``i`` depends only on (checkpoint,
seed, ``i``, sampler settings, ``group_size``) (see ``diffusion.sampling``), and shard boundaries are
multiples of ``group_size``, so every network batch is the same aligned group of ids whichever
actor computes it (bit-identical on one kind of device; CPU and GPU kernels round differently).

Failures (a crashed or lost actor, a user error in a worker) are handled by the shard-job
runner, the same way for every shard stage: every id is written once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.stages.base import Resources, check_resources, worker_device
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.shard_job import ShardJob, ShardStage, run_shard_job

if TYPE_CHECKING:
    from raycollapse.config.schema import SampleConfig

META_KEY = b"raycollapse.generate"
SAMPLE_KEYS = ("sampler", "steps", "eta", "guidance", "label", "group_size")
# Settings that joined a pool's identity later: part of its signature only when not the default,
# so that pools written before they existed (fp32 eager sampling) keep their signature.
LATER_SAMPLE_KEYS = {"precision": "auto", "compile": False}
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("iteration", pa.int64()),
        ("seed", pa.int64()),
    ]
)
VECTOR_SCHEMA = pa.schema(
    [("vector", pa.list_(pa.float32())) if f.name == "image" else f for f in SCHEMA]
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


def sample_settings(sample_cfg: SampleConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampler settings that determine the samples, as plain data (travels to the actors).

    ``sample_cfg``: the ``sample`` config section (DictConfig or dataclass) or a dict; missing keys
    take the ``SampleConfig`` defaults.
    """

    from raycollapse.config import SampleConfig, to_dict

    merged = to_dict(sample_cfg, SampleConfig)
    out = {k: merged[k] for k in (*SAMPLE_KEYS, *LATER_SAMPLE_KEYS)}
    out.update(steps=int(out["steps"]), eta=float(out["eta"]), group_size=int(out["group_size"]))
    out.update(compile=bool(out["compile"]), precision=str(out["precision"]))
    if out["group_size"] < 1:
        raise UserInputError(f"sample.group_size must be >= 1, got {out['group_size']}.")
    return {**out, "batch_size": int(merged["batch_size"])}


def sample_identity(sample: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings in a pool's signature (``sample_settings`` output): ``SAMPLE_KEYS``,
    plus each of ``LATER_SAMPLE_KEYS`` that is not its default."""
    later = {k: sample[k] for k, default in LATER_SAMPLE_KEYS.items() if sample[k] != default}
    return {**{k: sample[k] for k in SAMPLE_KEYS}, **later}


def _weights_digest(checkpoint: Path) -> str:
    """A short SHA-256 of the UNet weights: a pool is tied to the weights, not to a folder name."""
    h = hashlib.sha256()
    for f in sorted((checkpoint / "unet").glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class GenerateStage(ShardStage):
    """Shard stage over shard specs ``{shard, id_start, id_end}``: samples, encodes, writes."""

    META_KEY = META_KEY
    HOLDS = "a different pool"
    FIX = "Pass another output folder, or delete that one to regenerate."

    name: str = "generate"
    checkpoint: str = ""
    out_uri: str = ""
    seed: int = 0
    iteration: int = 0
    sample: dict[str, Any] = field(default_factory=lambda: sample_settings(None))

    def inputs(self) -> tuple[str, ...]:
        return ("shard", "id_start", "id_end")

    def setup(self) -> None:
        from raycollapse.diffusion.checkpoint import load_checkpoint

        self.device = worker_device(
            self.resources.num_gpus, "generate", "resources.generate_gpus_per_actor"
        )
        from raycollapse.diffusion.sampling import sampling_autocast, sampling_network

        self.ckpt = load_checkpoint(self.checkpoint, device=self.device)
        self.labels_for(np.zeros(1, dtype=np.int64))  # label / guidance problems, once
        self.amp = sampling_autocast(self.sample["precision"], self.device)
        self.net = sampling_network(self.ckpt.unet, self.device, self.sample["compile"])

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

    @property
    def vectors(self) -> bool:
        """Whether the model is a vector model (float ``N x d`` samples, no images)."""
        from raycollapse.diffusion.unet import is_vector_preset

        return is_vector_preset(str(self.ckpt.meta["preset"]))

    def sample_ids(self, ids: np.ndarray) -> np.ndarray:
        """uint8 ``N x H x W x C`` samples for these ids (the core sampler, aligned groups), or
        float32 ``N x d`` for a vector model."""
        from raycollapse.diffusion.sampling import sample_images
        from raycollapse.diffusion.vector_sampling import sample_vectors

        s = self.sample
        sample = sample_vectors if self.vectors else sample_images
        return sample(
            self.net, self.ckpt.scheduler, ids, seed=self.seed, sampler=s["sampler"],
            steps=s["steps"], eta=s["eta"], labels_for=self.labels_for, guidance=s["guidance"],
            null_label=self.ckpt.null_label, group_size=s["group_size"], device=self.device,
            amp_dtype=self.amp,
        )  # fmt: skip

    def shard_table(self, id_start: int, id_end: int) -> pa.Table:
        """The rows of ids ``id_start … id_end−1`` as an Arrow table with the signature metadata."""
        from raycollapse.data.records import encode_png
        from raycollapse.data.vectors import vector_array

        ids = np.arange(id_start, id_end, dtype=np.int64)
        images = self.sample_ids(ids)
        labels = self.labels_for(ids)
        n = len(ids)
        if self.vectors:
            data = {"vector": vector_array(images)}
        else:
            data = {"image": pa.array([encode_png(im) for im in images], pa.binary())}
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                **data,
                "label": pa.nulls(n, pa.int64()) if labels is None else pa.array(labels),
                "iteration": pa.array(np.full(n, self.iteration, np.int64)),
                "seed": pa.array(np.full(n, self.seed, np.int64)),
            },
            schema=VECTOR_SCHEMA if self.vectors else SCHEMA,
        )
        return table.replace_schema_metadata({META_KEY: json.dumps(self.signature, sort_keys=True)})

    def shard_out(self, spec: dict[str, Any]) -> str:
        return storage.join(self.out_uri, shard_name(int(spec["shard"])))

    def shard_rows(self, spec: dict[str, Any]) -> int:
        return int(spec["id_end"]) - int(spec["id_start"])

    def process_shard(self, spec: dict[str, Any]) -> int:
        """Generate one shard and write it atomically under its deterministic name; its row count."""
        table = self.shard_table(int(spec["id_start"]), int(spec["id_end"]))
        storage.write_parquet_atomic(table, self.shard_out(spec))
        return table.num_rows


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


def _shard_size(sample: dict[str, Any], shard_size: int | None) -> int:
    """``shard_size`` (default ``sample.batch_size``) rounded up to whole ``group_size`` groups."""
    size = int(shard_size) if shard_size is not None else sample["batch_size"]
    if size < 1:
        raise UserInputError(f"the shard size must be >= 1, got {size}.")
    group = sample["group_size"]
    return -(-size // group) * group  # whole aligned groups: shards independent of actors


def plan_generation(
    checkpoint: str | Path,
    out_uri: str | Path,
    n: int,
    *,
    seed: int,
    sample_cfg: SampleConfig | Mapping[str, Any] | None = None,
    iteration: int = 0,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    shard_size: int | None = None,
) -> ShardJob:
    """The shard job that generates samples ``0 … n−1`` (see :func:`generate_pool`).

    Every check that can fail before any Ray work happens here: the checkpoint and sampler
    settings, the cluster's resources, and an output folder holding another pool's shards.
    """
    sample = sample_settings(sample_cfg)
    root = Path(checkpoint).absolute()
    meta = check_checkpoint(root, sample)  # before Ray: a wrong path fails in a second
    specs = shard_specs(int(n), _shard_size(sample, shard_size))
    sig = {
        "weights": _weights_digest(root),
        "seed": int(seed),
        "iteration": int(iteration),
        "preset": meta["preset"],
        **sample_identity(sample),
    }
    out = str(out_uri)
    stage = GenerateStage(
        resources=Resources(num_cpus=float(cpus_per_actor), num_gpus=float(gpus_per_actor)),
        checkpoint=str(root), out_uri=out, seed=int(seed), iteration=int(iteration),
        sample=sample, signature=sig,
    )  # fmt: skip
    ensure_ray()
    check_resources(stage.resources, int(actors), stage.name)
    planned = {shard_name(s["shard"]) for s in specs}
    extra = [f for f in storage.list_files(out, ".parquet") if f.rsplit("/", 1)[-1] not in planned]
    if extra:
        raise UserInputError(
            f"'{out}' holds shards beyond this pool of {n} samples (e.g. '{extra[0]}'); "
            "pass another output folder, or delete that one."
        )
    return ShardJob(stage, specs, out, int(actors))


def generate_pool(
    checkpoint: str | Path,
    out_uri: str | Path,
    n: int,
    *,
    seed: int,
    sample_cfg: SampleConfig | Mapping[str, Any] | None = None,
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
    job = plan_generation(
        checkpoint, out_uri, n, seed=seed, sample_cfg=sample_cfg, iteration=iteration,
        actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
        shard_size=shard_size,
    )  # fmt: skip
    result = run_shard_job(job)
    return {
        "rows": int(n),
        "shards": result.shards,
        "shard_size": _shard_size(sample_settings(sample_cfg), shard_size),
        **result.metrics("generated", start),
        "out": job.out,
    }
