"""Every check of config values that needs no data: each command runs them before any work.

A check raises ``UserInputError`` naming the key, the bad value and the fix. Types and name lists
(``Literal`` fields) are already enforced when the config loads (``raycollapse.config.load``);
what is here are ranges and the rules between keys. Checks that need the data (B against the real
images, k against N, shards against rows, a checkpoint's settings) stay where the data is read.

Sections are typed as their schema dataclasses: a loaded ``DictConfig`` behaves as one.
"""

from __future__ import annotations

from raycollapse.config.schema import (
    Config,
    DataConfig,
    DiffusionConfig,
    FeaturesConfig,
    KnnConfig,
    ResourcesConfig,
    SampleConfig,
    SelectConfig,
    TrainConfig,
)
from raycollapse.data.sources import PATH_HINTS
from raycollapse.diffusion.unet import check_model_data, check_resolution
from raycollapse.errors import UserInputError
from raycollapse.features.weights import check_weights_available

OUT_REQUIRED = "--out is required: OUT.npy, OUT.png or a new folder for Parquet shards."


def check_command(cfg: Config, command: str) -> None:
    """The checks of every section ``command`` reads (``raycollapse COMMAND``), before any work."""
    if command == "entropy":
        check_knn(cfg.knn)
    elif command == "select":
        check_select(cfg.select, budget_required=True)
        check_knn(cfg.knn)
    elif command == "train":
        check_train_command(cfg)
    elif command == "generate":
        check_generate_command(cfg)
    elif command == "embed":
        check_features(cfg.features)
        check_resources(cfg.resources)
    elif command == "run":
        check_run(cfg)


def check_train_command(cfg: Config) -> None:
    """``raycollapse train``: data, model, schedule, training, and the sample grid drawn after it."""
    check_data(cfg.data)
    check_model(cfg)
    check_diffusion(cfg.diffusion)
    check_train(cfg.train, init_from_required=True)
    # Refuse guidance or a label for this model before training, not after it.
    check_sample_labels(cfg)
    if cfg.train.sample_grid > 0:
        check_sample(cfg.sample, num_train_timesteps=cfg.diffusion.num_train_timesteps)
        check_sample_precision(cfg.sample, on_gpu=cfg.train.use_gpu, gpu_key="train.use_gpu")
    check_paper_train(cfg.train)


def check_generate_command(cfg: Config) -> None:
    """``raycollapse generate``: what needs the checkpoint (T, labels) is checked once it is read."""
    sample = cfg.sample
    if not sample.out:
        raise UserInputError(OUT_REQUIRED)
    if sample.n < 1:
        raise UserInputError(f"sample.n (--n) must be >= 1, got {sample.n}.")
    check_sample(sample, num_train_timesteps=None)
    check_resources(cfg.resources)
    gpus = cfg.resources.generate_gpus_per_actor
    check_sample_precision(
        sample, on_gpu=sample.use_gpu or gpus > 0, gpu_key="sample.use_gpu (--gpu)"
    )


def check_run(cfg: Config) -> None:
    """``raycollapse run``: every section the loop reads (the former ``check_static``)."""
    check_data(cfg.data)
    check_model(cfg)
    check_diffusion(cfg.diffusion)
    # The loop fine-tunes from the previous iteration's model: no train.init_from needed.
    check_train(cfg.train, init_from_required=False)
    check_sample_labels(cfg)
    check_sample(cfg.sample, num_train_timesteps=cfg.diffusion.num_train_timesteps)
    check_sample_precision(
        cfg.sample, on_gpu=cfg.resources.generate_gpus_per_actor > 0,
        gpu_key="resources.generate_gpus_per_actor",
    )  # fmt: skip
    check_knn(cfg.knn)
    check_select(cfg.select, budget_required=False)
    check_resources(cfg.resources)
    check_loop(cfg)
    check_paper_train(cfg.train)
    check_metrics(cfg)


# ---------------------------------------------------------------------------------------------
# Sections


def check_data(data: DataConfig) -> None:
    """Shape and subset of the real data; a path where the source needs one."""
    if data.channels not in (1, 3):
        raise UserInputError(f"data.channels must be 1 or 3, got {data.channels}.")
    if data.resolution < 1:
        raise UserInputError(f"data.resolution must be >= 1, got {data.resolution}.")
    if data.n is not None and data.n < 1:
        raise UserInputError(f"data.n must be >= 1 (or null for all), got {data.n}.")
    if data.source not in ("digits", "mog") and data.path in (None, ""):
        raise UserInputError(
            f"data.source={data.source} needs data.path (a {PATH_HINTS[data.source]})."
        )


