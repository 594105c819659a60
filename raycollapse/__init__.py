"""raycollapse: a Ray-native laboratory for model collapse in diffusion models.

Layers (see DESIGN.md in the project's shared notes and README.md):

- ``raycollapse.core``   math, model and data; never imports Ray.
- ``raycollapse.stages`` Ray adapters: generation, embedding, sharded kNN, training.
- ``raycollapse.loop``   the recursive self-consuming loop and its run directory.
- ``raycollapse.report`` the HTML report of runs.
- ``raycollapse.cli``    the ``raycollapse`` command.
"""

__version__ = "0.1.0"
