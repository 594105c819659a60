"""Sweeps: Ray Tune over loop configs (docs/design.md, "Layers").

- :mod:`raycollapse.sweeps.config`: the typed sweep config, its loading and its checks;
- :mod:`raycollapse.sweeps.space`: the search space (grid, choice, distributions, variants);
- :mod:`raycollapse.sweeps.trials`: what one trial computes, without Ray;
- :mod:`raycollapse.sweeps.results`: the results table, ``best.yaml`` and the summary;
- :mod:`raycollapse.sweeps.tuner`: the Ray Tune layer (trainables, scheduler, resume).
"""
