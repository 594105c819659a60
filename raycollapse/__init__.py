"""raycollapse: a Ray-native laboratory for model collapse in diffusion models.

Layers by package (docs/design.md, "Layers"); only ``stages`` imports Ray, ``loop`` and ``cli``
reach it through ``stages``:

- ``raycollapse.errors``     UserInputError, the one user-fixable error.
- ``raycollapse.seeds``      derive_seed, the one seed derivation (docs/design.md, "Seeding").
- ``raycollapse.config``     the typed config tree (OmegaConf), loading and overrides.
- ``raycollapse.io``         storage URIs, atomic writes, images, Parquet shard folders.
- ``raycollapse.data``       real data sources and command inputs.
- ``raycollapse.neighbors``  exact distances and exact (FAISS, partition-pruned) kNN.
- ``raycollapse.curation``   KL entropy, greedy, threshold decay, random selection, paradigms.
- ``raycollapse.diffusion``  UNet presets, samplers and loss, trainer, checkpoints.
- ``raycollapse.features``   pixel / CLIP / DINOv2 / Inception extractors and weights.
- ``raycollapse.metrics``    generalization score, memorized fraction, FD, PRDC.
- ``raycollapse.stages``     the Ray layer: generation, embedding, sharded kNN, training.
- ``raycollapse.loop``       the self-consuming loop, its run directory and resume.
- ``raycollapse.report``     the HTML report of runs.
- ``raycollapse.cli``        the ``raycollapse`` command.
"""

__version__ = "0.1.0"
