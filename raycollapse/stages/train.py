"""Training stage: the DDPM trained with Ray Train (``TorchTrainer``, DDP), resumable.

- The training set becomes a Ray Data dataset on the driver (Parquet shards ``{id, image (PNG),
  label, ...}`` or in-memory ``Records``), materialised there while the CPUs are still free: the
  workers take every CPU of a small cluster, and a dataset that still had read tasks to run
  would then wait for a CPU forever. Each worker reads its shard with
  ``ray.train.get_dataset_shard("train")`` once into memory (the sets are small) and samples
  batches of ``batch_size // workers`` with the core ``IndexStream`` seeded by (seed, rank).
- DDP through ``ray.train.torch.prepare_model``; the step is the core ``train_step``.
- Every ``checkpoint_every`` steps (and at the end) all ranks call ``ray.train.report`` with a
  checkpoint folder: rank 0 writes ``train_state.pt`` (model, EMA, optimiser, LR schedule, step,
  losses), every rank ``rank_<n>.pt`` (its noise generator and index stream); Ray Train merges
  them into one folder under ``storage_path/run_name``. Files are ``torch.save`` of plain data,
  read back with ``weights_only=True``. Each rank then waits until Ray Train has committed the
  checkpoint, so a restarted worker group (``FailureConfig(max_failures)``) or a re-run with the
  same ``run_name`` resumes from the latest one reported.
- The final checkpoint also holds ``model/`` (the EMA weights, ``save_checkpoint``); the driver
  copies it to ``out_checkpoint`` atomically. Copying on the driver (not writing from rank 0)
  works on a multi-node cluster, where rank 0 may run on another machine than the caller.

Resume is exact for one worker. With several, Ray Data's ``streaming_split`` may hand a restarted
worker group a different partition of the rows (it assigns blocks dynamically); weights,
optimiser, schedule and RNG states are still restored exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raycollapse.data.records import Records
from raycollapse.diffusion.checkpoint import swap_into_place
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.stages.base import Batch, Stage, check_resources
from raycollapse.stages.runtime import ensure_ray
from raycollapse.stages.train_data import rank_seed, read_shard, training_dataset

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
RUN_FILE = "raycollapse_run.json"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:03d}.pt"


def _plain(cfg: Any) -> dict[str, Any]:
    """The config tree as plain containers (travels to the workers without OmegaConf flags)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    elif not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)  # a Config dataclass
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The worker


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train loop (one per worker); rank 0's return value becomes ``Result.return_value``."""
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointConsistencyMode
    from ray.train.torch import get_device, prepare_model

    from raycollapse.diffusion.checkpoint import (
        load_checkpoint,
        load_training_state,
        save_checkpoint,
        save_training_state,
    )
    from raycollapse.diffusion.sampling import images_to_tensor, scheduler_from_config
    from raycollapse.diffusion.trainer import (
        EMA,
        IndexStream,
        autocast_dtype,
        make_lr_schedule,
        make_optimizer,
        train_step,
    )
    from raycollapse.diffusion.unet import build_unet

    cfg = config["cfg"]
    tc, mc, dc = cfg["train"], cfg["model"], cfg["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.get("cpu_threads"):
        torch.set_num_threads(int(tc["cpu_threads"]))
    device = get_device() if tc["use_gpu"] else torch.device("cpu")
    _, images, labels = read_shard(ray.train.get_dataset_shard("train"), dc)
    if config["init_from"]:
        ckpt = load_checkpoint(config["init_from"], expect=config["meta"])
        model, scheduler = ckpt.unet, ckpt.scheduler
    else:
        model = build_unet(mc["preset"], resolution=dc["resolution"], channels=dc["channels"],
                           class_conditional=mc["class_conditional"], num_classes=mc["num_classes"], seed=mc["seed"])  # fmt: skip
        scheduler = scheduler_from_config(_Section(cfg["diffusion"]))
    model = prepare_model(model, move_to_device=device)
    base = getattr(model, "module", model)
    cond = bool(mc["class_conditional"])
    steps, per_worker = int(tc["steps"]), int(tc["batch_size"]) // world
    optimizer = make_optimizer(model, tc["lr"], tc["weight_decay"])
    schedule = make_lr_schedule(optimizer, tc["warmup_steps"], steps)
    ema = EMA(model, tc["ema_decay"])
    amp = autocast_dtype(tc["mixed_precision"], device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    gen = torch.Generator(device=device).manual_seed(rank_seed(tc["seed"], rank))
    stream = IndexStream(len(images), rank_seed(tc["seed"], rank))
    losses: list[float] = []
    first = 0
    ckpt_in = ray.train.get_checkpoint()
    if ckpt_in is not None:
        with ckpt_in.as_directory() as d:
            state = load_training_state(Path(d) / STATE_FILE)
            base.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            losses, first = [float(x) for x in state["losses"]], int(state["step"])
            if (Path(d) / _rank_file(rank)).exists():  # absent if the worker count changed
                mine = load_training_state(Path(d) / _rank_file(rank))
                gen.set_state(mine["generator"])
                stream.rng.bit_generator.state = mine["stream_rng"]
                stream.buffer = mine["stream_buffer"].numpy()
    data = images_to_tensor(images, device)
    label_t = torch.as_tensor(labels, dtype=torch.long, device=device) if cond else None
    every = int(tc["checkpoint_every"])
    fail_step, fail_marker = config["fail_once_at"] or (None, None)

    def report(step: int, final: bool) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_training_state(Path(d) / _rank_file(rank), {
                "generator": gen.get_state(), "stream_rng": stream.rng.bit_generator.state,
                "stream_buffer": torch.from_numpy(stream.buffer.copy()),
            })  # fmt: skip
            if rank == 0:
                save_training_state(Path(d) / STATE_FILE, {
                    "step": step, "model": base.state_dict(), "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "losses": losses,
                })  # fmt: skip
                if final:
                    ema.copy_to(model)  # training is over: the saved model holds the EMA weights
                    meta = {**config["meta"], "steps": steps, "workers": world, "data": config["data_info"],
                            "train": tc, "diffusion": cfg["diffusion"]}  # fmt: skip
                    save_checkpoint(
                        Path(d) / MODEL_DIR, base, scheduler, meta, config_yaml=config["yaml"]
                    )
            metrics = {"step": step, "loss": losses[-1] if losses else float("nan")}
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(d),
                checkpoint_dir_name=f"step-{step:08d}",
            )
        # report() only queues the checkpoint; the controller registers it at its next poll
        # (every ~2 s). A worker dying before then would resume from the checkpoint before. Wait
        # for the commit, so that "resume from the last checkpoint" holds (costs <= 2 s each).
        if not final:
            ray.train.get_all_reported_checkpoints(
                consistency_mode=CheckpointConsistencyMode.COMMITTED
            )

    start = time.perf_counter()
    for step in range(first, steps):
        idx = torch.as_tensor(stream.next(per_worker), device=device)
        loss = train_step(
            model, data[idx], None if label_t is None else label_t[idx], noise_scheduler=scheduler,
            optimizer=optimizer, lr_schedule=schedule, ema=ema, generator=gen,
            label_dropout=mc["label_dropout"] if cond else 0.0, null_label=mc["num_classes"] if cond else None,
            grad_clip=tc["grad_clip"], amp_dtype=amp, grad_scaler=scaler,
        )  # fmt: skip
        if world > 1:  # the global loss, so every rank takes the same decisions below
            t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(t)
            loss = float(t.item()) / world
        if not math.isfinite(loss):  # all ranks agree: return together (no retry would help)
            return {
                "error": f"training diverged at step {step + 1} (loss {loss}); lower train.lr or keep train.grad_clip > 0."
            }
        losses.append(loss)
        if (
            rank == 0
            and fail_step is not None
            and step + 1 == fail_step
            and not os.path.exists(fail_marker)
        ):
            Path(fail_marker).write_text(f"killed at step {step + 1}\n")
            os._exit(1)  # a real process death (test hook), not an exception
        if every > 0 and (step + 1) % every == 0 and step + 1 < steps:
            report(step + 1, final=False)
    seconds = time.perf_counter() - start
    if first < steps:  # else resumed from the final checkpoint, which already holds the model
        report(steps, final=True)
    window = max(1, min(50, len(losses) // 10))
    return {
        "steps": steps, "start_step": first, "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])), "train_seconds": seconds,
        "images_per_second": (steps - first) * per_worker * world / max(seconds, 1e-9),
        "workers": world, "batch_size": per_worker * world,
    }  # fmt: skip


class _Section:
    """Attribute access over a plain dict (``scheduler_from_config`` reads ``cfg.name``)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


@dataclass
class _TrainWorkers(Stage):
    """Only the resource request of the training workers, for ``check_resources``."""

    name: str = "train"

    def process_batch(self, batch: Batch) -> Batch:  # pragma: no cover - never mapped
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The driver


def _install(src: Path, target: Path) -> None:
    """Copy folder ``src`` to ``target`` through a temporary sibling and a rename (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    swap_into_place(tmp, target)


def _user_error(exc: BaseException) -> UserInputError | None:
    """The ``UserInputError`` a worker raised, found inside Ray Train's wrappers."""
    seen: list[BaseException] = [exc]
    seen += list(getattr(exc, "worker_failures", {}).values())
    for e in list(seen):
        seen += [x for x in (getattr(e, "_base_exc", None), e.__cause__) if x is not None]
    return next((e for e in seen if isinstance(e, UserInputError)), None)


def train_distributed(
    cfg: Any,
    train_uri_or_records: str | Path | Records,
    out_checkpoint: str | Path,
    *,
    storage_path: str | Path,
    run_name: str,
    init_from: str | Path | None = None,
    fail_once_at: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """Train the DDPM of ``cfg`` on a training set with Ray Train; write ``out_checkpoint``.

    ``cfg``: the whole config tree (``train``, ``model``, ``data``, ``diffusion``). ``init_from``
    (default ``cfg.train.init_from``) is used when ``cfg.train.init == "finetune"``.
    Ray Train's run lives at ``storage_path/run_name``; re-running with the same pair resumes.
    ``fail_once_at=(step, marker_file)``: test hook, rank 0 exits its process once at that step.

    Returns steps, start_step (where this run resumed), loss_first, loss_last, images_per_second
    (training loop only), train_seconds, seconds (wall, driver), workers, batch_size, checkpoint.
    """
    from raycollapse.config import to_yaml
    from raycollapse.diffusion.checkpoint import load_checkpoint, model_meta
    from raycollapse.diffusion.trainer import check_labels

    t0 = time.perf_counter()
    c = _plain(cfg)
    tc, mc, dc = c["train"], c["model"], c["data"]
    workers = int(tc["workers"])
    if workers < 1 or tc["steps"] < 1 or tc["batch_size"] < workers:
        raise UserInputError(
            f"need train.workers >= 1, train.steps >= 1 and train.batch_size >= train.workers; got "
            f"{workers}, {tc['steps']} and {tc['batch_size']}."
        )
    meta = model_meta(_Section(mc), _Section(dc))
    init = None
    if tc["init"] == "finetune":
        init = init_from or tc.get("init_from")
        if not init:
            raise UserInputError("train.init=finetune needs train.init_from (a checkpoint folder).")
        init = str(Path(init).absolute())
        ckpt = load_checkpoint(init, expect=meta)  # refuses a missing or mismatching model now
        if int(ckpt.scheduler.config.num_train_timesteps) != int(
            c["diffusion"]["num_train_timesteps"]
        ):
            raise UserInputError(
                f"checkpoint '{init}' was trained with {ckpt.scheduler.config.num_train_timesteps} diffusion "
                f"steps, not diffusion.num_train_timesteps={c['diffusion']['num_train_timesteps']}."
            )
        del ckpt
    ensure_ray()
    threads = int(tc.get("cpu_threads") or 1)
    check_resources(
        _TrainWorkers(num_cpus=float(threads), num_gpus=1.0 if tc["use_gpu"] else 0.0), workers
    )
    ds, labels, source = training_dataset(train_uri_or_records)
    if len(labels) < workers:
        raise UserInputError(
            f"the training set has {len(labels)} images, fewer than train.workers={workers}."
        )
    check_labels(labels if mc["class_conditional"] else None, class_conditional=mc["class_conditional"],
                 num_classes=mc["num_classes"])  # fmt: skip
    root = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).absolute())
    identity = {"steps": tc["steps"], "batch_size": tc["batch_size"], "workers": workers, "seed": tc["seed"],
                "n": len(labels), "preset": mc["preset"], "init": init}  # fmt: skip
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {
        "cfg": c, "meta": meta, "init_from": init, "yaml": to_yaml(_as_dictconfig(cfg)),
        "data_info": {"source": source, "n": len(labels)}, "fail_once_at": fail_once_at,
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
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        user = _user_error(exc)
        if user is not None:
            raise UserInputError(str(user)) from None
        raise
    out = dict(result.return_value or {})
    if "error" in out:
        raise UserInputError(out["error"])
    with result.checkpoint.as_directory() as d:
        _install(Path(d) / MODEL_DIR, Path(out_checkpoint))
    out.update(
        checkpoint=str(out_checkpoint),
        seconds=time.perf_counter() - t0,
        run=storage.join(root, run_name),
    )
    return out


def _as_dictconfig(cfg: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(_plain(cfg))
