"""Training in the calling process (``train.launcher=process``, or ``auto`` with one CPU worker).

Ray Train's ``TorchTrainer.fit`` starts a controller, a worker group and a dataset split
coordinator, each a new Python process that imports torch (and diffusers): about 20 s per call on
a laptop, before and after a training run that may itself take seconds (the MoG laboratory, the
quickstart, every test). One worker needs none of it: this module runs the same core
``train_loop`` here, on the same data in the same order with the same seed as Ray Train's rank 0
(``rank_seed(seed, 0)``, the shard sorted by id, ``cpu_threads or 1`` torch threads, the Ray
worker's default), so the weights, losses and checkpoint it writes are those of
``train.launcher=ray`` with ``train.workers=1``, bit for bit (tested).

Resume: every ``train.checkpoint_every`` steps the state goes to ``<storage_path>/<run_name>/
train_state.pt`` (with the run's identity: another training's state is refused); a re-run resumes
from it, and it is removed once the model is installed.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raycollapse.config.checks import resolve_launcher
from raycollapse.data.records import Records
from raycollapse.data.vectors import VECTOR_COLUMN
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.atomic import install_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig

STATE_FILE = "train_state.pt"


def read_training_set(
    source: str | Path | Records, data: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, bool]:
    """``(ids, images or vectors, labels with -1, source name, vector data?)`` of a whole training
    set, sorted by id: what ``read_shard`` gives Ray Train's only worker, read here with pyarrow."""
    from raycollapse.stages.train_data import (
        _check_columns,
        _normalise,
        batch_to_arrays,
        training_files,
    )

    if isinstance(source, Records):
        order = np.argsort(source.ids, kind="stable")
        return source.ids[order], source.images[order], source.labels[order], source.source, False
    files = training_files(source)
    value, _ = _check_columns(files, source)
    parts = []
    for f in files:
        table = storage.read_parquet(f)
        table = table.select([c for c in ("id", value, "label") if c in table.column_names])
        parts.append(batch_to_arrays(_normalise(table), data))
    parts = [p for p in parts if len(p[0])] or parts[:1]  # an empty part has no vector width
    ids = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    order = np.argsort(ids, kind="stable")
    return ids[order], values[order], labels[order], str(source), value == VECTOR_COLUMN


def count_rows(source: str | Path | Records) -> int:
    """Rows of a training set: ``len`` of Records, or the Parquet footers' counts."""
    import pyarrow.parquet as pq

    if isinstance(source, Records):
        return len(source.ids)
    from raycollapse.stages.train_data import training_files

    total = 0
    for f in training_files(source):
        fs, path = storage.open_fs(f)
        total += pq.read_metadata(path, filesystem=fs).num_rows
    return total


def choose_launcher(cfg: DictConfig, source: str | Path | Records) -> str:
    """``ray`` or ``process`` for training ``cfg`` on ``source``: ``train.launcher``, where
    ``auto`` picks process for one CPU worker whose decoded set fits ``train.in_memory_gb``."""
    from raycollapse.stages.train_data import shard_bytes

    launcher = resolve_launcher(cfg.train)
    if launcher == "process" and cfg.train.launcher == "auto":
        too_large = shard_bytes(count_rows(source), 1, cfg.data) > cfg.train.in_memory_gb * 1e9
        return "ray" if too_large else launcher
    return launcher


