"""UNet presets: diffusers ``UNet2DModel`` configurations, and their parameter counts.

The ``unet32`` / ``unet48`` / ``unet64`` / ``unet128`` presets follow the code of Shi et al.,
*A Closer Look at Model Collapse: From a Generalization-to-Memorization Perspective* (NeurIPS 2025)
for 32x32 images: six blocks of widths ``(c, c, 2c, 2c, 4c, 4c)``, two ResNet layers per block,
self-attention in the 5th down block and the 2nd up block (plus diffusers' mid-block attention),
16 GroupNorm groups. The number is ``c``. They downsample five times, so the resolution must be a
multiple of 32.

``tiny`` is this project's CPU model for 8x8 / 16x16 single-channel images (digits): three blocks
``(32, 64, 64)``, one ResNet layer per block, attention at the lowest resolution only. It trains
to recognisable digits in a few minutes on two CPU cores (numbers in ``benchmarks/README.md``).

``mlp`` is the vector preset (``data.source=mog``): ``diffusion.mlp.VectorDenoiser``, a small MLP
with a sinusoidal time embedding (``MLPSpec``); its input dimension is the data's ``d``. It has
no resolution; image sources cannot use it, and vector data can use nothing else.

Class-conditional variants add an ``nn.Embedding(num_classes + 1, 4c)`` added to the time
embedding; index ``num_classes`` is the *null* label used for label dropout and for the
unconditional branch of classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

from raycollapse.errors import UserInputError


@dataclass(frozen=True)
class UNetSpec:
    """Everything that fixes a preset's architecture (and so its parameter count)."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int
    attention_head_dim: int = 8

    @property
    def downsample_factor(self) -> int:
        """Resolution must be a multiple of this: the last down block does not downsample."""
        return 2 ** (len(self.block_out_channels) - 1)


def _paper_spec(c: int) -> UNetSpec:
    # Shi et al. 2025 (and diffusers' train_unconditional example): attention at the 5th block
    # on the way down and the 2nd on the way up, i.e. at 2x2 for 32x32 inputs.
    return UNetSpec(
        block_out_channels=(c, c, 2 * c, 2 * c, 4 * c, 4 * c),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=16,
    )


UNET_PRESETS: dict[str, UNetSpec] = {
    # One ResNet layer per block and attention only at the lowest resolution (2x2 at 8x8): a
    # training step at batch 64 takes about 0.1 s on one CPU core (benchmarks/README.md, DDPM).
    "tiny": UNetSpec(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
    ),
    "unet32": _paper_spec(32),
    "unet48": _paper_spec(48),
    "unet64": _paper_spec(64),
    "unet128": _paper_spec(128),
}


@dataclass(frozen=True)
class MLPSpec:
    """A vector preset: residual MLP blocks of ``hidden`` units, sinusoidal time embedding."""

    hidden: int
    depth: int
    time_embed_dim: int


# About 0.1 M parameters: a training step at batch 256 takes ~1 ms on one CPU core, so a 2-D or
# 8-D mixture is fitted in a few seconds.
VECTOR_PRESETS: dict[str, MLPSpec] = {"mlp": MLPSpec(hidden=128, depth=3, time_embed_dim=64)}
# Every preset, in the order of ``config.schema.Preset``.
PRESETS: dict[str, UNetSpec | MLPSpec] = {**UNET_PRESETS, **VECTOR_PRESETS}
VECTOR_SOURCES = ("mog",)


def is_vector_preset(preset: str) -> bool:
    """Whether ``preset`` is a vector model (``VECTOR_PRESETS``) rather than a UNet."""
    return preset in VECTOR_PRESETS


def check_model_data(preset: str, source: str) -> None:
    """Vector data need a vector preset and images a UNet preset (``UserInputError`` otherwise)."""
    vector_data = source in VECTOR_SOURCES
    if vector_data and not is_vector_preset(preset):
        raise UserInputError(
            f"data.source={source} gives vectors, which model preset '{preset}' (a UNet for images) "
            f"cannot take; set model.preset to one of {', '.join(VECTOR_PRESETS)}."
        )
    if not vector_data and is_vector_preset(preset):
        raise UserInputError(
            f"model preset '{preset}' is for vector data (data.source={'|'.join(VECTOR_SOURCES)}); "
            f"data.source={source} gives images: choose one of {', '.join(UNET_PRESETS)}."
        )


def get_spec(preset: str) -> UNetSpec:
    """The spec of a preset; a ``UserInputError`` listing the presets for an unknown name."""
    if is_vector_preset(preset):
        raise UserInputError(f"model preset '{preset}' is a vector model: it has no UNet spec.")
    if preset not in UNET_PRESETS:
        raise UserInputError(
            f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}."
        )
    return UNET_PRESETS[preset]


