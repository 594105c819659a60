"""Model checkpoints: a diffusers pipeline folder plus what raycollapse needs to trust it.

```
<ckpt>/model_index.json           diffusers DDPMPipeline index: DDPMPipeline.from_pretrained(<ckpt>)
<ckpt>/unet/                      UNet2DModel.save_pretrained (config.json + safetensors), EMA weights
<ckpt>/scheduler/                 DDPMScheduler config (the training noise schedule)
<ckpt>/raycollapse.json           preset, resolution, channels, class_conditional, num_classes,
                                  steps, data source, train and diffusion config
<ckpt>/config.yaml                the resolved config of the run that wrote it
<ckpt>/checksums.json             sha256 and size of every other file, verified on load
```

A checkpoint is written to a temporary folder and renamed into place, so a crash never leaves a
half-written one under the final name. ``load_checkpoint`` checks the folder against what the
caller needs (preset, resolution, channels, ...) and refuses a mismatch with a message listing
every mismatching field. Weights are read with safetensors only; the training state file is read
with ``torch.load(weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raycollapse.diffusion.unet import architecture_mismatch, model_class
from raycollapse.errors import UserInputError
from raycollapse.io.atomic import atomic_dir, atomic_path

if TYPE_CHECKING:
    from raycollapse.config.schema import DataConfig, ModelConfig

META_FILE = "raycollapse.json"
CHECKSUMS = "checksums.json"
FORMAT_VERSION = 1
MATCH_FIELDS = ("preset", "resolution", "channels", "class_conditional", "num_classes")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the (EMA) UNet, the training noise scheduler and the metadata."""

    unet: Any  # diffusers.UNet2DModel
    scheduler: Any  # diffusers.DDPMScheduler
    meta: dict[str, Any]
    path: str

    @property
    def null_label(self) -> int | None:
        return int(self.meta["num_classes"]) if self.meta.get("class_conditional") else None


def model_meta(model_cfg: ModelConfig, data_cfg: DataConfig) -> dict[str, Any]:
    """The fields a checkpoint must match, from the ``model`` and ``data`` config sections."""
    return {
        "preset": str(model_cfg.preset),
        "resolution": int(data_cfg.resolution),
        "channels": int(data_cfg.channels),
        "class_conditional": bool(model_cfg.class_conditional),
        "num_classes": int(model_cfg.num_classes),
    }


def save_checkpoint(
    folder: str | Path,
    unet: Any,
    scheduler: Any,
    meta: dict[str, Any],
    *,
    config_yaml: str | None = None,
) -> str:
    """Write ``unet`` (pass the EMA weights) and ``scheduler`` with ``meta`` atomically; the path."""
    from diffusers import DDPMPipeline

    missing = [k for k in MATCH_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    target = Path(folder)
    with atomic_dir(target) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        (tmp / META_FILE).write_text(
            json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, default=str)
        )
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        (tmp / CHECKSUMS).write_text(json.dumps(_checksums(tmp), indent=1, sort_keys=True))
    return str(target)


