"""DDPM noise schedule, training loss, and the DDPM / DDIM / guided samplers.

- Training (Ho et al. 2020, *Denoising Diffusion Probabilistic Models*): linear betas over
  ``num_train_timesteps``; ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``t`` uniform; the
  network predicts ``eps``; the loss is the mean squared error.
- Samplers: DDPM ancestral sampling over all training steps (Ho et al. 2020) and DDIM with
  ``steps`` and ``eta`` (Song et al. 2021, *Denoising Diffusion Implicit Models*), both through
  diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` built from the same config, so the two share
  one noise schedule.
- Classifier-free guidance (Ho & Salimans 2022): ``eps = eps_u + w (eps_c - eps_u)`` where
  ``eps_u`` uses the null label ``num_classes``. ``w = 0`` is the unconditional model, ``w = 1``
  the conditional one.

Reproducibility contract. Sample ``i`` of a pool with seed ``s`` owns a ``torch.Generator`` seeded
from ``(s, i)`` alone (like EDM's StackedRandomGenerator); its initial noise and every stochastic
step's noise come from it, drawn on the CPU, so they are identical on every device. The network
is evaluated on *aligned groups* of ids ``[g G, (g+1) G)`` (``G = group_size``): a request for any
subset of ids computes the whole groups that hold them. CPU and GPU kernels round differently for
different batch shapes (measured: ~1e-6 for a batch of 7 vs 7 batches of 1), so this is what makes
a pool bit-identical whatever the caller's batch size or number of workers, on one kind of device.
Changing ``group_size`` changes floating-point rounding (not the distribution). A group that
reaches past the last requested id is still computed whole (at most ``group_size - 1`` extra
samples per call). The CPU thread count did not change any bit in our checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raycollapse.config.schema import SAMPLERS
from raycollapse.errors import UserInputError
from raycollapse.seeds import derive_seed

if TYPE_CHECKING:
    from raycollapse.config.schema import DiffusionConfig


def make_scheduler(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
):
    """The training scheduler: DDPM, linear betas, epsilon prediction, x_0 clipped to [-1, 1]."""
    from diffusers import DDPMScheduler

    if num_train_timesteps < 2:
        raise UserInputError(
            f"diffusion.num_train_timesteps must be >= 2, got {num_train_timesteps}."
        )
    if not 0 < beta_start < beta_end < 1:
        raise UserInputError(
            f"need 0 < diffusion.beta_start < diffusion.beta_end < 1, got {beta_start} and {beta_end}."
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
    )


def scheduler_from_config(cfg: DiffusionConfig):
    """``make_scheduler`` from a ``diffusion`` config section (DictConfig or dataclass)."""
    return make_scheduler(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule)


def sampling_scheduler(train_scheduler: Any, sampler: str, steps: int):
    """A fresh scheduler with its timesteps set: DDPM uses every training step, DDIM ``steps``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    total = int(train_scheduler.config.num_train_timesteps)
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(train_scheduler.config)
        sched.set_timesteps(total)
    elif sampler == "ddim":
        if not 1 <= steps <= total:
            raise UserInputError(
                f"sample.steps must be between 1 and {total} for DDIM, got {steps}; set "
                f"sample.steps (generate: --steps) to at most {total}."
            )
        sched = DDIMScheduler.from_config(train_scheduler.config)
        sched.set_timesteps(steps)
    else:
        raise UserInputError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    return sched


