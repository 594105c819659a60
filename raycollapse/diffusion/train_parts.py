"""The pieces of DDPM training: device and precision rules, AdamW with warmup + cosine learning
rate, the EMA of the weights, label checks, and the seeded stream of batch indices.

``raycollapse.diffusion.trainer.train_loop`` puts them together. Mixed precision is autocast on
CUDA only (``auto`` = bf16 where supported, else fp32); on the CPU training is fp32. Asking for a
GPU or a half-precision mode without CUDA is an error, never a silent fallback.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

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


def channels_last_on_cuda(model: torch.nn.Module, device: torch.device | str) -> None:
    """Put an image network's weights in channels-last (NHWC) memory format on CUDA, in place.

    cuDNN's NHWC convolution kernels are the fast ones on tensor-core GPUs, above all under bf16;
    convolutions then return NHWC activations whatever the input's layout. On the CPU nothing
    changes (the fp32 CPU kernels gain little and the bits of existing runs would move). Call it
    before a DDP wrapper is made: DDP's gradient buckets keep the layout they were built with.
    """
    if torch.device(device).type == "cuda" and any(
        isinstance(m, torch.nn.Conv2d) for m in model.modules()
    ):
        model.to(memory_format=torch.channels_last)


def forward_network(model: torch.nn.Module, compile: bool | str) -> torch.nn.Module:
    """The module the steps call: ``model``, or ``torch.compile(model)`` (train.compile /
    sample.compile). The compiled wrapper shares ``model``'s parameters, so the optimiser, the EMA
    and the saved checkpoint see the same tensors; the first calls are slow (compilation).
    A string names torch.compile's backend (``True``: its default, inductor); the tests use
    ``aot_eager``, which traces the same graphs without generating C++ (a minute on 2 cores)."""
    if not compile:
        return model
    return torch.compile(model) if compile is True else torch.compile(model, backend=compile)


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over all trainable parameters (``betas``: train.adam_beta1, train.adam_beta2)."""
    if lr <= 0:
        raise UserInputError(f"train.lr must be > 0, got {lr}.")
    for key, beta in zip(("adam_beta1", "adam_beta2"), betas, strict=True):
        if not 0.0 <= beta < 1.0:
            raise UserInputError(f"train.{key} must be in [0, 1), got {beta}.")
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        betas=(float(betas[0]), float(betas[1])),
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

    ``enabled=False`` (train.sample_from=raw, the paper's code): no average is kept, ``update``
    does nothing and ``copy_to`` leaves the model's own (last-step) weights in place.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, enabled: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise UserInputError(f"train.ema_decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.enabled = enabled
        self.num_updates = 0
        self.shadow = (
            [p.detach().clone().float() for p in unwrap_model(model).parameters()]
            if enabled
            else []
        )

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if not self.enabled:
            return
        d = self.current_decay()
        params = [p.detach().float() for p in unwrap_model(model).parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (for sampling or saving); disabled: nothing."""
        if not self.enabled:
            return
        for s, p in zip(self.shadow, unwrap_model(model).parameters(), strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled != bool(state["shadow"]):
            raise UserInputError(
                "the training state was saved with another train.sample_from (ema vs raw); resume "
                "with the setting it was started with, or start over."
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = [t.clone().float() for t in state["shadow"]]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (``.module``), or the model itself."""
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
