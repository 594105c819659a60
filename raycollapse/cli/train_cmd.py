"""``raycollapse train [--config FILE] [key=value ...]``: train a DDPM and write a checkpoint.

Writes, under ``train.out``:

- ``config.yaml``: the resolved config;
- ``checkpoint/``: the EMA model (see ``raycollapse.diffusion.checkpoint``);
- ``samples.png``: a grid of ``train.sample_grid`` samples from it (the ``sample`` settings);
- ``train_state.pt`` while training (every ``train.checkpoint_every`` steps); a re-run of the same
  command resumes from it, and it is removed once the checkpoint is written.

With ``train.launcher=ray`` (``auto``: ``train.workers=W > 1`` or ``train.use_gpu=true``) training runs on Ray Train
(``raycollapse.stages.train``: ``TorchTrainer``, DDP, one Ray Data shard per worker, checkpoints
every ``train.checkpoint_every`` steps under ``train.out/ray``; re-running resumes from them).
One worker on a CPU runs in this process: the same ``train_loop``, no Ray start-up.

Prints one JSON object on stdout (``steps``, ``loss_first``, ``loss_last``, ``images_per_second``,
``checkpoint``, ``seconds``, ...); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from raycollapse.cli.common import add_overwrite_arg, config_from_args, prepare_output, print_result
from raycollapse.cli.main import add_config_args
from raycollapse.config import to_dict, to_yaml

# train.* keys that do not change the trained model (a re-run with other values resumes)
_NOT_RESULT = ("out", "log_every", "checkpoint_every", "cpu_threads", "max_failures", "sample_grid")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a DDPM on a data source and write a checkpoint",
        description="Train a diffusers UNet2DModel DDPM (model.preset) on data.source; write train.out/checkpoint.",
    )
    p.add_argument("--out", default=None, help="output folder (shorthand for train.out)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (train.steps)")
    add_overwrite_arg(p)
    add_config_args(p)
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def signature(cfg) -> dict:
    """Everything that determines the trained model: the data, model, diffusion and train
    config (less the keys that only steer logging and checkpoint frequency) and checksums of
    the data files and of the fine-tuning base. A re-run resumes ``train.out`` only when equal."""
    from raycollapse.io.outputs import fingerprint

    c = to_dict(cfg)
    train = {k: v for k, v in c["train"].items() if k not in _NOT_RESULT}
    return {
        "data": c["data"], "model": c["model"], "diffusion": c["diffusion"], "train": train,
        "data_checksum": fingerprint(c["data"]["path"]) if c["data"]["path"] else None,
        "init_checksum": fingerprint(train["init_from"])
        if train["init"] == "finetune" and train["init_from"] else None,
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from raycollapse.io.outputs import output_guard, write_signature

    cfg = config_from_args(args, {"train.out": args.out, "train.steps": args.steps})
    tc = cfg.train
    sig = signature(cfg)
    prepare_output(str(tc.out), args, inputs=(cfg.data.path, tc.init_from), signature=sig)
    with output_guard(str(tc.out)):
        storage_out = Path(tc.out)
        storage_out.mkdir(parents=True, exist_ok=True)
        write_signature(storage_out, sig)
        return _train(cfg)


def _train(cfg) -> int:
    from raycollapse.config.checks import resolve_launcher
    from raycollapse.data.sources import load_records
    from raycollapse.diffusion.checkpoint import load_finetune_base, model_meta, save_checkpoint
    from raycollapse.diffusion.sampling import (
        resolve_labels,
        sample_images,
        sampling_autocast,
        scheduler_from_config,
    )
    from raycollapse.diffusion.train_parts import resolve_device
    from raycollapse.diffusion.trainer import state_file, train_loop
    from raycollapse.diffusion.unet import build_unet, count_parameters
    from raycollapse.io.grids import save_grid

    t0 = time.perf_counter()
    tc, mc, dc = cfg.train, cfg.model, cfg.data
    if resolve_launcher(tc) == "ray":
        return _run_on_ray(cfg, t0)
    device = resolve_device(tc.use_gpu)
    if tc.cpu_threads is not None:
        import torch

        torch.set_num_threads(tc.cpu_threads)
    meta = model_meta(mc, dc)
    sc = cfg.sample

    def labels_for(ids):
        return resolve_labels(
            ids,
            class_conditional=mc.class_conditional,
            num_classes=mc.num_classes,
            label=sc.label,
            guidance=sc.guidance,
        )

    labels_for(
        np.zeros(1, dtype=np.int64)
    )  # refuse guidance / a bad label before training, not after
    # Build the model first: a preset/resolution mismatch fails before any data is read.
    if tc.init == "finetune":
        ckpt = load_finetune_base(
            tc.init_from, expect=meta, num_train_timesteps=cfg.diffusion.num_train_timesteps
        )
        model, scheduler = ckpt.unet, ckpt.scheduler
    else:
        model = build_unet(
            mc.preset, resolution=dc.resolution, channels=dc.channels,
            class_conditional=mc.class_conditional, num_classes=mc.num_classes, seed=mc.seed,
        )  # fmt: skip
        scheduler = scheduler_from_config(cfg.diffusion)
    records = load_records(dc)
    if records.skipped:
        _log(
            f"skipped {records.skipped} unreadable or too-small images, e.g. {', '.join(records.skipped_names[:3])}"
        )
    _log(
        f"{len(records)} images from {records.source}; {mc.preset}: {count_parameters(model):,} parameters on {device}"
    )

    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    state_path = out / "train_state.pt"
    identity = {"steps": tc.steps, "batch_size": tc.batch_size, "n": len(records), "seed": tc.seed}
    resume, save_state = state_file(state_path, identity)

    def log_progress(state) -> None:
        if tc.log_every > 0 and (state.step % tc.log_every == 0 or state.step == tc.steps):
            loss = float(np.mean(state.losses[-tc.log_every :]))
            lr = state.schedule.get_last_lr()[0]
            _log(f"step {state.step}/{tc.steps} loss {loss:.4f} lr {lr:.2e}")

    ema, result = train_loop(
        model, records.images, records.labels if mc.class_conditional else None,
        noise_scheduler=scheduler, steps=tc.steps, batch_size=tc.batch_size, lr=tc.lr,
        weight_decay=tc.weight_decay, warmup_steps=tc.warmup_steps, ema_decay=tc.ema_decay,
        grad_clip=tc.grad_clip, mixed_precision=tc.mixed_precision, seed=tc.seed,
        class_conditional=mc.class_conditional, num_classes=mc.num_classes, label_dropout=mc.label_dropout,
        device=device, resume=resume, checkpoint=save_state, checkpoint_every=tc.checkpoint_every,
        callbacks=[log_progress], adam_beta1=tc.adam_beta1, adam_beta2=tc.adam_beta2,
        sample_from=tc.sample_from, compile=tc.compile,
    )  # fmt: skip
    ema.copy_to(model)
    model.eval()
    train_meta = {
        **meta,
        "steps": result.steps,
        "data": {"source": records.source, "n": len(records), "skipped": records.skipped},
        "train": to_dict(cfg.train),
        "diffusion": to_dict(cfg.diffusion),
    }
    ckpt_path = save_checkpoint(
        out / "checkpoint", model, scheduler, train_meta, config_yaml=to_yaml(cfg)
    )
    state_path.unlink(missing_ok=True)
    grid = None
    if tc.sample_grid > 0:
        imgs = sample_images(
            model, scheduler, np.arange(tc.sample_grid), seed=sc.seed, sampler=sc.sampler, steps=sc.steps,
            eta=sc.eta, labels_for=labels_for, guidance=sc.guidance, null_label=mc.num_classes if mc.class_conditional else None,
            group_size=sc.group_size, device=device, amp_dtype=sampling_autocast(sc.precision, device),
        )  # fmt: skip
        grid = str(out / "samples.png")
        save_grid(imgs, grid)
    report = {
        "steps": result.steps,
        "loss_first": result.loss_first,
        "loss_last": result.loss_last,
        "loss_window": result.loss_window(),
        "images_per_second": result.images_per_second,
        "train_seconds": result.seconds,
        "seconds": time.perf_counter() - t0,
        "checkpoint": ckpt_path,
        "samples": grid,
        "preset": mc.preset,
        "parameters": count_parameters(model),
        "images": len(records),
        "skipped": records.skipped,
        "device": str(device),
    }
    print_result(report, as_json=True)
    return 0


def _run_on_ray(cfg, t0: float) -> int:
    """Ray Train (DDP over ``train.workers``), resumable from ``train.out/ray``."""
    from raycollapse.data.sources import load_records
    from raycollapse.stages.train import train_distributed

    out = Path(cfg.train.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    res = train_distributed(
        cfg, load_records(cfg.data), out / "checkpoint", storage_path=out / "ray", run_name="train"
    )
    print_result({**res, "seconds": time.perf_counter() - t0}, as_json=True)
    return 0