def check_model(cfg: Config) -> None:
    """The preset must downsample ``data.resolution`` evenly; a conditional model needs classes."""
    check_resolution(cfg.model.preset, cfg.data.resolution)
    check_model_data(cfg.model.preset, cfg.data.source)
    if cfg.model.class_conditional and cfg.model.num_classes < 1:
        raise UserInputError(
            "model.num_classes must be >= 1 for a class-conditional model, "
            f"got {cfg.model.num_classes}."
        )


def check_diffusion(diffusion: DiffusionConfig) -> None:
    """At least two diffusion steps; betas strictly increasing inside (0, 1)."""
    if diffusion.num_train_timesteps < 2:
        raise UserInputError(
            f"diffusion.num_train_timesteps must be >= 2, got {diffusion.num_train_timesteps}."
        )
    if not 0 < diffusion.beta_start < diffusion.beta_end < 1:
        raise UserInputError(
            "need 0 < diffusion.beta_start < diffusion.beta_end < 1, "
            f"got {diffusion.beta_start} and {diffusion.beta_end}."
        )


def resolve_launcher(train: TrainConfig) -> str:
    """``ray`` or ``process``: where ``train`` trains (``train.launcher``; auto = process for one
    worker without a GPU; the loop's stage also sends a set above ``train.in_memory_gb`` to Ray)."""
    launcher = str(train.launcher)
    if launcher == "auto":
        return "process" if int(train.workers) == 1 and not bool(train.use_gpu) else "ray"
    if launcher == "process" and int(train.workers) != 1:
        raise UserInputError(
            f"train.launcher=process trains one worker in this process; got train.workers="
            f"{train.workers}. Use train.launcher=ray (or auto) for several Ray Train workers."
        )
    return launcher


def check_train(train: TrainConfig, *, init_from_required: bool) -> None:
    """Steps, batch over workers, optimiser, EMA, threads, precision and the fine-tuning source.

    ``init_from_required``: ``raycollapse train`` fine-tunes ``train.init_from``; the loop fine-tunes
    the previous iteration's model instead.
    """
    if train.workers < 1:
        raise UserInputError(f"train.workers must be >= 1, got {train.workers}.")
    if train.steps < 1:
        raise UserInputError(f"train.steps must be >= 1, got {train.steps}.")
    if train.batch_size < 1:
        raise UserInputError(f"train.batch_size must be >= 1, got {train.batch_size}.")
    if train.batch_size < train.workers:
        raise UserInputError(
            f"train.batch_size={train.batch_size} is smaller than train.workers={train.workers}; "
            "each worker takes batch_size // workers images per step: raise train.batch_size."
        )
    resolve_launcher(train)
    if train.lr <= 0:
        raise UserInputError(f"train.lr must be > 0, got {train.lr}.")
    if not 0.0 <= train.ema_decay < 1.0:
        raise UserInputError(f"train.ema_decay must be in [0, 1), got {train.ema_decay}.")
    if train.cpu_threads is not None and train.cpu_threads < 1:
        raise UserInputError(f"train.cpu_threads must be >= 1 (or null), got {train.cpu_threads}.")
    if train.mixed_precision in ("bf16", "fp16") and not train.use_gpu:
        raise UserInputError(
            f"train.mixed_precision={train.mixed_precision} needs CUDA; on the CPU use 'auto' or "
            "'no' (fp32), or set train.use_gpu=true."
        )
    if init_from_required and train.init == "finetune" and not train.init_from:
        raise UserInputError("train.init=finetune needs train.init_from (a checkpoint folder).")


def check_sample_labels(cfg: Config) -> None:
    """Guidance and a fixed label need a class-conditional ``model``; the label must be a class."""
    sample, model = cfg.sample, cfg.model
    if not model.class_conditional:
        if sample.guidance is not None:
            raise UserInputError(
                "classifier-free guidance (sample.guidance / --guidance) needs a class-conditional "
                "model; model.class_conditional is false. Drop sample.guidance or set "
                "model.class_conditional=true."
            )
        if sample.label is not None:
            raise UserInputError(
                "sample.label / --label needs a class-conditional model; "
                "model.class_conditional is false."
            )
    elif sample.label is not None and not 0 <= sample.label < model.num_classes:
        raise UserInputError(
            f"label {sample.label} is out of range for a model with {model.num_classes} classes "
            f"(0..{model.num_classes - 1}): set sample.label or model.num_classes."
        )


