"""``raycollapse generate CHECKPOINT --n N --out OUT [...]``: sample images from a trained DDPM.

``OUT`` ending in ``.npy`` gets an ``N x H x W x C`` uint8 array, ``.png`` a sample grid, anything
else a new folder of Parquet shards ``part-<first id>.parquet`` with the records schema
``{id, image (PNG bytes), label, source}``, one shard per ``--batch-size`` samples (rounded up to a
multiple of ``sample.group_size``).

Sample ``i`` depends only on the checkpoint, ``--seed``, ``i`` and the sampler settings (see
``raycollapse.diffusion.sampling``): ``--batch-size`` changes memory use and shard size, not the
samples. Flags are shorthands for ``sample.*`` config keys.

With ``--actors A`` (and ``--gpus-per-actor G``) the samples are made by the Ray Data generation
stage (``raycollapse.stages.generate``) on an actor pool of the current Ray cluster: the same
samples, written as shards ``part-<shard>.parquet`` ``{id, image, label, iteration, seed}``; for
``.npy`` / ``.png`` they are generated into a temporary folder and collected.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from raycollapse.cli.common import add_overwrite_arg, config_from_args, print_result
from raycollapse.cli.main import add_config_args
from raycollapse.config.schema import SAMPLERS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample images from a checkpoint (.npy, .png grid or Parquet shards)",
        description="Sample from a checkpoint written by `raycollapse train` with DDIM or DDPM.",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint folder (train.out/checkpoint)"
    )
    p.add_argument("--n", type=int, default=None, help="number of samples (sample.n)")
    p.add_argument(
        "--out",
        default=None,
        help="OUT.npy, OUT.png or a new folder for Parquet shards (sample.out)",
    )
    p.add_argument("--seed", type=int, default=None, help="pool seed (sample.seed)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per call and per shard (sample.batch_size)",
    )
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help="run on Ray Data with A actors (resources.generate_actors)",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor (resources.generate_gpus_per_actor)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sample.sampler")
    p.add_argument(
        "--steps", type=int, default=None, help="DDIM steps (sample.steps); DDPM uses all"
    )
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (sample.eta)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale w (sample.guidance)",
    )
    p.add_argument("--label", type=int, default=None, help="class of every sample (sample.label)")
    p.add_argument("--gpu", action="store_true", default=None, help="run on CUDA (sample.use_gpu)")
    add_overwrite_arg(p)
    add_config_args(p)
    p.set_defaults(func=run)


def signature(checkpoint: str, cfg) -> dict:
    """What determines the samples of a ``generate`` command: the checkpoint's content and the
    sample settings (``out`` and ``use_gpu`` aside). A re-run resumes its output only when equal."""
    from raycollapse.config import to_dict
    from raycollapse.io.outputs import fingerprint

    sample = {k: v for k, v in to_dict(cfg.sample).items() if k not in ("out", "use_gpu")}
    return {"checkpoint": fingerprint(checkpoint), "sample": sample}


def partial_dir(out: str) -> Path:
    """The hidden folder a Parquet output grows in; renamed to ``out`` once complete, so an
    interrupted command never leaves a folder that looks finished (a re-run resumes it)."""
    p = Path(out)
    return p.with_name(f".{p.name}.partial")


def _prepare(out: str, args: argparse.Namespace, cfg, sig: dict) -> Path | None:
    """Check ``out`` before any work; for Parquet, the folder to write shards into (the
    partial folder, made ready with ``sig``), or None when ``out`` already holds this work."""
    from raycollapse.cli.common import prepare_output
    from raycollapse.io.outputs import clear_output, read_signature, write_signature

    if prepare_output(out, args, inputs=(args.checkpoint,), signature=sig):
        return None  # out is complete with the same signature (resume of finished work)
    if out.endswith((".npy", ".png")):
        return None
    work = partial_dir(out)
    if work.exists() and read_signature(work) != sig:
        clear_output(work)  # our own leftover of other work
    work.mkdir(parents=True, exist_ok=True)
    write_signature(work, sig)
    return work


def _writer(out: str, work: Path | None):
    """``(kind, write(ids, images, labels, source) or None, finish(all_images) or None,
    done(ids) -> bool)`` for an OUT path; Parquet shards go to ``work``."""
    from raycollapse.io.atomic import atomic_path
    from raycollapse.io.grids import save_grid

    def never(ids: np.ndarray) -> bool:
        return False

    if out.endswith(".npy"):

        def finish(images: np.ndarray) -> None:
            with atomic_path(out) as tmp:
                np.save(tmp, images)

        return "npy", None, finish, never
    if out.endswith(".png"):

        def finish_png(images: np.ndarray) -> None:
            with atomic_path(out) as tmp:
                save_grid(images, str(tmp))

        return "png", None, finish_png, never
    import pyarrow.parquet as pq

    from raycollapse.data.records import Records
    from raycollapse.io.storage import write_parquet_atomic

    folder = work if work is not None else Path(out)

    def shard(ids: np.ndarray) -> Path:
        return folder / f"part-{int(ids[0]):08d}.parquet"

    def done(ids: np.ndarray) -> bool:
        """A shard written before (an interrupted run of the same work) is kept."""
        try:
            return pq.read_metadata(shard(ids)).num_rows == len(ids)
        except (OSError, ValueError):
            return False

    def write(ids: np.ndarray, images: np.ndarray, labels: np.ndarray | None, source: str) -> None:
        lab = np.full(len(ids), -1, dtype=np.int64) if labels is None else labels
        table = Records(ids.astype(np.int64), images, lab, source).to_arrow_table()
        write_parquet_atomic(table, str(shard(ids)))

    return "parquet", write, None, done


def _install(work: Path | None, out: str) -> None:
    """Rename the complete partial folder onto ``out`` (its signature travels with it)."""
    import os

    if work is not None and not out.endswith((".npy", ".png")):
        os.replace(work, out)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(
        args,
        {
            "sample.n": args.n, "sample.out": args.out, "sample.seed": args.seed,
            "sample.batch_size": args.batch_size, "sample.sampler": args.sampler, "sample.steps": args.steps,
            "sample.eta": args.eta, "sample.guidance": args.guidance, "sample.label": args.label,
            "sample.use_gpu": args.gpu, "resources.generate_actors": args.actors,
            "resources.generate_gpus_per_actor": args.gpus_per_actor,
        },
    )  # fmt: skip
    from raycollapse.diffusion.checkpoint import read_meta
    from raycollapse.io.outputs import output_guard

    sc = cfg.sample
    read_meta(args.checkpoint)  # a missing or foreign checkpoint is refused first
    out = str(sc.out)
    work = _prepare(out, args, cfg, signature(args.checkpoint, cfg))
    with output_guard(out):
        if args.actors is not None or args.gpus_per_actor is not None:
            return _run_on_ray(args.checkpoint, cfg, work)
        return _generate(args, cfg, work)


def _generate(args: argparse.Namespace, cfg, work: Path | None) -> int:
    sc = cfg.sample
    from raycollapse.diffusion.checkpoint import load_checkpoint
    from raycollapse.diffusion.sampling import (
        resolve_labels,
        sample_images,
        sampling_autocast,
        sampling_network,
        sampling_scheduler,
    )
    from raycollapse.diffusion.train_parts import resolve_device

    device = resolve_device(sc.use_gpu, "sample.use_gpu (--gpu)")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.checkpoint, device=device)
    meta = ckpt.meta

    def labels_for(ids: np.ndarray) -> np.ndarray | None:
        return resolve_labels(
            ids, class_conditional=bool(meta["class_conditional"]), num_classes=int(meta["num_classes"]),
            label=sc.label, guidance=sc.guidance,
        )  # fmt: skip

    labels_for(np.zeros(1, dtype=np.int64))  # refuse guidance / label problems before any work
    amp = sampling_autocast(sc.precision, device)
    net = sampling_network(ckpt.unet, device, sc.compile)
    steps = sampling_scheduler(ckpt.scheduler, sc.sampler, sc.steps).timesteps.numel()
    kind, write, finish, done = _writer(str(sc.out), work)
    # Calls hold whole aligned groups, so no group is evaluated twice: batch_size rounds up to them.
    per_call = -(-sc.batch_size // sc.group_size) * sc.group_size
    source = f"generated:{Path(args.checkpoint).name}"
    chunks: list[np.ndarray] = []
    for start in range(0, sc.n, per_call):
        ids = np.arange(start, min(sc.n, start + per_call), dtype=np.int64)
        if done(ids):
            continue
        imgs = sample_images(
            net, ckpt.scheduler, ids, seed=sc.seed, sampler=sc.sampler, steps=sc.steps, eta=sc.eta,
            labels_for=labels_for, guidance=sc.guidance, null_label=ckpt.null_label,
            group_size=sc.group_size, device=device, amp_dtype=amp,
        )  # fmt: skip
        if write is not None:
            write(ids, imgs, labels_for(ids), source)
        else:
            chunks.append(imgs)
        print(f"[generate] {ids[-1] + 1}/{sc.n} samples", file=sys.stderr, flush=True)
    if finish is not None:
        finish(np.concatenate(chunks))
    _install(work, str(sc.out))
    seconds = time.perf_counter() - t0
    report = {
        "n": sc.n,
        "out": str(sc.out),
        "format": kind,
        "sampler": sc.sampler,
        "steps": int(steps),
        "eta": sc.eta,
        "guidance": sc.guidance,
        "label": sc.label,
        "seed": sc.seed,
        "seconds": seconds,
        "seconds_per_image": seconds / sc.n,
        "checkpoint": ckpt.path,
    }
    print_result(report, as_json=True)
    return 0


def _run_on_ray(checkpoint: str, cfg, work: Path | None) -> int:
    """The Ray Data generation stage: same samples, actor pool, atomic shards."""
    import tempfile

    from raycollapse.io.grids import save_grid
    from raycollapse.io.parquet import read_images
    from raycollapse.stages.generate import generate_pool

    sc, res = cfg.sample, cfg.resources
    out = str(sc.out)
    kwargs = dict(
        seed=sc.seed, sample_cfg=sc, actors=res.generate_actors, gpus_per_actor=res.generate_gpus_per_actor,
        cpus_per_actor=res.cpus_per_actor, shard_size=sc.batch_size,
    )  # fmt: skip
    if out.endswith((".npy", ".png")):
        with tempfile.TemporaryDirectory(prefix="raycollapse-generate-") as tmp:
            metrics = generate_pool(checkpoint, tmp, sc.n, **kwargs)
            from raycollapse.diffusion.checkpoint import read_meta

            _, images, _ = read_images(tmp, int(read_meta(checkpoint)["channels"]))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if out.endswith(".npy"):
            from raycollapse.io.atomic import atomic_path

            with atomic_path(out) as t:
                np.save(t, images)
        else:
            save_grid(images, out)
    else:
        metrics = generate_pool(checkpoint, str(work or out), sc.n, **kwargs)
        _install(work, out)
        metrics["out"] = out
    print_result(
        {**metrics, "out": out, "format": Path(out).suffix.lstrip(".") or "parquet"}, as_json=True
    )
    return 0
