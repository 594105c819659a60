"""One typed config tree for every command (OmegaConf structured dataclasses).

Every command takes ``[--config FILE] [key=value ...]``: the file is merged over these defaults,
then the dotted overrides. An unknown key or a wrong type fails before any work starts, naming the
key and listing the valid ones. Command-line flags such as ``--k`` are shorthands that write into
this same tree (``knn.k``); there is no second way to configure anything.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from raycollapse.errors import UserInputError


@dataclass
class DataConfig:
    """Where real images come from and how they are shaped (issue: data sources)."""

    source: Literal["digits", "cifar10", "folder", "parquet"] = "digits"
    path: str | None = None  # required for cifar10 / folder / parquet
    n: int | None = None  # seeded subset size; null = all
    resolution: int = 8  # images are resized + center-cropped to resolution x resolution
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    seed: int = 0
    on_corrupt: Literal["skip", "error"] = (
        "error"  # unreadable image files: skip and count, or refuse
    )
    on_small: Literal["upscale", "skip", "error"] = (
        "error"  # images below resolution (digits always upscale)
    )
    image_column: str = "image"  # parquet sources
    label_column: str | None = "label"  # parquet sources; null = unlabelled


@dataclass
class ModelConfig:
    """The diffusers UNet2DModel preset (paper's UNet32/48/64/128, or a tiny CPU model)."""

    preset: Literal["tiny", "unet32", "unet48", "unet64", "unet128"] = "tiny"
    class_conditional: bool = False
    num_classes: int = 10
    label_dropout: float = 0.1  # classifier-free guidance: share of labels dropped in training
    seed: int = 0  # initial weights


@dataclass
class DiffusionConfig:
    """DDPM noise schedule (Ho et al. 2020): linear betas over num_train_timesteps."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: Literal["linear"] = "linear"


@dataclass
class TrainConfig:
    """Training of the DDPM: optimiser, EMA, precision, checkpoints, Ray Train workers."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 500  # training-state saves (resume after a crash); 0 = none
    sample_grid: int = 64  # samples drawn into train.out/samples.png after training; 0 = none
    init: Literal["scratch", "finetune"] = "scratch"
    init_from: str | None = None  # checkpoint folder for init=finetune
    out: str = "runs/train"
    workers: int = 1  # Ray Train workers (DDP)
    use_gpu: bool = False
    cpu_threads: int | None = (
        None  # torch threads for CPU training; null = torch's default (all cores)
    )
    max_failures: int = 2


@dataclass
class SampleConfig:
    """Sampling: DDIM (steps, eta) or DDPM (all steps), optional classifier-free guidance."""

    sampler: Literal["ddim", "ddpm"] = "ddim"  # ddim: see benchmarks/README.md (DDPM section)
    steps: int = 50  # DDIM steps; DDPM always runs all diffusion.num_train_timesteps
    eta: float = (
        0.5  # DDIM noise: 0 = deterministic ODE, 1 = DDPM-like; 0.5 had the best FD at 50 steps
    )
    guidance: float | None = (
        None  # CFG scale w: eps_u + w (eps_c - eps_u); needs a class-conditional model
    )
    label: int | None = None  # fixed label for every sample; null = sample id mod num_classes
    n: int = 64  # samples to generate (raycollapse generate --n)
    out: str | None = None  # .npy array, .png grid, or a folder of Parquet shards (--out)
    batch_size: int = 256  # samples per call / Parquet shard; does not change the samples
    group_size: int = 64  # rows per network evaluation, aligned to sample ids; fixes the rounding
    use_gpu: bool = False  # raycollapse generate on CUDA (an error where there is none)
    seed: int = 0


@dataclass
class FeaturesConfig:
    """The feature space that entropy, selection and metrics work in."""

    name: Literal["pixel", "clip", "dinov2", "inception"] = "pixel"
    pretrained: str | None = (
        None  # hub tag, local file, or "none" (random weights); null = default tag
    )
    batch_size: int = 256
    dtype: Literal["float32", "float16"] = "float32"
    clip_model: str = "ViT-B-32"  # open_clip architecture (``open_clip.list_models()``)
    dinov2_model: str = "vit_small_patch14_dinov2.lvd142m"  # timm name (arch.tag)
    dinov2_image_size: int = 224  # DINOv2 input side; timm resamples the position embedding
    normalize: bool = False  # L2-normalise every embedding (e.g. cosine geometry for CLIP)
    amp: bool = False  # autocast float16 on CUDA: faster, embeddings differ slightly from fp32


@dataclass
class KnnConfig:
    """Exact kNN and the Kozachenko-Leonenko entropy (DESIGN.md, Definitions)."""

    k: int = 3
    eps: float = 1e-10  # floor on r_k for exact duplicates (the paper's code uses 1e-10)
    # Query rows per search call: bounds memory (~ batch_size x (4 d + 16 (k + 9)) bytes); with
    # shards, also the rows a shard groups at once (more per partition list prune better).
    batch_size: int = 65536
    shards: int = 1  # Ray actors holding one shard of the index each
    bootstrap: int = 0  # bootstrap replicates for a confidence interval; 0 = none


@dataclass
class SelectConfig:
    """Choosing B of the candidates (DESIGN.md: greedy, threshold decay, random)."""

    method: Literal["none", "random", "greedy", "threshold"] = "greedy"
    budget: int | None = None
    seed: int = 0
    tau0: float | None = None  # threshold decay; null = derived from the data
    decay: float = 0.9


@dataclass
class ResourcesConfig:
    """Ray resources per stage. GPUs are requested, never silently replaced by CPUs."""

    generate_actors: int = 1
    generate_gpus_per_actor: float = 0.0
    embed_actors: int = 1
    embed_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0


@dataclass
class LoopConfig:
    """The self-consuming loop (DESIGN.md, The loop; Paradigms)."""

    iterations: int = 4
    train_size: int = 128  # B: size of every training set
    pool_multiple: float = 2.0  # m: candidates = m x B
    paradigm: Literal["replace", "accumulate", "accumulate_all", "fresh"] = "replace"
    fresh_fraction: float = 0.0  # lambda for paradigm=fresh
    metric_features: list[str] = field(default_factory=lambda: ["pixel"])
    storage: str = "runs/run"


@dataclass
class Config:
    """The root of the tree. Each command reads the sections it needs."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _explain(exc: OmegaConfBaseException, schema: DictConfig, origin: str) -> UserInputError:
    """Turn an OmegaConf error into a message naming the key, the problem and the valid keys."""
    full_key = str(getattr(exc, "full_key", "") or "")
    if isinstance(exc, ConfigKeyError | ConfigAttributeError) and full_key:
        parent_path, _, leaf = full_key.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        valid = _valid_keys(parent)
        hint = difflib.get_close_matches(leaf, valid, n=1)
        where = f"under '{parent_path}'" if parent_path else "at the top level"
        msg = f"unknown config key '{full_key}' ({origin}). Valid keys {where}: {', '.join(valid)}."
        if hint:
            msg += f" Did you mean '{parent_path + '.' if parent_path else ''}{hint[0]}'?"
        return UserInputError(msg)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = f" for key '{full_key}'" if full_key else ""
    return UserInputError(f"bad config value{key} ({origin}): {first_line}")


def load_config(
    config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """Defaults <- ``config_file`` (YAML, read with ``yaml.safe_load``) <- ``key=value`` overrides.

    Raises ``UserInputError`` for a missing file, bad YAML, an unknown key or a wrong type.
    The result is read-only-structured: assigning an unknown key later also fails.
    """
    schema = OmegaConf.structured(Config)
    cfg = schema
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserInputError(
                f"config file '{path}' does not exist; pass an existing YAML file."
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserInputError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserInputError(
                f"config file '{path}' must hold a mapping of sections, not {type(data).__name__}."
            )
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, f"in {path.name}") from None
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"override '{item}' must look like key=value (e.g. knn.k=5).")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, f"override '{item}'") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def apply_overrides(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """Write flag shorthands (``--k 5`` -> ``knn.k=5``) into the tree, skipping ``None`` values."""
    items = [f"{k}={_dotlist_value(v)}" for k, v in values.items() if v is not None]
    if not items:
        return cfg
    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "command-line flag") from None


def _dotlist_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def plain_section(section: Any, defaults: type) -> dict[str, Any]:
    """A config section (DictConfig, dataclass, dict or None) as a plain dict over ``defaults``.

    Plain data travels to Ray actors; a DictConfig would drag OmegaConf's struct flags along.
    """
    from dataclasses import asdict

    if section is None:
        given: dict[str, Any] = {}
    elif isinstance(section, dict):
        given = dict(section)
    elif hasattr(section, "__dataclass_fields__"):
        given = asdict(section)
    else:
        given = OmegaConf.to_container(section, resolve=True)  # type: ignore[assignment]
    return {**asdict(defaults()), **given}


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what every run folder saves as ``config.yaml``)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def diff_configs(
    a: dict[str, Any], b: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two plain config dicts: ``(key, a_value, b_value)``."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_configs(va, vb, dotted + "."))
        elif va != vb:
            out.append((dotted, va, vb))
    return out