def check_sample(sample: SampleConfig, *, num_train_timesteps: int | None) -> None:
    """Sampler settings; DDIM steps within ``num_train_timesteps`` when known (else from the checkpoint)."""
    if sample.batch_size < 1:
        raise UserInputError(
            f"sample.batch_size (--batch-size) must be >= 1, got {sample.batch_size}."
        )
    if sample.group_size < 1:
        raise UserInputError(f"sample.group_size must be >= 1, got {sample.group_size}.")
    if sample.eta < 0:
        raise UserInputError(f"sample.eta must be >= 0, got {sample.eta}.")
    if sample.sampler == "ddim":
        top = num_train_timesteps
        if sample.steps < 1 or (top is not None and sample.steps > top):
            bound = f"between 1 and {top}" if top is not None else ">= 1"
            high = top is not None and sample.steps > top
            fix = f"; set sample.steps (generate: --steps) to at most {top}" if high else ""
            raise UserInputError(f"sample.steps must be {bound} for DDIM, got {sample.steps}{fix}.")


def check_sample_precision(sample: SampleConfig, *, on_gpu: bool, gpu_key: str) -> None:
    """``sample.precision=bf16`` needs the sampling on CUDA (``gpu_key`` puts it there); the
    GPU's own bf16 support is checked where the model is loaded."""
    if sample.precision == "bf16" and not on_gpu:
        raise UserInputError(
            f"sample.precision=bf16 needs CUDA but sampling runs on the CPU here ({gpu_key} is "
            "off); use sample.precision=auto (bf16 on a GPU that has it, else fp32) or fp32."
        )


def check_features(features: FeaturesConfig, names: tuple[str, ...] | None = None) -> None:
    """Batch size, and the weights of feature spaces ``names`` (default: ``features.name``).

    Weights are resolved offline (hub caches or a local file); the error names the model, where it
    looked and how to supply the file. ``features.pretrained`` applies to ``features.name`` only.
    """
    if features.batch_size < 1:
        raise UserInputError(f"features.batch_size must be >= 1, got {features.batch_size}.")
    check_dinov2_preprocess(features)
    for name in (features.name,) if names is None else names:
        check_weights_available(
            name,
            features.pretrained if name == features.name else None,
            clip_model=features.clip_model,
            dinov2_model=features.dinov2_model,
        )


def check_knn(knn: KnnConfig) -> None:
    """k, the duplicate floor, batch size, shards and bootstrap replicates."""
    if knn.k < 1:
        raise UserInputError(f"knn.k must be >= 1, got {knn.k}; raise --k (the paper uses k=3).")
    if not knn.eps > 0:
        raise UserInputError(f"knn.eps must be > 0, got {knn.eps}; e.g. 1e-10.")
    if knn.batch_size < 1:
        raise UserInputError(f"knn.batch_size must be >= 1, got {knn.batch_size}.")
    if knn.shards < 1:
        raise UserInputError(
            f"knn.shards must be >= 1, got {knn.shards}; pass --shards S (1 runs without Ray)."
        )
    if knn.bootstrap < 0:
        raise UserInputError(f"knn.bootstrap must be >= 0, got {knn.bootstrap}.")


def check_select(select: SelectConfig, *, budget_required: bool) -> None:
    """The budget (``raycollapse select``) and the threshold-decay parameters.

    ``budget_required``: ``raycollapse select`` chooses ``select.budget`` rows and cannot select
    ``none``; the loop selects loop.train_size rows and treats ``none`` as a seeded subset.
    """
    if budget_required:
        if select.method == "none":
            raise UserInputError(
                "select.method=none selects nothing; use greedy, threshold or random."
            )
        if select.budget is None:
            raise UserInputError("no budget given; pass --budget B (select.budget=B) with B >= 1.")
        if select.budget <= 0:
            raise UserInputError(
                f"select.budget must be >= 1, got {select.budget}; pass --budget B with 1 <= B <= N."
            )
    if select.method == "threshold":
        if not 0.0 < select.decay < 1.0:
            raise UserInputError(
                f"select.decay must be in (0, 1), got {select.decay}; e.g. --decay 0.9."
            )
        if select.tau0 is not None and select.tau0 <= 0:
            raise UserInputError(
                f"select.tau0 must be > 0, got {select.tau0}; pass a positive --tau0 or omit it "
                "(null) to derive it from the data."
            )


