"""The training loop over a streamed shard (``train_data.ShardStream``), for training sets larger
than a worker's memory.

The same step, optimiser, schedule, EMA, precision, loss all-reduce, divergence check, step
callbacks and checkpoint cadence as ``diffusion.trainer.train_loop`` (whose ``train_step``,
``TrainResult`` and ``train_parts`` it uses); only the batches differ: ``stream.next(batch_size)``
instead of seeded indices into an in-memory array. Its checkpointed per-rank state is the noise
generator and the stream's position (``STREAM_RANK_KEYS``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raycollapse.diffusion.sampling import images_to_tensor
from raycollapse.diffusion.train_parts import (
    EMA,
    autocast_dtype,
    channels_last_on_cuda,
    forward_network,
    make_lr_schedule,
    make_optimizer,
    unwrap_model,
)
from raycollapse.diffusion.trainer import TrainingDiverged, TrainResult, TrainState, train_step
from raycollapse.stages.train_data import ShardStream

STREAM_RANK_KEYS = ("generator", "stream_position")


@dataclass
class StreamState(TrainState):
    """``diffusion.trainer.TrainState`` of a streamed run: its per-rank part is the generator and
    the stream's position (``STREAM_RANK_KEYS``)."""

    stream: ShardStream  # type: ignore[assignment]
    rank_keys: tuple[str, ...] = STREAM_RANK_KEYS

    def stream_state(self) -> dict[str, Any]:
        return {"stream_position": torch.tensor(self.stream.position, dtype=torch.int64)}

    def load_stream(self, state: dict[str, Any]) -> None:
        self.stream.seek(*state["stream_position"].tolist())


def stream_train_loop(
    model: torch.nn.Module,
    stream: ShardStream,
    *,
    noise_scheduler: Any,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    ema_decay: float,
    grad_clip: float | None,
    mixed_precision: str,
    seed: int,
    class_conditional: bool,
    num_classes: int,
    label_dropout: float,
    device: torch.device,
    resume: dict[str, Any] | None,
    checkpoint: Callable[[StreamState, bool], None],
    checkpoint_every: int,
    all_reduce_loss: Callable[[float], float] | None,
    callbacks: Sequence[Callable[[StreamState], None]] = (),
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    sample_from: str = "ema",
    compile: bool | str = False,
) -> tuple[EMA, TrainResult]:
    """``diffusion.trainer.train_loop`` with its batches read from ``stream`` (see the module
    docstring); the arguments mean the same (the driver has checked the labels)."""
    amp = autocast_dtype(mixed_precision, device)
    model.to(device)
    if unwrap_model(model) is model:  # a DDP model was converted before it was wrapped
        channels_last_on_cuda(model, device)
    net = forward_network(model, compile)
    optimizer = make_optimizer(model, lr, weight_decay, (adam_beta1, adam_beta2))
    state = StreamState(
        model=model, ema=EMA(model, ema_decay, enabled=sample_from == "ema"), optimizer=optimizer,
        schedule=make_lr_schedule(optimizer, warmup_steps, steps),
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        generator=torch.Generator(device=device).manual_seed(seed), stream=stream,
    )  # fmt: skip
    if resume is not None:
        state.load_state_dict(resume)
    first = state.step
    start = time.perf_counter()
    for step in range(first, steps):
        images, labels = stream.next(batch_size)
        label_t = torch.as_tensor(labels, device=device) if class_conditional else None
        loss = train_step(
            net, images_to_tensor(images, device), label_t, noise_scheduler=noise_scheduler,
            optimizer=optimizer, lr_schedule=state.schedule, ema=state.ema, generator=state.generator,
            label_dropout=label_dropout if class_conditional else 0.0,
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
        if checkpoint_every > 0 and state.step % checkpoint_every == 0 and state.step < steps:
            checkpoint(state, False)
    seconds = time.perf_counter() - start
    if first < steps:
        checkpoint(state, True)
    return state.ema, TrainResult(
        steps, state.losses, seconds, (steps - first) * batch_size / max(seconds, 1e-9), first
    )
