"""The config tree: OmegaConf structured dataclasses, one section per concern.

Every name list a user may choose from is defined here once, as a ``Literal`` that OmegaConf
enforces when the config is loaded; the tuple each module needs is derived from it with
``typing.get_args`` (e.g. ``PRESET_NAMES``). Each field is documented by the string below it:
what it is, its unit and its allowed values. This module imports nothing of the project, so any
module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Source = Literal["digits", "cifar10", "folder", "parquet", "mog"]
Preset = Literal["tiny", "unet32", "unet48", "unet64", "unet128", "mlp"]
Sampler = Literal["ddim", "ddpm"]
Feature = Literal["pixel", "clip", "dinov2", "inception"]
SelectMethod = Literal["none", "random", "greedy", "threshold"]
Paradigm = Literal["replace", "accumulate", "accumulate_all", "fresh"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
SamplePrecision = Literal["auto", "fp32", "bf16"]
Init = Literal["scratch", "finetune"]
ComputeBackend = Literal["auto", "numpy", "torch"]
Launcher = Literal["auto", "ray", "process"]

SOURCES: tuple[str, ...] = get_args(Source)
PRESET_NAMES: tuple[str, ...] = get_args(Preset)
SAMPLERS: tuple[str, ...] = get_args(Sampler)
FEATURE_NAMES: tuple[str, ...] = get_args(Feature)
SELECT_METHODS: tuple[str, ...] = get_args(SelectMethod)
PARADIGMS: tuple[str, ...] = get_args(Paradigm)


@dataclass
class DataConfig:
    """Where the real images come from and how they are shaped."""

    source: Source = "digits"
    """digits (scikit-learn's 1,797 8x8 images, built in), cifar10, folder (image files) or parquet."""
    path: str | None = None
    """Local path of the data; required for cifar10, folder and parquet, unused for digits."""
    n: int | None = None
    """Size of a seeded random subset of the source (>= 1); null = every image."""
    resolution: int = 8
    """Side in pixels: images are resized and center-cropped to resolution x resolution."""
    channels: int = 1
    """1 (grayscale) or 3 (RGB)."""
    seed: int = 0
    """Seed of the subset drawn when ``n`` is set."""
    on_corrupt: Literal["skip", "error"] = "error"
    """Unreadable image files: skip them (and count them) or refuse the data."""
    on_small: Literal["upscale", "skip", "error"] = "error"
    """Images smaller than ``resolution``: resize them up, skip them or refuse (digits always upscale)."""
    image_column: str = "image"
    """parquet sources: the column of encoded images."""
    label_column: str | None = "label"
    """parquet sources: the column of integer labels; null = unlabelled."""
    mog: MogConfig = field(default_factory=lambda: MogConfig())
    """mog source: the mixture of Gaussians the real vectors are drawn from (``data.n`` vectors,
    drawn with ``data.seed``; docs/design.md, "Mixture of Gaussians")."""


@dataclass
class ModelConfig:
    """The diffusers ``UNet2DModel`` and its conditioning."""

    preset: Preset = "tiny"
    """tiny (a CPU-sized model for 8x8 or 16x16) or the paper's UNet32/48/64/128 (base widths 32..128)."""
    class_conditional: bool = False
    """Condition on class labels (needs labelled data); enables classifier-free guidance."""
    num_classes: int = 10
    """Number of classes (>= 1) of a class-conditional model; labels are 0..num_classes-1."""
    label_dropout: float = 0.1
    """Share of training labels replaced by the null label, in [0, 1] (classifier-free guidance)."""
    seed: int = 0
    """Seed of the initial weights."""


@dataclass
class DiffusionConfig:
    """The DDPM noise schedule (Ho et al. 2020): linear betas over ``num_train_timesteps``."""

    num_train_timesteps: int = 1000
    """Diffusion steps T of training (>= 2); DDPM sampling runs all of them."""
    beta_start: float = 1e-4
    """Noise variance at the first step; 0 < beta_start < beta_end < 1."""
    beta_end: float = 0.02
    """Noise variance at the last step; 0 < beta_start < beta_end < 1."""
    beta_schedule: Literal["linear"] = "linear"
    """How betas go from beta_start to beta_end: linear (the only one the paper uses)."""


@dataclass
class TrainConfig:
    """Training of the DDPM: optimiser, EMA, precision, checkpoints and Ray Train workers."""

    steps: int = 2000
    """Optimisation steps (>= 1)."""
    batch_size: int = 64
    """Images per step over all workers (>= train.workers; each takes batch_size // workers)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (> 0), reached after the warmup, then cosine decay to 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warmup."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights that are saved, in [0, 1)."""
    grad_clip: float = 1.0
    """Maximum global gradient norm."""
    mixed_precision: MixedPrecision = "auto"
    """auto (bf16 on a GPU that has it, else fp32), no (fp32), bf16 or fp16 (bf16/fp16 need CUDA)."""
    seed: int = 0
    """Seed of the batch order and the noise; the loop derives one per iteration from the run seed."""
    log_every: int = 100
    """Steps between progress lines on stderr."""
    checkpoint_every: int = 500
    """Steps between training-state saves (resume after a crash); 0 = none."""
    sample_grid: int = 64
    """Samples drawn into train.out/samples.png after training (``sample`` settings); 0 = none."""
    init: Init = "scratch"
    """scratch (new weights, the paper's code) or finetune (start from ``init_from``)."""
    init_from: str | None = None
    """Checkpoint folder to fine-tune (``raycollapse train`` with init=finetune); the loop uses the previous model."""
    out: str = "runs/train"
    """Output folder of ``raycollapse train``."""
    workers: int = 1
    """Ray Train workers (DDP), >= 1 (train.launcher=auto: one worker on a CPU trains in the
    calling process)."""
    launcher: Launcher = "auto"
    """Where training runs: ray (Ray Train's TorchTrainer, DDP over train.workers), process (the
    same training loop in the calling process: one worker, no Ray start-up, ~20 s less per train
    stage on a laptop) or auto (process for one worker without a GPU, else ray). One worker
    trains the same weights either way (docs/design.md, "Training")."""
    use_gpu: bool = False
    """One GPU per worker; an error where CUDA is missing."""
    cpu_threads: int | None = None
    """Torch threads per CPU worker (>= 1); null = torch's default (all cores)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may make from the latest checkpoint."""
    adam_beta1: float = 0.9
    """AdamW beta1, in [0, 1) (the paper's code: 0.95)."""
    adam_beta2: float = 0.999
    """AdamW beta2, in [0, 1) (the paper's code: 0.999)."""
    compile: bool = False
    """torch.compile the network for training (inductor; needs a C++ compiler on CPU workers):
    faster steps after a slow first one, and other rounding than eager mode."""
    sample_from: Literal["ema", "raw"] = "ema"
    """The weights saved and sampled: ema (the moving average, train.ema_decay) or raw (the last
    step's; the paper's code, which keeps no EMA unless run with --use_ema)."""
    in_memory_gb: float = 8.0
    """A worker holds its shard in memory (seeded batch indices) while its decoded images take at
    most this many GB (uint8 + float32: 5 bytes a value); above, it streams it (stream_buffer)."""
    stream_buffer: int = 4096
    """Images in each streaming worker's seeded shuffle buffer (>= 1; with train.in_memory_gb)."""


@dataclass
class SampleConfig:
    """Sampling: DDIM or DDPM, optional classifier-free guidance (docs/design.md, "Seeding")."""

    sampler: Sampler = "ddim"
    """ddim (``steps`` steps; see benchmarks/README.md, DDPM section) or ddpm (all steps)."""
    steps: int = 100
    """DDIM steps, 1..diffusion.num_train_timesteps; DDPM always runs all of them."""
    eta: float = 1.0
    """DDIM noise (>= 0): 0 = deterministic ODE, 1 = DDPM-like. The default DDIM-100 with eta 1
    came within 5 % of DDPM-1000's pixel FD over three seeds, at a tenth of its cost (DDIM-50
    with eta 0.5: +14 %); benchmarks/README.md, "Several seeds"."""
    guidance: float | None = None
    """Classifier-free guidance scale w: eps_u + w (eps_c - eps_u); needs a class-conditional model."""
    label: int | None = None
    """Class of every sample (class-conditional models); null = sample id mod num_classes."""
    n: int = 64
    """Samples to generate (>= 1; ``raycollapse generate --n``)."""
    out: str | None = None
    """Output of ``raycollapse generate``: .npy array, .png grid or a new folder of Parquet shards."""
    batch_size: int = 256
    """Samples per call and per Parquet shard (>= 1); changes memory use, not the samples."""
    group_size: int = 64
    """Samples per network evaluation (>= 1), aligned to sample ids; changing it changes rounding."""
    use_gpu: bool = False
    """``raycollapse generate`` on CUDA (an error where there is none)."""
    precision: SamplePrecision = "auto"
    """The network's precision while sampling: auto (bf16 autocast on a CUDA GPU that has it,
    else fp32), fp32, or bf16 (needs such a GPU). Part of a pool's identity."""
    compile: bool = False
    """torch.compile the network for sampling (faster on GPUs after the first, slow group;
    other rounding than eager mode). Part of a pool's identity."""
    seed: int = 0
    """Pool seed: sample i depends only on (checkpoint, seed, i, sampler settings); the loop derives
    one per iteration from the run seed."""


@dataclass
class FeaturesConfig:
    """The feature space that entropy, selection and the metrics work in."""

    name: Feature = "pixel"
    """pixel (raw pixels / 255), clip (open_clip), dinov2 (timm, CLS token) or inception (2048-d pool)."""
    pretrained: str | None = None
    """Weights: a hub tag found in the local caches, a local file, or "none" (random); null = default tag."""
    batch_size: int = 256
    """Images per forward pass (>= 1); does not change the embeddings."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage type of the embeddings."""
    clip_model: str = "ViT-B-32"
    """open_clip architecture (``open_clip.list_models()``)."""
    dinov2_model: str = "vit_small_patch14_dinov2.lvd142m"
    """timm model name (arch.tag)."""
    dinov2_image_size: int = 224
    """DINOv2 input side in pixels; timm resamples the position embedding."""
    normalize: bool = False
    """L2-normalise every embedding (e.g. cosine geometry for CLIP)."""
    amp: bool = False
    """Autocast float16 on CUDA: faster, embeddings differ slightly from fp32."""
    dinov2_preprocess: Literal["timm", "hf"] = "timm"
    """DINOv2 input: timm (bicubic resize to dinov2_image_size) or hf (Hugging Face's
    facebook/dinov2-small processor, the paper's code: PIL bicubic resize of the shorter side to
    256, centre crop 224, ImageNet mean/std; needs dinov2_image_size=224)."""


@dataclass
class KnnConfig:
    """Exact kNN and the Kozachenko-Leonenko entropy (docs/design.md, "KL entropy")."""

    k: int = 3
    """The k-th nearest neighbour of the estimator (>= 1, below the number of points)."""
    eps: float = 1e-10
    """Floor (> 0) on r_k for exact duplicates, in feature units (the paper's code uses 1e-10)."""
    batch_size: int = 65536
    """Query rows per search call (>= 1): memory ~ batch_size x (4 d + 16 (k + 9)) bytes.

    With shards, also the rows a shard groups at once (more per partition list prune better)."""
    shards: int = 1
    """Ray actors holding one shard of the index each (>= 1); 1 = in-process, no Ray."""
    bootstrap: int = 0
    """Bootstrap replicates for a confidence interval of the entropy (>= 0); 0 = none."""
    device: str = "cpu"
    """Where the in-process kNN runs: cpu, cuda, cuda:N or auto (CUDA when present); same result."""
    backend: ComputeBackend = "auto"
    """numpy (CPU only), torch (any device) or auto (torch on CUDA, numpy on the CPU)."""


@dataclass
class SelectConfig:
    """Choosing B of the candidates (docs/design.md, "Greedy selection", "Threshold decay")."""

    method: SelectMethod = "greedy"
    """greedy (farthest point), threshold (threshold decay), random, or none (a seeded subset)."""
    budget: int | None = None
    """B, the rows ``raycollapse select`` chooses (>= 1); the loop uses loop.train_size instead."""
    seed: int = 0
    """Seed of the first greedy point, the threshold shuffle and random selection (the loop adds
    it to the run seed)."""
    tau0: float | None = None
    """Initial threshold tau0 (> 0), in feature units; null = derived from the data."""
    decay: float = 0.9
    """Factor applied to tau after each threshold pass, in (0, 1)."""
    device: str = "cpu"
    """Where greedy and threshold decay run: cpu, cuda, cuda:N or auto (CUDA when present);
    the same indices on every device."""
    backend: ComputeBackend = "auto"
    """numpy (CPU only), torch (any device) or auto (torch on CUDA, numpy on the CPU)."""


@dataclass
class ResourcesConfig:
    """Ray resources per stage. GPUs are requested, never silently replaced by CPUs."""

    generate_actors: int = 1
    """Actors of the generation stage (>= 1); 0 runs it in the driver's process
    (no Ray Data start-up, the same shards; for pools of seconds, like the MoG laboratory)."""
    generate_gpus_per_actor: float = 0.0
    """GPUs per generation actor (>= 0; fractions share a GPU)."""
    embed_actors: int = 1
    """Actors of the embedding stage (>= 1); 0 runs it in the driver's process
    (no Ray Data start-up, the same shards; for pools of seconds, like the MoG laboratory)."""
    embed_gpus_per_actor: float = 0.0
    """GPUs per embedding actor (>= 0; fractions share a GPU)."""
    cpus_per_actor: float = 1.0
    """CPUs per generation or embedding actor (> 0)."""


@dataclass
class LoopConfig:
    """The self-consuming loop (docs/design.md, "Paradigms"; Shi et al., NeurIPS 2025, Sec. 5)."""

    iterations: int = 4
    """Iterations (>= 1); iteration 0 trains on real data."""
    train_size: int = 128
    """B, the size of every training set (>= 2; accumulate_all grows by B per iteration)."""
    pool_multiple: float = 2.0
    """m (>= 1): each iteration generates round(m x B) candidates (the paper uses 1, 2 and 5)."""
    paradigm: Paradigm = "replace"
    """How candidates and training sets are built: replace, accumulate, accumulate_all or fresh."""
    fresh_fraction: float = 0.0
    """lambda in [0, 1] for paradigm=fresh: round(lambda B) fresh real images per training set."""
    metric_features: list[Feature] = field(default_factory=lambda: ["pixel"])
    """Feature spaces the metrics are computed in (at least one); the first also finds memorized pairs."""
    storage: str = "runs/run"
    """The run folder: a local path or a pyarrow filesystem URI (docs/design.md, "Run directory")."""
    accumulate_baseline: Literal["uniform", "per_generation"] = "uniform"
    """select.method=none: uniform (a seeded random subset of all candidates) or per_generation
    (the paper's code: floor(B / G) + 1 from each of the G origins, oldest first, cut to B)."""


@dataclass
class Config:
    """The root of the tree. Each command reads the sections it needs."""

    seed: int = 0
    """Run seed: every random choice of the loop derives from it (docs/design.md, "Seeding")."""
    data: DataConfig = field(default_factory=DataConfig)
    """Real data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The UNet."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The noise schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Sampling."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """The feature space of entropy and selection."""
    knn: KnnConfig = field(default_factory=KnnConfig)
    """kNN and entropy."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Selection."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Ray resources."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The self-consuming loop."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig())
    """Experiment tracking (TensorBoard by default; MLflow, Weights & Biases)."""
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig())
    """Optional metric variants of the loop (the paper's own computations)."""


