"""Training the DDPM: optimiser, warmup + cosine learning rate, EMA, mixed precision, clipping.

A function API, no trainer class, so that the same pieces run in one process (``raycollapse
train``) and inside a Ray Train worker (the stages layer wraps the model in DDP and calls
``train_step`` itself). Nothing here imports Ray.

The objective is the epsilon-prediction loss of Ho et al. 2020 (``diffusion.diffusion_loss``).
Mixed precision is autocast on CUDA only (``auto`` = bf16 where supported, else fp32); on the CPU
training is fp32. Asking for a GPU or a half-precision mode without CUDA is an error, never a
silent fallback.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raycollapse.diffusion.sampling import diffusion_loss, images_to_tensor
from raycollapse.errors import UserInputError


def resolve_device(use_gpu: bool, key: str = "train.use_gpu") -> torch.device:
    """``cuda`` when asked for (by config ``key``) and present; asking without CUDA is an error."""
    if use_gpu:
        if not torch.cuda.is_available():
            raise UserInputError(
                f"{key}=true but CUDA is not available on this machine; set {key}=false or run on a GPU node."
            )
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.mixed_precision`` on ``device``; ``None`` means fp32."""
    if mixed_precision == "no":
        return None
    if device.type != "cuda":
        if mixed_precision == "auto":
            return None  # CPU autocast is slower than fp32 for these convolutions
        raise UserInputError(
            f"train.mixed_precision={mixed_precision} needs CUDA; on the CPU use 'auto' or 'no' (fp32)."
        )
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # auto on a GPU without bf16: fp32 (fp16 needs loss scaling; ask for it explicitly)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW over all trainable parameters."""
    if lr <= 0:
        raise UserInputError(f"train.lr must be > 0, got {lr}.")
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    Warmup starts at ``1 / warmup_steps`` rather than 0 so that no step is wasted.
    """
    warmup = max(0, int(warmup_steps))
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a model's weights (the weights that get sampled from).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run is
    not dominated by the random initial weights. Works on a DDP-wrapped model (uses ``.module``).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise UserInputError(f"train.ema_decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in _unwrap(model).parameters()]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        params = [p.detach().float() for p in _unwrap(model).parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (for sampling or saving)."""
        for s, p in zip(self.shadow, _unwrap(model).parameters(), strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = [t.clone().float() for t in state["shadow"]]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def check_labels(labels: np.ndarray | None, *, class_conditional: bool, num_classes: int) -> None:
    """A class-conditional model needs a label in ``[0, num_classes)`` for every image."""
    if not class_conditional:
        return
    if labels is None or (labels < 0).any():
        missing = "all" if labels is None else str(int((labels < 0).sum()))
        raise UserInputError(
            f"model.class_conditional=true but {missing} training images have no label; use a labelled "
            "source (digits, cifar10, parquet with a label column) or set model.class_conditional=false."
        )
    if labels.size and labels.max() >= num_classes:
        raise UserInputError(
            f"labels go up to {int(labels.max())} but model.num_classes={num_classes}; labels must be in "
            f"0..{num_classes - 1}. Raise model.num_classes or fix the labels."
        )


class IndexStream:
    """An endless stream of seeded epoch permutations of ``range(n)``, read ``batch_size`` at a time.

    A batch may span an epoch boundary, so a batch can be larger than the data set.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise UserInputError(
                "the training set is empty; check data.source / data.path / data.n."
            )
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.buffer = np.zeros(0, dtype=np.int64)

    def next(self, batch_size: int) -> np.ndarray:
        while len(self.buffer) < batch_size:
            self.buffer = np.concatenate([self.buffer, self.rng.permutation(self.n)])
        out, self.buffer = self.buffer[:batch_size], self.buffer[batch_size:]
        return out


def train_step(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    noise_scheduler: Any,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    grad_clip: float | None = 1.0,
    amp_dtype: torch.dtype | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One optimisation step on a batch ``x0`` (float, ``N x C x H x W`` in [-1, 1]); the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = x0.device.type
    with torch.autocast(
        device_type=device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        loss = diffusion_loss(
            model,
            noise_scheduler,
            x0,
            labels,
            generator=generator,
            label_dropout=label_dropout,
            null_label=null_label,
        )
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    if lr_schedule is not None:
        lr_schedule.step()
    if ema is not None:
        ema.update(model)
    return float(loss.detach())


@dataclass
class TrainResult:
    """What a training run reports (``raycollapse train`` prints it as JSON)."""

    steps: int
    losses: list[float] = field(repr=False)
    seconds: float
    images_per_second: float

    def loss_window(self) -> int:
        """Losses are averaged over this many steps at each end (single-step losses are noisy)."""
        return max(1, min(50, len(self.losses) // 10))

    @property
    def loss_first(self) -> float:
        return float(np.mean(self.losses[: self.loss_window()])) if self.losses else float("nan")

    @property
    def loss_last(self) -> float:
        return float(np.mean(self.losses[-self.loss_window() :])) if self.losses else float("nan")


def train_loop(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    noise_scheduler: Any,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    ema_decay: float = 0.999,
    grad_clip: float | None = 1.0,
    mixed_precision: str = "auto",
    seed: int = 0,
    class_conditional: bool = False,
    num_classes: int = 10,
    label_dropout: float = 0.0,
    device: torch.device | str = "cpu",
    log_every: int = 100,
    log: Callable[[int, float, float], None] | None = None,
    state_path: str | None = None,
    checkpoint_every: int = 0,
) -> tuple[EMA, TrainResult]:
    """Train ``model`` in place on in-memory uint8 ``images`` (``N x H x W x C``); returns the EMA.

    ``log(step, mean_loss, lr)`` is called every ``log_every`` steps. Copy the EMA weights into a
    model with ``ema.copy_to(model)`` before saving or sampling. With ``state_path``, the full
    training state (weights, EMA, optimiser, schedule, RNGs, losses) is saved there every
    ``checkpoint_every`` steps, and a run that finds one resumes from it: a restarted run ends
    with the same weights as an uninterrupted one.
    """
    if steps < 1 or batch_size < 1:
        raise UserInputError(
            f"train.steps and train.batch_size must be >= 1, got {steps} and {batch_size}."
        )
    device = torch.device(device)
    check_labels(labels, class_conditional=class_conditional, num_classes=num_classes)
    amp = autocast_dtype(mixed_precision, device)
    model.to(device)
    data = images_to_tensor(images, device)
    label_t = (
        torch.as_tensor(labels, dtype=torch.long, device=device) if class_conditional else None
    )
    optimizer = make_optimizer(model, lr, weight_decay)
    schedule = make_lr_schedule(optimizer, warmup_steps, steps)
    ema = EMA(model, ema_decay)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    gen = torch.Generator(device=device).manual_seed(seed)
    stream = IndexStream(len(images), seed)
    losses: list[float] = []
    first = 0
    identity = {"steps": steps, "batch_size": batch_size, "n": len(images), "seed": seed}
    if state_path is not None and os.path.exists(state_path):
        from raycollapse.diffusion.checkpoint import load_training_state

        state = load_training_state(state_path)
        if state.get("identity") != identity:
            raise UserInputError(
                f"training state '{state_path}' belongs to another run ({state.get('identity')} vs {identity}); "
                "delete it or use another train.out."
            )
        _unwrap(model).load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        stream.rng.bit_generator.state = state["stream_rng"]
        stream.buffer = state["stream_buffer"].numpy()
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        losses, first = list(state["losses"]), int(state["step"])
    start = time.perf_counter()
    for step in range(first, steps):
        idx = torch.as_tensor(stream.next(batch_size), device=device)
        loss = train_step(
            model, data[idx], None if label_t is None else label_t[idx],
            noise_scheduler=noise_scheduler, optimizer=optimizer, lr_schedule=schedule, ema=ema,
            generator=gen, label_dropout=label_dropout if class_conditional else 0.0,
            null_label=num_classes if class_conditional else None,
            grad_clip=grad_clip, amp_dtype=amp, grad_scaler=scaler,
        )  # fmt: skip
        if not math.isfinite(loss):
            raise UserInputError(
                f"training diverged at step {step + 1} (loss {loss}); lower train.lr or keep train.grad_clip > 0."
            )
        losses.append(loss)
        if log is not None and log_every > 0 and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(step + 1, float(np.mean(losses[-log_every:])), schedule.get_last_lr()[0])
        if (
            state_path is not None
            and checkpoint_every > 0
            and (step + 1) % checkpoint_every == 0
            and step + 1 < steps
        ):
            from raycollapse.diffusion.checkpoint import save_training_state

            save_training_state(state_path, {
                "identity": identity, "step": step + 1, "model": _unwrap(model).state_dict(),
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "generator": gen.get_state(), "stream_rng": stream.rng.bit_generator.state,
                "stream_buffer": torch.from_numpy(stream.buffer.copy()), "losses": losses,
                "scaler": scaler.state_dict() if scaler is not None else None,
            })  # fmt: skip
    seconds = time.perf_counter() - start
    run_steps = steps - first
    return ema, TrainResult(steps, losses, seconds, run_steps * batch_size / max(seconds, 1e-9))