# ---------------------------------------------------------------------------------------------
# Per-sample randomness


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit torch seed derived from ``(seed, sample_id)`` only (numpy SeedSequence hashing)."""
    return derive_seed(seed, sample_id, bits=63)


def sample_generators(seed: int, ids: Sequence[int] | np.ndarray) -> list[torch.Generator]:
    """One CPU generator per sample id."""
    return [torch.Generator(device="cpu").manual_seed(sample_seed(seed, int(i))) for i in ids]


def per_sample_randn(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Stack one ``randn(1, *shape)`` draw per generator (CPU, float32): row i is generator i's."""
    return torch.cat(
        [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
    )


# ---------------------------------------------------------------------------------------------
# Training


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``N x H x W x C`` -> float32 ``N x C x H x W`` in [-1, 1]; float vectors ``N x d``
    (vector data, docs/design.md, "Mixture of Gaussians") are taken as they are."""
    if images.ndim == 2:
        return torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32, device=device)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float ``N x C x H x W`` in [-1, 1] -> uint8 ``N x H x W x C`` (clipped, rounded)."""
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE (Ho et al. 2020, Eq. 14) on a batch ``x0`` in [-1, 1].

    ``labels`` (class-conditional models): each is replaced by ``null_label`` with probability
    ``label_dropout``, which trains the unconditional branch for classifier-free guidance.
    ``generator`` lives on ``x0``'s device and makes noise, timesteps and dropout reproducible.
    """
    n, device = x0.shape[0], x0.device
    total = int(scheduler.config.num_train_timesteps)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    t = torch.randint(0, total, (n,), generator=generator, device=device)
    xt = scheduler.add_noise(x0, noise, t)
    if labels is not None and label_dropout > 0:
        if null_label is None:
            raise ValueError("label_dropout needs null_label")
        drop = torch.rand(n, generator=generator, device=device) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    pred = model(xt, t, class_labels=labels).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


# ---------------------------------------------------------------------------------------------
# Sampling


def resolve_labels(
    ids: np.ndarray,
    *,
    class_conditional: bool,
    num_classes: int,
    label: int | None = None,
    guidance: float | None = None,
) -> np.ndarray | None:
    """Labels for sample ids: ``label`` for all, else ``id mod num_classes``; ``None`` if unconditional.

    Refuses guidance or a label for an unconditional model and a label out of range.
    """
    if not class_conditional:
        if guidance is not None:
            raise UserInputError(
                "classifier-free guidance (sample.guidance / --guidance) needs a class-conditional model; "
                "this checkpoint is unconditional. Drop --guidance or train with model.class_conditional=true."
            )
        if label is not None:
            raise UserInputError(
                "sample.label / --label needs a class-conditional model; this checkpoint is unconditional."
            )
        return None
    if label is not None:
        if not 0 <= int(label) < num_classes:
            raise UserInputError(
                f"label {label} is out of range for a model with {num_classes} classes (0..{num_classes - 1})."
            )
        return np.full(len(ids), int(label), dtype=np.int64)
    return (np.asarray(ids, dtype=np.int64) % num_classes).astype(np.int64)


def guided_eps(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    guidance: float | None,
    null_label: int | None,
) -> torch.Tensor:
    """The noise prediction used by the samplers (with classifier-free guidance when asked).

    The conditional and unconditional branches are two separate forward passes of the same shape
    (not one concatenated batch), so ``guidance = 0`` reproduces the unconditional model exactly.
    """
    if guidance is None or labels is None:
        return model(x, t, class_labels=labels).sample
    eps_u = model(x, t, class_labels=torch.full_like(labels, int(null_label))).sample
    if guidance == 0:
        return eps_u
    eps_c = model(x, t, class_labels=labels).sample
    return eps_u + guidance * (eps_c - eps_u)


def sampling_autocast(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``sample.precision`` on ``device``; ``None`` means fp32.

    ``auto``: bf16 on a CUDA GPU that has it (tensor cores; the network's convolutions and
    matmuls only: the noise, the scheduler step and the images stay fp32), else fp32. ``bf16``
    without CUDA, or on a GPU without bf16, is refused, never silently run in fp32.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision not in ("auto", "bf16"):
        raise UserInputError(f"sample.precision must be auto, fp32 or bf16, got {precision!r}.")
    has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if has_bf16 else None
    if not has_bf16:
        raise UserInputError(
            f"sample.precision=bf16 needs a CUDA GPU with bf16 (sampling on {device.type}); "
            "use sample.precision=auto or fp32."
        )
    return torch.bfloat16


def sampling_network(
    model: torch.nn.Module, device: torch.device | str, compile: bool | str
) -> torch.nn.Module:
    """The network as the sampler calls it: channels-last on CUDA for image networks, and
    ``torch.compile`` when ``compile`` (sample.compile) is set (see ``diffusion.train_parts``)."""
    from raycollapse.diffusion.train_parts import channels_last_on_cuda, forward_network

    channels_last_on_cuda(model, device)
    return forward_network(model, compile)


@torch.inference_mode()
def run_sampler(
    model: torch.nn.Module,
    sched: Any,
    ids: np.ndarray,
    shape: tuple[int, ...],
    *,
    seed: int,
    sampler: str,
    eta: float,
    labels: np.ndarray | None = None,
    guidance: float | None = None,
    null_label: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reverse process of ``sched`` (a ``sampling_scheduler``) for these ids as one network
    batch, each from its own generator (module docstring): ``x_0``, fp32 ``N x *shape``.

    ``amp_dtype``: autocast the network's evaluations to it (``sampling_autocast``); the noise
    and the scheduler steps stay fp32.
    """
    gens = sample_generators(seed, ids)
    x = (per_sample_randn(gens, shape) * sched.init_noise_sigma).to(device)
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=device)
    device_type = torch.device(device).type
    for t in sched.timesteps:
        tt = torch.full((len(ids),), int(t), device=device, dtype=torch.long)
        with torch.autocast(
            device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            eps = guided_eps(model, x, tt, y, guidance, null_label)
        eps = eps.float()
        if sampler == "ddpm":
            # diffusers draws one (1, *shape) tensor per generator when given a list: the same
            # per-sample stream as per_sample_randn.
            x = sched.step(eps, int(t), x, generator=gens if len(gens) > 1 else gens[0]).prev_sample
        elif eta > 0:
            noise = per_sample_randn(gens, shape).to(device)
            x = sched.step(eps, int(t), x, eta=eta, variance_noise=noise).prev_sample
        else:
            x = sched.step(eps, int(t), x, eta=0.0).prev_sample
    return x


def sample_group(
    model: torch.nn.Module,
    train_scheduler: Any,
    ids: np.ndarray,
    *,
    seed: int,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    labels: np.ndarray | None = None,
    guidance: float | None = None,
    null_label: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Run the sampler on exactly these ids as one network batch; uint8 ``N x H x W x C``.

    Use ``sample_images`` (aligned groups) unless you control the batching yourself.
    """
    cfg = model.config
    shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
    x = run_sampler(
        model, sampling_scheduler(train_scheduler, sampler, steps), ids, shape, seed=seed,
        sampler=sampler, eta=eta, labels=labels, guidance=guidance, null_label=null_label,
        device=device, amp_dtype=amp_dtype,
    )  # fmt: skip
    return tensor_to_images(x)


def sample_images(
    model: torch.nn.Module,
    train_scheduler: Any,
    ids: Sequence[int] | np.ndarray,
    *,
    seed: int,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    labels_for: Callable[[np.ndarray], np.ndarray | None] | None = None,
    guidance: float | None = None,
    null_label: int | None = None,
    group_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Generate the samples with these ids (any order, any subset of a pool): uint8 ``N x H x W x C``.

    ``labels_for(group_ids) -> labels`` gives each id its class (``None``: unconditional); it must
    depend on the id only (see ``resolve_labels``). ``progress(n_done)`` is called per group.
    The result for an id depends only on (model, seed, id, sampler settings, group_size, device
    kind, ``amp_dtype``) — see the module docstring.
    """
    ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids_arr.size == 0:
        cfg = model.config
        return np.zeros((0, cfg.sample_size, cfg.sample_size, cfg.in_channels), dtype=np.uint8)
    if ids_arr.min() < 0 or seed < 0:
        raise UserInputError(
            f"sample ids and the seed must be non-negative integers (seed {seed})."
        )
    if group_size < 1:
        raise UserInputError(f"sample.group_size must be >= 1, got {group_size}.")
    if eta < 0:
        raise UserInputError(f"sample.eta must be >= 0, got {eta}.")
    model.eval()
    out: np.ndarray | None = None
    groups = np.unique(ids_arr // group_size)
    done = 0
    # Fixed cuDNN algorithms: the same shapes then give the same bits on the same kind of GPU.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for g in groups:
            group_ids = np.arange(g * group_size, (g + 1) * group_size, dtype=np.int64)
            labels = labels_for(group_ids) if labels_for is not None else None
            imgs = sample_group(
                model,
                train_scheduler,
                group_ids,
                seed=seed,
                sampler=sampler,
                steps=steps,
                eta=eta,
                labels=labels,
                guidance=guidance,
                null_label=null_label,
                device=device,
                amp_dtype=amp_dtype,
            )
            if out is None:
                out = np.zeros((len(ids_arr), *imgs.shape[1:]), dtype=np.uint8)
            mask = ids_arr // group_size == g
            out[mask] = imgs[ids_arr[mask] - g * group_size]
            done += int(mask.sum())
            if progress is not None:
                progress(done)
    assert out is not None
    return out
