"""Training stage: the DDPM trained with Ray Train (``TorchTrainer``, DDP), resumable.

- The training set becomes a Ray Data dataset on the driver (``ray.data.read_parquet`` of the
  Parquet shards ``{id, image (PNG), label, ...}``, or in-memory ``Records``), materialised there
  while the CPUs are still free: the workers take every CPU of a small cluster, and a dataset
  that still had read tasks to run would then wait for a CPU forever. Ray Train splits it over
  the workers (``ray.train.get_dataset_shard("train")``, its ``streaming_split``).
- A worker whose shard fits (decoded, at most ``train.in_memory_gb``) reads it once into memory
  and samples batches of ``batch_size // workers`` with the core ``IndexStream`` seeded by
  (seed, rank): the in-process loop's result. A larger shard streams (``train_data.ShardStream``
  and ``train_stream.stream_train_loop``): epochs in the order-preserving block order through a
  seeded shuffle buffer of ``train.stream_buffer`` images; checkpoints hold the stream position.
- DDP through ``ray.train.torch.prepare_model``; the loop is the core ``train_loop`` (the one
  ``raycollapse train`` runs in-process) with the rank's seed, its share of the batch and the
  loss averaged over the ranks. With one worker it gives the in-process result bit for bit when
  seeded with ``rank_seed(seed, 0)``.
- Every ``checkpoint_every`` steps (and at the end) all ranks call ``ray.train.report`` with a
  checkpoint folder: rank 0 writes ``train_state.pt`` (model, EMA, optimiser, LR schedule,
  gradient scaler, step, losses), every rank ``rank_<n>.pt`` (its noise generator and index stream); Ray Train merges
  them into one folder under ``storage_path/run_name``. Files are ``torch.save`` of plain data,
  read back with ``weights_only=True``. Each rank then waits until Ray Train has committed the
  checkpoint, so a restarted worker group (``FailureConfig(max_failures)``) or a re-run with the
  same ``run_name`` resumes from the latest one reported.
- The final checkpoint also holds ``model/`` (the EMA or raw weights, ``train.sample_from``; ``save_checkpoint``); the driver
  copies it to ``out_checkpoint`` atomically. Copying on the driver (not writing from rank 0)
  works on a multi-node cluster, where rank 0 may run on another machine than the caller.

Resume is exact for one worker. With several, Ray Data's ``streaming_split`` may hand a restarted
worker group a different partition of the rows (it assigns blocks dynamically); weights,
optimiser, schedule and RNG states are still restored exactly.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from raycollapse.data.records import Records
from raycollapse.data.vectors import VECTOR_COLUMN
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.atomic import install_dir
from raycollapse.io.outputs import fingerprint
from raycollapse.stages.base import Resources, check_resources
from raycollapse.stages.errors import raise_if_user_error
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.train_data import (
    ShardStream,
    rank_seed,
    read_shard,
    shard_bytes,
    training_dataset,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
RUN_FILE = "raycollapse_run.json"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:03d}.pt"


# ---------------------------------------------------------------------------------------------
# The worker


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train loop (one per worker); rank 0's return value becomes ``Result.return_value``.

    The core ``train_loop`` plus this worker's Ray Train context: rank and world size, its dataset
    shard, DDP, its seed, the restored checkpoint, and ``ray.train.report`` of checkpoints.
    """
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointConsistencyMode
    from ray.train.torch import get_device, prepare_model

    from raycollapse.diffusion.checkpoint import (
        load_finetune_base,
        load_training_state,
        save_checkpoint,
        save_training_state,
    )
    from raycollapse.diffusion.sampling import make_scheduler
    from raycollapse.diffusion.train_parts import channels_last_on_cuda, unwrap_model
    from raycollapse.diffusion.trainer import RANK_KEYS, TrainingDiverged, TrainState, train_loop
    from raycollapse.diffusion.unet import build_unet
    from raycollapse.stages.train_stream import STREAM_RANK_KEYS, StreamState, stream_train_loop

    cfg = config["cfg"]
    tc, mc, dc, diff = cfg["train"], cfg["model"], cfg["data"], cfg["diffusion"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.get("cpu_threads"):
        torch.set_num_threads(int(tc["cpu_threads"]))
    device = get_device() if tc["use_gpu"] else torch.device("cpu")
    shard = ray.train.get_dataset_shard("train")
    if config["init_from"]:
        ckpt = load_finetune_base(config["init_from"], expect=config["meta"],
                                  num_train_timesteps=diff["num_train_timesteps"])  # fmt: skip
        model, scheduler = ckpt.unet, ckpt.scheduler
    else:
        model = build_unet(mc["preset"], resolution=dc["resolution"], channels=dc["channels"],
                           class_conditional=mc["class_conditional"], num_classes=mc["num_classes"], seed=mc["seed"],
                           dim=config["dim"])  # fmt: skip
        scheduler = make_scheduler(diff["num_train_timesteps"], diff["beta_start"], diff["beta_end"],
                                   diff["beta_schedule"])  # fmt: skip
    channels_last_on_cuda(model, device)  # before DDP wraps it
    model = prepare_model(model, move_to_device=device)
    resume = None
    ckpt_in = ray.train.get_checkpoint()
    if ckpt_in is not None:
        with ckpt_in.as_directory() as d:
            resume = load_training_state(Path(d) / STATE_FILE)
            if (Path(d) / _rank_file(rank)).exists():  # absent if the worker count changed
                resume.update(load_training_state(Path(d) / _rank_file(rank)))

    def all_reduce_mean(loss: float) -> float:
        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / world

    def report(state: TrainState | StreamState, final: bool) -> None:
        full = state.state_dict()
        rank_keys = STREAM_RANK_KEYS if isinstance(state, StreamState) else RANK_KEYS
        with tempfile.TemporaryDirectory() as d:
            save_training_state(Path(d) / _rank_file(rank), {k: full[k] for k in rank_keys})
            if rank == 0:
                shared = {k: v for k, v in full.items() if k not in rank_keys}
                save_training_state(Path(d) / STATE_FILE, shared)
                if final:
                    # training is over: the saved model holds the EMA weights (train.sample_from=ema;
                    # with raw the EMA is disabled and copy_to leaves the trained weights)
                    state.ema.copy_to(model)
                    meta = {**config["meta"], "steps": steps, "workers": world, "data": config["data_info"],
                            "train": tc, "diffusion": diff}  # fmt: skip
                    save_checkpoint(Path(d) / MODEL_DIR, unwrap_model(model), scheduler,
                                    meta, config_yaml=config["yaml"])  # fmt: skip
            metrics = {
                "step": state.step,
                "loss": state.losses[-1] if state.losses else float("nan"),
            }
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(d),
                checkpoint_dir_name=f"step-{state.step:08d}",
            )
        # report() only queues the checkpoint; the controller registers it at its next poll
        # (every ~2 s). A worker dying before then would resume from the checkpoint before. Wait
        # for the commit, so that "resume from the last checkpoint" holds (costs <= 2 s each).
        if not final:
            ray.train.get_all_reported_checkpoints(
                consistency_mode=CheckpointConsistencyMode.COMMITTED
            )

    cond = bool(mc["class_conditional"])
    steps, per_worker = int(tc["steps"]), int(tc["batch_size"]) // world
    if config["stream"]:
        stream = ShardStream(shard, dc, rank_seed(tc["seed"], rank), int(tc["stream_buffer"]))
        loop, data = stream_train_loop, {"stream": stream}
    else:
        _, images, labels = read_shard(shard, dc)
        loop, data = train_loop, {"images": images, "labels": labels if cond else None}
    try:
        _, res = loop(
            model, **data, noise_scheduler=scheduler, steps=steps, batch_size=per_worker,
            lr=tc["lr"], weight_decay=tc["weight_decay"],
            warmup_steps=tc["warmup_steps"], ema_decay=tc["ema_decay"], grad_clip=tc["grad_clip"],
            mixed_precision=tc["mixed_precision"], seed=rank_seed(tc["seed"], rank),
            class_conditional=cond, num_classes=mc["num_classes"], label_dropout=mc["label_dropout"],
            device=device, resume=resume, checkpoint=report, checkpoint_every=int(tc["checkpoint_every"]),
            all_reduce_loss=all_reduce_mean if world > 1 else None, callbacks=config["callbacks"],
            adam_beta1=tc["adam_beta1"], adam_beta2=tc["adam_beta2"], sample_from=tc["sample_from"],
            compile=bool(tc["compile"]),
        )  # fmt: skip
    except TrainingDiverged as exc:  # every rank sees the same global loss: all return together
        return {"error": str(exc)}
    return {
        "steps": steps, "start_step": res.start_step, "loss_first": res.loss_first,
        "loss_last": res.loss_last, "train_seconds": res.seconds,
        "images_per_second": (steps - res.start_step) * per_worker * world / max(res.seconds, 1e-9),
        "workers": world, "batch_size": per_worker * world,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The driver


def _streams(c: dict[str, Any], n: int) -> bool:
    """Whether each worker streams its shard: its decoded images exceed ``train.in_memory_gb``."""
    tc, dc = c["train"], c["data"]
    stream = shard_bytes(n, int(tc["workers"]), dc) > float(tc["in_memory_gb"]) * 1e9
    if stream and int(tc["workers"]) > 1 and dc["on_small"] == "skip":
        # Workers must change epochs at the same step (each epoch start is a barrier of the
        # split): skipped images would give them unequal epochs.
        raise UserInputError(
            "a streamed training set (larger than train.in_memory_gb per worker) with several "
            "workers needs data.on_small=error or resize; prepare the images first, or use one worker."
        )
    return stream


def train_distributed(
    cfg: DictConfig,
    train_uri_or_records: str | Path | Records,
    out_checkpoint: str | Path,
    *,
    storage_path: str | Path,
    run_name: str,
    init_from: str | Path | None = None,
    callbacks: Sequence[Callable[[Any], None]] = (),
) -> dict[str, Any]:
    """Train the DDPM of ``cfg`` on a training set with Ray Train; write ``out_checkpoint``.

    ``cfg``: the whole config tree (a ``DictConfig``: ``train``, ``model``, ``data``,
    ``diffusion``). ``init_from`` (default ``cfg.train.init_from``) is used when
    ``cfg.train.init == "finetune"``. Ray Train's run lives at ``storage_path/run_name``;
    re-running with the same pair resumes. ``callbacks``: step callbacks of ``train_loop``, run
    in every worker after each step (picklable; they receive the ``TrainState``).

    Returns steps, start_step (where this run resumed), loss_first, loss_last, images_per_second
    (training loop only), train_seconds, seconds (wall, driver), workers, batch_size, checkpoint,
    and streamed=True when the workers streamed their shards (``train.in_memory_gb``).
    """
    from raycollapse.config import to_dict, to_yaml
    from raycollapse.diffusion.checkpoint import load_finetune_base, model_meta
    from raycollapse.diffusion.train_parts import check_labels

    t0 = time.perf_counter()
    c = to_dict(cfg)  # plain containers travel to the workers without OmegaConf's flags
    tc, mc = c["train"], c["model"]
    workers = int(tc["workers"])
    if workers < 1 or tc["steps"] < 1 or tc["batch_size"] < workers:
        raise UserInputError(
            f"need train.workers >= 1, train.steps >= 1 and train.batch_size >= train.workers; got "
            f"{workers}, {tc['steps']} and {tc['batch_size']}."
        )
    meta = model_meta(cfg.model, cfg.data)
    init = None
    if tc["init"] == "finetune":
        init = init_from or tc.get("init_from")
        init = str(Path(init).absolute()) if init else None
        # refuses a missing or mismatching model now, before Ray Train starts
        load_finetune_base(
            init, expect=meta, num_train_timesteps=c["diffusion"]["num_train_timesteps"]
        )
    ensure_ray()
    threads = int(tc.get("cpu_threads") or 1)
    check_resources(
        Resources(num_cpus=float(threads), num_gpus=1.0 if tc["use_gpu"] else 0.0), workers, "train"
    )
    ds, labels, source = training_dataset(train_uri_or_records)
    # A vector model's width is the data's dimension (images: fixed by the config instead).
    vector = VECTOR_COLUMN in ds.schema().names and len(labels) > 0
    dim = len(ds.take(1)[0][VECTOR_COLUMN]) if vector else None
    if len(labels) < workers:
        raise UserInputError(
            f"the training set has {len(labels)} images, fewer than train.workers={workers}."
        )
    check_labels(labels if mc["class_conditional"] else None, class_conditional=mc["class_conditional"],
                 num_classes=mc["num_classes"])  # fmt: skip
    stream = _streams(c, len(labels))
    root = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).absolute())
    identity = {"steps": tc["steps"], "batch_size": tc["batch_size"], "workers": workers, "seed": tc["seed"],
                "n": len(labels), "preset": mc["preset"],
                "init": fingerprint(init) if init else None}  # fmt: skip
    if stream:  # a checkpoint's per-rank state differs between the two paths
        identity["stream_buffer"] = tc["stream_buffer"]
    run_file = storage.join(root, run_name, RUN_FILE)
    if storage.exists(run_file):
        found = json.loads(storage.read_text(run_file))
        if found != identity:
            raise UserInputError(
                f"Ray Train run '{run_name}' under '{root}' belongs to another training ({found} vs {identity}); "
                "pass another run name, or delete that folder to start over."
            )
    else:
        storage.write_text_atomic(run_file, json.dumps(identity))
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {
        "cfg": c, "meta": meta, "init_from": init, "yaml": to_yaml(cfg),
        "data_info": {"source": source, "n": len(labels)}, "callbacks": list(callbacks),
        "dim": dim,
        "stream": stream,
    }  # fmt: skip
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=bool(tc["use_gpu"]), resources_per_worker={"CPU": threads}
        ),  # fmt: skip
        run_config=RunConfig(
            storage_path=root,
            name=run_name,
            failure_config=FailureConfig(max_failures=int(tc["max_failures"])),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2
            ),  # bounded storage; the latest resumes
        ),  # fmt: skip
        datasets={"train": ds},
        # A stream's epochs must see the blocks in one order (seeded, resumable); the in-memory
        # path sorts its shard by id and keeps Ray Data's defaults.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True))
        if stream
        else None,
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        raise_if_user_error(exc)
        raise
    out = dict(result.return_value or {})
    if "error" in out:
        raise UserInputError(out["error"])
    with result.checkpoint.as_directory() as d:
        install_dir(Path(d) / MODEL_DIR, Path(out_checkpoint))
    if stream:  # only then: the in-memory path's output is unchanged
        out["streamed"] = True
    out.update(
        checkpoint=str(out_checkpoint),
        seconds=time.perf_counter() - t0,
        run=storage.join(root, run_name),
    )
    return out