def run_training(
    cfg: DictConfig,
    source: str | Path | Records,
    out_checkpoint: str | Path,
    *,
    storage_path: str | Path,
    run_name: str,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train with the launcher ``train.launcher`` names: :func:`train_in_process` or Ray Train's
    :func:`~raycollapse.stages.train.train_distributed`. ``auto`` trains one CPU worker here while
    its decoded training set fits ``train.in_memory_gb``; a larger one streams through Ray Train."""
    from raycollapse.stages.train import train_distributed

    train = train_in_process if choose_launcher(cfg, source) == "process" else train_distributed
    return train(cfg, source, out_checkpoint, storage_path=storage_path, run_name=run_name,
                 init_from=init_from)  # fmt: skip


def _load_state(uri: str) -> dict[str, Any] | None:
    from raycollapse.diffusion.checkpoint import load_training_state

    if not storage.exists(uri):
        return None
    if "://" not in uri:
        return load_training_state(uri)
    import torch

    fs, path = storage.open_fs(uri)
    with fs.open_input_stream(path) as f:
        blob = f.read()
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # the same refusal as load_training_state's, for a URI
        raise UserInputError(
            f"cannot read training state '{uri}': {exc}; delete it to start over."
        ) from None


def _save_state(uri: str, state: dict[str, Any]) -> None:
    import torch

    from raycollapse.diffusion.checkpoint import save_training_state

    if "://" not in uri:
        save_training_state(uri, state)
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def train_in_process(
    cfg: DictConfig,
    source: str | Path | Records,
    out_checkpoint: str | Path,
    *,
    storage_path: str | Path,
    run_name: str,
    init_from: str | Path | None = None,
    callbacks: Sequence[Callable[[Any], None]] = (),
) -> dict[str, Any]:
    """Train the DDPM of ``cfg`` here, as Ray Train's single worker would; write ``out_checkpoint``.

    Same arguments and result keys as :func:`raycollapse.stages.train.train_distributed`
    (``workers`` is 1); ``storage_path/run_name`` holds the resumable state.
    """
    import torch

    from raycollapse.config import to_dict, to_yaml
    from raycollapse.diffusion.checkpoint import load_finetune_base, model_meta, save_checkpoint
    from raycollapse.diffusion.sampling import make_scheduler
    from raycollapse.diffusion.train_parts import check_labels, resolve_device
    from raycollapse.diffusion.trainer import TrainingDiverged, train_loop
    from raycollapse.diffusion.unet import build_unet
    from raycollapse.io.outputs import fingerprint
    from raycollapse.stages.train_data import rank_seed, shard_bytes

    t0 = time.perf_counter()
    c = to_dict(cfg)
    tc, mc, dc, diff = c["train"], c["model"], c["data"], c["diffusion"]
    if int(tc["workers"]) != 1 or tc["steps"] < 1 or tc["batch_size"] < 1:
        raise UserInputError(
            f"in-process training needs train.workers=1, train.steps >= 1 and train.batch_size >= 1; "
            f"got {tc['workers']}, {tc['steps']} and {tc['batch_size']}."
        )
    device = resolve_device(bool(tc["use_gpu"]))
    meta = model_meta(cfg.model, cfg.data)
    init = None
    if tc["init"] == "finetune":
        init = init_from or tc.get("init_from")
        init = str(Path(init).absolute()) if init else None
        base = load_finetune_base(
            init, expect=meta, num_train_timesteps=diff["num_train_timesteps"]
        )
    if shard_bytes(count_rows(source), 1, dc) > float(tc["in_memory_gb"]) * 1e9:
        raise UserInputError(
            f"the training set is larger than train.in_memory_gb={tc['in_memory_gb']} decoded; "
            "train.launcher=process holds it in memory. Use train.launcher=ray or auto (Ray Train "
            "streams it), or raise train.in_memory_gb."
        )
    ids, values, labels, source_name, vector = read_training_set(source, dc)
    if len(ids) < 1:
        raise UserInputError(f"the training set '{source_name}' has no images.")
    cond = bool(mc["class_conditional"])
    check_labels(labels if cond else None, class_conditional=cond, num_classes=mc["num_classes"])
    root = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).absolute())
    identity = {"steps": tc["steps"], "batch_size": tc["batch_size"], "workers": 1, "seed": tc["seed"],
                "n": len(ids), "preset": mc["preset"], "launcher": "process",
                "init": fingerprint(init) if init else None}  # fmt: skip
    state_uri = storage.join(root, run_name, STATE_FILE)
    resume = _load_state(state_uri)
    if resume is not None:
        found = resume.pop("identity", None)
        if found != identity:
            raise UserInputError(
                f"training state '{state_uri}' belongs to another training ({found} vs {identity}); "
                "pass another run name, or delete it to start over."
            )
    if init is not None:
        model, scheduler = base.unet, base.scheduler
    else:
        model = build_unet(mc["preset"], resolution=dc["resolution"], channels=dc["channels"],
                           class_conditional=cond, num_classes=mc["num_classes"], seed=mc["seed"],
                           dim=values.shape[1] if vector else None)  # fmt: skip
        scheduler = make_scheduler(diff["num_train_timesteps"], diff["beta_start"], diff["beta_end"],
                                   diff["beta_schedule"])  # fmt: skip
    model = model.to(device)

    def save(state: Any, final: bool) -> None:
        if not final:
            _save_state(state_uri, {"identity": identity, **state.state_dict()})

    steps, batch = int(tc["steps"]), int(tc["batch_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(int(tc.get("cpu_threads") or 1))  # what a 1-CPU Ray Train worker uses
    try:
        ema, res = train_loop(
            model, values, labels if cond else None, noise_scheduler=scheduler, steps=steps,
            batch_size=batch, lr=tc["lr"], weight_decay=tc["weight_decay"],
            warmup_steps=tc["warmup_steps"], ema_decay=tc["ema_decay"], grad_clip=tc["grad_clip"],
            mixed_precision=tc["mixed_precision"], seed=rank_seed(tc["seed"], 0),
            class_conditional=cond, num_classes=mc["num_classes"], label_dropout=mc["label_dropout"],
            device=device, resume=resume, checkpoint=save, checkpoint_every=int(tc["checkpoint_every"]),
            callbacks=list(callbacks), adam_beta1=tc["adam_beta1"], adam_beta2=tc["adam_beta2"],
            sample_from=tc["sample_from"], compile=bool(tc["compile"]),
        )  # fmt: skip
    except TrainingDiverged as exc:
        raise UserInputError(str(exc)) from None
    finally:
        torch.set_num_threads(threads)
    ema.copy_to(model)
    meta = {**meta, "steps": steps, "workers": 1, "data": {"source": source_name, "n": len(ids)},
            "train": tc, "diffusion": diff}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / "model", model, scheduler, meta, config_yaml=to_yaml(cfg))
        install_dir(Path(d) / "model", Path(out_checkpoint))
    if storage.exists(state_uri):
        fs, path = storage.open_fs(state_uri)
        fs.delete_file(path)
    return {
        "steps": steps, "start_step": res.start_step, "loss_first": res.loss_first,
        "loss_last": res.loss_last, "train_seconds": res.seconds,
        "images_per_second": (steps - res.start_step) * batch / max(res.seconds, 1e-9),
        "workers": 1, "batch_size": batch, "checkpoint": str(out_checkpoint),
        "seconds": time.perf_counter() - t0, "run": storage.join(root, run_name),
    }  # fmt: skip