def check_resolution(preset: str, resolution: int) -> None:
    """Refuse a resolution the preset cannot downsample evenly (and one below 4 pixels); vector
    presets have no resolution."""
    if is_vector_preset(preset):
        return
    factor = get_spec(preset).downsample_factor
    if resolution < 4 or resolution % factor:
        raise UserInputError(
            f"model preset '{preset}' downsamples by {factor}, so data.resolution must be a multiple "
            f"of {factor} (got {resolution}); pick another resolution or preset "
            f"(tiny works at 8 and 16, unet32..unet128 at 32, 64, ...)."
        )


def unet_kwargs(
    preset: str,
    *,
    resolution: int,
    channels: int,
    class_conditional: bool = False,
    num_classes: int = 10,
) -> dict:
    """Keyword arguments of ``diffusers.UNet2DModel`` for a preset (what its config.json holds)."""
    spec = get_spec(preset)
    check_resolution(preset, resolution)
    if channels not in (1, 3):
        raise UserInputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    kwargs: dict = dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=spec.layers_per_block,
        block_out_channels=spec.block_out_channels,
        down_block_types=spec.down_block_types,
        up_block_types=spec.up_block_types,
        norm_num_groups=spec.norm_num_groups,
        attention_head_dim=spec.attention_head_dim,
    )
    if class_conditional:
        if num_classes < 1:
            raise UserInputError(
                f"model.num_classes must be >= 1 for a class-conditional model, got {num_classes}."
            )
        kwargs["num_class_embeds"] = num_classes + 1  # + the null label for guidance
    return kwargs


def build_unet(
    preset: str,
    *,
    resolution: int,
    channels: int,
    class_conditional: bool = False,
    num_classes: int = 10,
    seed: int | None = None,
    dim: int | None = None,
):
    """A freshly initialised ``UNet2DModel`` (for ``mlp``: a ``VectorDenoiser`` of dimension
    ``dim``; ``resolution`` and ``channels`` are then unused); ``seed`` makes the initial
    weights reproducible."""
    import torch

    if is_vector_preset(preset):
        kwargs = mlp_kwargs(preset, dim=dim, class_conditional=class_conditional,
                            num_classes=num_classes)  # fmt: skip
    else:
        kwargs = unet_kwargs(preset, resolution=resolution, channels=channels,
                             class_conditional=class_conditional, num_classes=num_classes)  # fmt: skip
    model_cls = model_class(preset)
    if seed is None:
        return model_cls(**kwargs)
    # fork_rng: seed the initialisation without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(**kwargs)


def mlp_kwargs(
    preset: str, *, dim: int | None, class_conditional: bool = False, num_classes: int = 10
) -> dict:
    """Keyword arguments of ``VectorDenoiser`` for a vector preset and data dimension ``dim``."""
    spec = VECTOR_PRESETS[preset]
    if dim is None or dim < 1:
        raise UserInputError(f"model preset '{preset}' needs the data dimension d >= 1, got {dim}.")
    kwargs: dict = dict(dim=int(dim), hidden=spec.hidden, depth=spec.depth,
                        time_embed_dim=spec.time_embed_dim)  # fmt: skip
    if class_conditional:
        if num_classes < 1:
            raise UserInputError(
                f"model.num_classes must be >= 1 for a class-conditional model, got {num_classes}."
            )
        kwargs["num_class_embeds"] = num_classes + 1  # + the null label for guidance
    return kwargs


def model_class(preset: str):
    """The diffusers model class of a preset: ``VectorDenoiser`` or ``UNet2DModel``."""
    if is_vector_preset(preset):
        from raycollapse.diffusion.mlp import VectorDenoiser

        return VectorDenoiser
    get_spec(preset)
    from diffusers import UNet2DModel

    return UNet2DModel


def architecture_mismatch(model, meta: dict) -> str | None:
    """The architecture of a loaded model (e.g. ``"widths, size, channels ((32, 64, 64), 8, 1)"``)
    when it does not fit its checkpoint's ``meta`` (preset, resolution, channels), else ``None``.

    UNets: widths, sample size and channels; vector models: the preset's widths (any ``dim``)."""
    cfg = model.config
    if is_vector_preset(meta["preset"]):
        spec = VECTOR_PRESETS[meta["preset"]]
        arch = (cfg.get("hidden"), cfg.get("depth"), cfg.get("time_embed_dim"))
        ok = arch == (spec.hidden, spec.depth, spec.time_embed_dim)
        return None if ok else f"hidden, depth, time_embed_dim {arch}"
    spec = get_spec(meta["preset"])
    arch = (tuple(cfg.block_out_channels), cfg.sample_size, cfg.in_channels)
    ok = arch == (spec.block_out_channels, meta["resolution"], meta["channels"])
    return None if ok else f"widths, size, channels {arch}"


def count_parameters(model) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())