def check_resources(resources: ResourcesConfig) -> None:
    """Actor counts and per-actor requests (whether the cluster has them is checked on it)."""
    for stage in ("generate", "embed"):
        actors = getattr(resources, f"{stage}_actors")
        gpus = getattr(resources, f"{stage}_gpus_per_actor")
        if actors < 0:
            raise UserInputError(
                f"resources.{stage}_actors must be >= 0 (0: in the driver's process), got {actors}."
            )
        if gpus < 0:
            raise UserInputError(f"resources.{stage}_gpus_per_actor must be >= 0, got {gpus}.")
    if resources.cpus_per_actor <= 0:
        raise UserInputError(
            f"resources.cpus_per_actor must be > 0, got {resources.cpus_per_actor}."
        )


# ---------------------------------------------------------------------------------------------
# The loop (docs/design.md, "Paradigms")


def pool_size(cfg: Config) -> int:
    """round(m x B), the number of candidates generated per iteration."""
    return int(round(float(cfg.loop.pool_multiple) * int(cfg.loop.train_size)))


def feature_spaces(cfg: Config) -> list[str]:
    """Every feature space the run embeds into: metric spaces first, then the selection space."""
    names = [str(f) for f in cfg.loop.metric_features]
    if cfg.select.method in ("greedy", "threshold") and cfg.features.name not in names:
        names.append(str(cfg.features.name))
    return names


def check_loop(cfg: Config) -> None:
    """The loop's sizes, paradigm, metric spaces and the weights of every space it embeds into.

    Names in ``loop.metric_features`` are checked when the config loads (``list[Feature]``).
    """
    loop = cfg.loop
    if loop.iterations < 1:
        raise UserInputError(f"loop.iterations must be >= 1, got {loop.iterations}.")
    if loop.train_size < 2:
        raise UserInputError(f"loop.train_size (B) must be >= 2, got {loop.train_size}.")
    if loop.pool_multiple < 1:  # then round(m B) >= B: the pool holds what any paradigm selects
        raise UserInputError(
            f"loop.pool_multiple (m) must be >= 1, got {loop.pool_multiple}: the pool must hold at "
            "least B samples."
        )
    if not 0.0 <= loop.fresh_fraction <= 1.0:
        raise UserInputError(
            f"loop.fresh_fraction (lambda) must be in [0, 1], got {loop.fresh_fraction}."
        )
    if loop.paradigm != "fresh" and loop.fresh_fraction != 0.0:
        raise UserInputError(
            f"loop.fresh_fraction={loop.fresh_fraction} only applies to loop.paradigm=fresh "
            f"(got paradigm={loop.paradigm}); set loop.paradigm=fresh or loop.fresh_fraction=0."
        )
    if not loop.metric_features:
        raise UserInputError(
            "loop.metric_features is empty; list at least one feature space, e.g. [pixel]."
        )
    if cfg.knn.k >= loop.train_size:
        raise UserInputError(f"knn.k={cfg.knn.k} must be < loop.train_size={loop.train_size}.")
    check_features(cfg.features, names=tuple(feature_spaces(cfg)))


# ---------------------------------------------------------------------------------------------
# The paper's settings (docs/reproduction.md)


def check_paper_train(train: TrainConfig) -> None:
    """AdamW's betas."""
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(train, key)
        if not 0.0 <= value < 1.0:
            raise UserInputError(
                f"train.{key} must be in [0, 1), got {value} (the paper: 0.95, 0.999)."
            )


def check_dinov2_preprocess(features: FeaturesConfig) -> None:
    """The Hugging Face processor crops to 224 pixels: the ViT input must be that size."""
    if features.dinov2_preprocess == "hf" and features.dinov2_image_size != 224:
        raise UserInputError(
            "features.dinov2_preprocess=hf crops to 224 x 224 (resize 256, centre crop 224) but "
            f"features.dinov2_image_size={features.dinov2_image_size}; set it to 224 or use "
            "dinov2_preprocess=timm."
        )


def check_metrics(cfg: Config) -> None:
    """Sizes of the paper's metric variants, and the weights they load (offline)."""
    m = cfg.metrics
    for key, low in (
        ("paper_generalization_generated", 1),
        ("paper_generalization_train", 1),
        ("fid_torchvision_generated", 2),
        ("batch_size", 1),
    ):
        if getattr(m, key) < low:
            raise UserInputError(f"metrics.{key} must be >= {low}, got {getattr(m, key)}.")
    if m.use_gpu and (m.paper_generalization or m.fid_torchvision):
        from raycollapse.diffusion.train_parts import resolve_device

        resolve_device(True, "metrics.use_gpu")
    from raycollapse.metrics.paper import paper_settings, resolve_paper_weights

    settings = paper_settings(cfg)
    if settings is not None:
        resolve_paper_weights(settings)