@dataclass
class TrackingConfig:
    """Where ``raycollapse run`` and ``raycollapse sweep`` log per-iteration metrics besides the
    run folder. Changing it never changes a run's results."""

    tensorboard: bool = True
    """TensorBoard event files in <run>/tensorboard/ (every metric per iteration, the sample grid)."""
    mlflow: bool = False
    """Log to MLflow (needs `pip install mlflow`); sweeps use Ray Tune's MLflowLoggerCallback."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (e.g. http://host:5000 or file:./mlruns); null: MLflow's default."""
    mlflow_experiment: str = "raycollapse"
    """MLflow experiment name (created when absent)."""
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb`); sweeps use Ray Tune's WandbLoggerCallback."""
    wandb_project: str = "raycollapse"
    """Weights & Biases project name."""
    wandb_mode: Literal["online", "offline"] | None = None
    """Weights & Biases mode: online, offline (sync later with `wandb sync`); null: its default."""


@dataclass
class MetricsConfig:
    """The paper's metric variants, computed by the loop beside its own (docs/reproduction.md)."""

    paper_generalization: bool = False
    """Add generalization_score_paper: mean over generated images of the minimum mean squared
    difference to a random subset of the training set, on all DINOv2 tokens (the paper's code)."""
    paper_generalization_generated: int = 1000
    """Generated images of generalization_score_paper (>= 1; the paper's code: 1,000)."""
    paper_generalization_train: int = 1280
    """Training images of generalization_score_paper (>= 1; the paper's code: 5 batches of 256)."""
    fid_torchvision: bool = False
    """Add fid_torchvision: FID with torchvision's ImageNet Inception-v3 (resize 299, inputs in
    [-1, 1]) of the first generated images against all real images (the paper's FID.py)."""
    fid_torchvision_generated: int = 32768
    """Generated images of fid_torchvision (>= 2): the first ones of the pool (the paper's: 32,768)."""
    torchvision_inception: str | None = None
    """Weights of fid_torchvision: a local file, "none" (random, tests only) or null = torchvision's
    IMAGENET1K_V1 file found in torch hub's cache."""
    batch_size: int = 256
    """Images per forward pass of these metrics (>= 1); does not change the values."""
    use_gpu: bool = False
    """Compute these metrics on CUDA (on the driver); an error where there is none."""


@dataclass
class MogConfig:
    """A mixture of K Gaussians in d dimensions (``data.source=mog``): vector data, not images.

    Each of ``weights``, ``means`` and ``covariances`` is given or, when null, drawn from ``seed``.
    """

    components: int = 2
    """K, the number of components (>= 1)."""
    dim: int = 2
    """d, the dimension of the vectors (>= 1)."""
    weights: list[float] | None = None
    """K positive weights (normalised to sum 1); null = equal weights 1/K."""
    means: list[list[float]] | None = None
    """K means of d values each; null = drawn uniformly in [-spread, spread]^d."""
    covariances: list[list[list[float]]] | None = None
    """K symmetric positive-definite d x d matrices; null = random rotations of axis variances
    drawn log-uniformly in [scale^2 / 4, scale^2]."""
    spread: float = 1.0
    """Half-width (> 0) of the box random means are drawn in."""
    scale: float = 0.2
    """Largest standard deviation (> 0) along an axis of a random covariance."""
    seed: int = 0
    """Seed of the random parameters (the samples use ``data.seed``)."""
    mc_samples: int = 200000
    """Monte Carlo samples (>= 1000) of the true entropy when K > 1 (K = 1 is closed form)."""
