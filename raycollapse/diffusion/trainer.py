"""Training the DDPM: the training step, the training state, and the training loop.

One training loop for any world size (``train_loop``): ``raycollapse train`` calls it in its own
process, and each Ray Train worker calls it with its rank's seed, its share of the batch, a loss
all-reduce and a checkpoint callback (``raycollapse.stages.train``). Nothing here imports Ray.

The objective is the epsilon-prediction loss of Ho et al. 2020 (``diffusion.diffusion_loss``);
optimiser, schedule, EMA, precision and the index stream are in ``diffusion.train_parts``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycollapse.diffusion.checkpoint import load_training_state, save_training_state
from raycollapse.diffusion.sampling import diffusion_loss, images_to_tensor
from raycollapse.diffusion.train_parts import (
    EMA,
    IndexStream,
    autocast_dtype,
    channels_last_on_cuda,
    check_labels,
    forward_network,
    make_lr_schedule,
    make_optimizer,
    unwrap_model,
)
from raycollapse.errors import UserInputError


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


class TrainingDiverged(UserInputError):
    """The loss became NaN or infinite; no retry would help (lower the learning rate)."""


# The per-rank part of a training state: each Ray Train worker saves its own (see stages/train.py).
RANK_KEYS = ("generator", "stream_rng", "stream_buffer")


@dataclass
class TrainState:
    """The live objects of a training run; ``state_dict()`` is what a checkpoint stores.

    ``step`` counts the steps done; ``losses[i]`` is the (all-reduced) loss of step ``i + 1``.
    """

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    stream: IndexStream
    losses: list[float] = field(default_factory=list, repr=False)
    step: int = 0
    rank_keys: tuple[str, ...] = RANK_KEYS

    def state_dict(self) -> dict[str, Any]:
        """Weights, EMA, optimiser, schedule, scaler, losses and (``RANK_KEYS``) the RNG states."""
        return {
            "step": self.step, "model": unwrap_model(self.model).state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "losses": self.losses, "generator": self.generator.get_state(), **self.stream_state(),
        }  # fmt: skip

    def stream_state(self) -> dict[str, Any]:
        """The index stream's part of ``state_dict()`` (per rank, with ``generator``)."""
        return {
            "stream_rng": self.stream.rng.bit_generator.state,
            "stream_buffer": torch.from_numpy(self.stream.buffer.copy()),
        }

    def load_stream(self, state: dict[str, Any]) -> None:
        self.stream.rng.bit_generator.state = state["stream_rng"]
        self.stream.buffer = state["stream_buffer"].numpy()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; without ``RANK_KEYS`` the fresh RNG streams are kept."""
        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.losses, self.step = [float(x) for x in state["losses"]], int(state["step"])
        if all(k in state for k in self.rank_keys):
            self.generator.set_state(state["generator"])
            self.load_stream(state)


StepCallback = Callable[[TrainState], None]
CheckpointCallback = Callable[[TrainState, bool], None]


@dataclass
class TrainResult:
    """What a training run reports (``raycollapse train`` prints it as JSON)."""

    steps: int
    losses: list[float] = field(repr=False)
    seconds: float
    images_per_second: float
    start_step: int = 0

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
    resume: dict[str, Any] | None = None,
    checkpoint: CheckpointCallback | None = None,
    checkpoint_every: int = 0,
    all_reduce_loss: Callable[[float], float] | None = None,
    callbacks: Sequence[StepCallback] = (),
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    sample_from: str = "ema",
    compile: bool | str = False,
) -> tuple[EMA, TrainResult]:
    """Train ``model`` in place on in-memory uint8 ``images`` (``N x H x W x C``); returns the EMA.

    The same loop for one process and for each Ray Train worker; what depends on the rank comes in
    as arguments: ``seed`` (the noise generator and the ``IndexStream`` of batch indices),
    ``batch_size`` (this worker's share), ``all_reduce_loss`` (the loss averaged over the workers,
    so that every rank takes the same decisions; ``None`` in one process).

    ``resume``: a ``TrainState.state_dict()`` to continue from. ``checkpoint(state, final)`` is
    called every ``checkpoint_every`` steps before the last (``final=False``) and once after the
    last step (``final=True``, not when ``resume`` was already complete). Each of ``callbacks``
    is called with the state after every step. A non-finite loss raises ``TrainingDiverged``.
    Copy the EMA weights into a model with ``ema.copy_to(model)`` before saving or sampling.
    ``adam_beta1`` / ``adam_beta2``: AdamW's betas; ``sample_from``: ``ema`` or ``raw`` (the EMA
    is then disabled and ``copy_to`` keeps the trained weights; train.sample_from).
    ``compile``: run the steps through ``torch.compile(model)`` (train.compile). On CUDA an image
    network trains in channels-last memory format (``channels_last_on_cuda``).
    """
    if sample_from not in ("ema", "raw"):
        raise UserInputError(f"train.sample_from must be ema or raw, got {sample_from!r}.")
    if steps < 1 or batch_size < 1:
        raise UserInputError(
            f"train.steps and train.batch_size must be >= 1, got {steps} and {batch_size}."
        )
    device = torch.device(device)
    check_labels(labels, class_conditional=class_conditional, num_classes=num_classes)
    amp = autocast_dtype(mixed_precision, device)
    model.to(device)
    if unwrap_model(model) is model:  # a DDP model was converted before it was wrapped
        channels_last_on_cuda(model, device)
    net = forward_network(model, compile)
    data = images_to_tensor(images, device)
    label_t = (
        torch.as_tensor(labels, dtype=torch.long, device=device) if class_conditional else None
    )
    optimizer = make_optimizer(model, lr, weight_decay, (adam_beta1, adam_beta2))
    state = TrainState(
        model=model, ema=EMA(model, ema_decay, enabled=sample_from == "ema"), optimizer=optimizer,
        schedule=make_lr_schedule(optimizer, warmup_steps, steps),
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        generator=torch.Generator(device=device).manual_seed(seed), stream=IndexStream(len(images), seed),
    )  # fmt: skip
    if resume is not None:
        state.load_state_dict(resume)
    first = state.step
    start = time.perf_counter()
    for step in range(first, steps):
        idx = torch.as_tensor(state.stream.next(batch_size), device=device)
        loss = train_step(
            net, data[idx], None if label_t is None else label_t[idx],
            noise_scheduler=noise_scheduler, optimizer=optimizer, lr_schedule=state.schedule, ema=state.ema,
            generator=state.generator, label_dropout=label_dropout if class_conditional else 0.0,
            null_label=num_classes if class_conditional else None,
            grad_clip=grad_clip, amp_dtype=amp, grad_scaler=state.scaler,
        )  # fmt: skip
        if all_reduce_loss is not None:
            loss = all_reduce_loss(loss)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged at step {step + 1} (loss {loss}); lower train.lr or keep train.grad_clip > 0."
            )
        state.losses.append(loss)
        state.step = step + 1
        for callback in callbacks:
            callback(state)
        if checkpoint is not None and checkpoint_every > 0 and state.step % checkpoint_every == 0:
            if state.step < steps:
                checkpoint(state, False)
    seconds = time.perf_counter() - start
    if checkpoint is not None and first < steps:
        checkpoint(state, True)
    run_steps = steps - first
    return state.ema, TrainResult(
        steps, state.losses, seconds, run_steps * batch_size / max(seconds, 1e-9), first
    )


def state_file(
    path: str | Path, identity: dict[str, Any]
) -> tuple[dict[str, Any] | None, CheckpointCallback]:
    """In-process checkpointing to one file: ``(state to resume from or None, checkpoint callback)``.

    ``identity`` (steps, batch size, data size, seed, ...) is saved with the state; a file of
    another run is refused. The final state is not written: the caller saves the model instead.
    """
    resume = None
    if os.path.exists(path):
        resume = load_training_state(path)
        if resume.get("identity") != identity:
            raise UserInputError(
                f"training state '{path}' belongs to another run ({resume.get('identity')} vs {identity}); "
                "delete it or use another train.out."
            )

    def save(state: TrainState, final: bool) -> None:
        if not final:
            save_training_state(path, {"identity": identity, **state.state_dict()})

    return resume, save