def _checksums(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file of a checkpoint folder."""
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != CHECKSUMS:
            h = hashlib.sha256()
            with f.open("rb") as src:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
            out[f.relative_to(root).as_posix()] = {
                "bytes": f.stat().st_size,
                "sha256": h.hexdigest(),
            }
    return out


def verify_checksums(folder: str | Path) -> None:
    """Refuse a checkpoint whose files differ from its ``checksums.json`` (a missing, truncated
    or changed file), naming the file. A checkpoint written before checksums existed (no such
    file) is not checked."""
    root = Path(folder)
    listed = root / CHECKSUMS
    if not listed.is_file():
        return
    try:
        want = json.loads(listed.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"'{listed}' is damaged ({exc}); the checkpoint cannot be trusted."
        ) from None
    got = _checksums(root)
    for rel, entry in sorted(want.items()):
        found = got.get(rel)
        if found != entry:
            what = (
                "is missing"
                if found is None
                else (
                    "is truncated or extended"
                    if found["bytes"] != entry["bytes"]
                    else "does not match its checksum"
                )
            )
            raise UserInputError(
                f"checkpoint '{root}': file '{rel}' {what} (corrupt or changed since it was "
                "written); restore the checkpoint or train it again."
            )


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``raycollapse.json`` of a checkpoint folder, with clear errors for a missing or foreign one."""
    root = Path(folder)
    if not root.exists():
        raise UserInputError(
            f"checkpoint '{root}' does not exist; pass a folder written by `raycollapse train`."
        )
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise UserInputError(
            f"'{root}' is not a raycollapse checkpoint (no {META_FILE}); pass a folder written by `raycollapse train`."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"'{meta_path}' is not valid JSON ({exc}); the checkpoint is damaged."
        ) from None
    missing = [k for k in MATCH_FIELDS if k not in meta]
    if missing:
        raise UserInputError(
            f"'{meta_path}' lacks {', '.join(missing)}; the checkpoint is damaged or too old."
        )
    return meta


def check_match(meta: dict[str, Any], expect: dict[str, Any] | None, path: str) -> None:
    """Refuse a checkpoint whose fields differ from ``expect``, listing each difference."""
    if not expect:
        return
    fields = [k for k in MATCH_FIELDS if k in expect and expect[k] is not None]
    if not meta.get("class_conditional") and not expect.get("class_conditional"):
        fields = [k for k in fields if k != "num_classes"]  # irrelevant without classes
    diffs = [
        f"{k} is {meta.get(k)!r} (requested {expect[k]!r})"
        for k in fields
        if meta.get(k) != expect[k]
    ]
    if diffs:
        raise UserInputError(
            f"checkpoint '{path}' does not match the requested model: {'; '.join(diffs)}. "
            "Use a checkpoint trained with these settings, or change the config to match it."
        )


def load_checkpoint(
    folder: str | Path, *, expect: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a checkpoint (safetensors only) after checking it against ``expect`` (see ``model_meta``)."""
    from diffusers import DDPMScheduler

    root = Path(folder)
    meta = read_meta(root)
    check_match(meta, expect, str(root))
    cls = model_class(meta["preset"])
    # else diffusers takes a missing folder for the name of a hub repository
    for part in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (root / part).is_file():
            raise UserInputError(
                f"checkpoint '{root}' lacks {part}; the checkpoint is incomplete "
                "(restore it or train it again)."
            )
    try:
        unet = cls.from_pretrained(root / "unet", use_safetensors=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    except (OSError, ValueError) as exc:
        verify_checksums(root)  # a damaged file, named, explains the failure best
        raise UserInputError(f"cannot load the model in checkpoint '{root}': {exc}") from None
    mismatch = architecture_mismatch(unet, meta)
    if mismatch:
        raise UserInputError(
            f"checkpoint '{root}': unet/config.json ({mismatch}) does not match its "
            f"{META_FILE} (preset {meta['preset']}, resolution {meta['resolution']}, channels {meta['channels']})."
        )
    verify_checksums(root)  # last: a mismatch found above says more than a checksum
    unet.to(device).eval()
    return Checkpoint(unet=unet, scheduler=scheduler, meta=meta, path=str(root))


def load_finetune_base(
    folder: str | Path | None, *, expect: dict[str, Any], num_train_timesteps: int
) -> Checkpoint:
    """The checkpoint ``train.init=finetune`` starts from, after checking that it can be continued.

    It must be given and exist, match ``expect`` (``model_meta`` of the config) and have been
    trained with ``num_train_timesteps`` diffusion steps (``diffusion.num_train_timesteps``).
    """
    if not folder:
        raise UserInputError("train.init=finetune needs train.init_from (a checkpoint folder).")
    ckpt = load_checkpoint(folder, expect=expect)
    trained_with = int(ckpt.scheduler.config.num_train_timesteps)
    if trained_with != int(num_train_timesteps):
        raise UserInputError(
            f"checkpoint '{folder}' was trained with {trained_with} diffusion steps, not "
            f"diffusion.num_train_timesteps={num_train_timesteps}."
        )
    return ckpt


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training state (tensors, numbers, strings, nested dicts/lists) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``: plain data and tensors, never code."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise UserInputError(
            f"cannot read training state '{path}': {exc}; delete it to start over."
        ) from None
