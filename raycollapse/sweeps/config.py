"""The sweep config (OmegaConf structured dataclasses), its loading and its checks.

``raycollapse sweep SWEEP_CONFIG [key=value ...]``: the YAML file is merged over
:class:`SweepConfig`'s defaults, then the overrides; ``base.<loop key>=value`` overrides the base
loop config instead (``base.loop.iterations=2``). An unknown key or a wrong type, in the sweep
config, in the base loop config or in the search space, fails before any trial starts, naming
the key. See :mod:`raycollapse.sweeps.space` for the search space.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raycollapse.config import Config, explain, load_config, to_dict
from raycollapse.config.checks import check_run, feature_spaces
from raycollapse.config.load import read_yaml_mapping
from raycollapse.errors import UserInputError
from raycollapse.sweeps.space import SearchSpace, parse_space
from raycollapse.tracking import check_tracking

SELECT_METRICS = ("entropy", "min_pairwise_distance", "coverage_radius", "seconds")
# Loop metrics every iteration row has, besides the per-feature-space ones (loop_metric_names).
_LOOP_COMMON = ("precision", "recall", "density", "coverage", "fid", "train_size")
_LOOP_PER_FEATURE = (
    "entropy_train",
    "entropy_pool",
    "entropy_generated",
    "generalization_score",
    "memorized_fraction",
)
_LOOP_STAGES = ("train_set", "train", "generate", "embed")


@dataclass
class ObjectiveConfig:
    """What a sweep optimises: a per-iteration metric, at the last iteration or its mean."""

    metric: str = "generalization_score"
    mode: Literal["max", "min"] = "max"
    reduce: Literal["last", "mean"] = "last"  # mean: over the iterations reported so far


@dataclass
class SchedulerConfig:
    """Early stopping of loop trials: ASHA over iterations, or none (every trial runs to the end)."""

    name: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # iterations every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung


@dataclass
class TrialResourcesConfig:
    """Ray resources of one trial's own process (its Ray Data and Ray Train work asks for more).

    ``cpu: null``: 1 for select trials (they compute in the trial); 0 for loop trials, whose
    process only drives Ray Train and Ray Data work that reserves its own resources.
    """

    cpu: float | None = None
    gpu: float = 0.0


@dataclass
class SweepConfig:
    """The root of a sweep config file."""

    kind: Literal["loop", "select"] = "loop"
    base: Any = None  # path of a loop config YAML, or the loop config tree inline; null = defaults
    pool: str | None = None  # select trials: embeddings (.npy / Parquet); null = pixels of data
    space: dict[str, Any] = field(default_factory=dict)
    variants: list[Any] = field(default_factory=list)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_samples: int = 1  # samples of the space (each grid point num_samples times)
    max_concurrent_trials: int | None = None  # null: as many as the cluster fits
    resources: TrialResourcesConfig = field(default_factory=TrialResourcesConfig)
    seed: int = 0  # the draws of choice / uniform / loguniform / randint
    storage: str = "runs/sweep"  # results, Tune state and (loop trials) one run folder per trial


@dataclass(frozen=True)
class Sweep:
    """A loaded, checked sweep: its config, the base loop config and the parsed space."""

    cfg: DictConfig
    base: DictConfig
    space: SearchSpace

    @property
    def storage(self) -> str:
        """The sweep's folder, absolute when local (Tune starts each trial in its own folder)."""
        s = str(self.cfg.storage)
        return s if "://" in s else os.path.abspath(s)

    def trial_config(self, values: dict[str, Any]) -> DictConfig:
        """The full loop config of a trial: the base with ``values`` (dotted keys) set."""
        return with_values(self.base, values, "trial")


def _dotlist(key: str, value: Any) -> str:
    # JSON is YAML, so OmegaConf reads every value back with its type (strings stay strings).
    return f"{key}={json.dumps(value)}"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_values(cfg: DictConfig, values: dict[str, Any], origin: str) -> DictConfig:
    """``cfg`` with dotted ``values`` set, type-checked; errors name the key and the value."""
    out = cfg
    for key, value in values.items():
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([_dotlist(key, value)]))
        except OmegaConfBaseException as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserInputError(f"{origin}: bad value {value!r} for '{key}': {first}") from None
    OmegaConf.set_struct(out, True)
    return out


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep config, apply ``key=value`` overrides, load its base loop config, parse its
    space (not yet checked against data: see :func:`check_sweep`)."""
    p = Path(path)
    data = read_yaml_mapping(p, "sweep config", "pass a YAML file (configs/sweeps/)")
    sweep_schema = OmegaConf.structured(SweepConfig)
    cfg = sweep_schema
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise explain(exc, sweep_schema, f"in {p.name}", "sweep config") from None
    base_overrides: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise UserInputError(
                f"override '{item}' must look like key=value (e.g. num_samples=4)."
            )
        if item.startswith("base."):
            base_overrides.append(item[len("base.") :])
            continue
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise explain(exc, sweep_schema, f"override '{item}'", "sweep config") from None
    OmegaConf.set_struct(cfg, True)
    base = _load_base(cfg.base, base_overrides)
    schema = to_dict(OmegaConf.structured(Config))
    space = parse_space(
        OmegaConf.to_container(cfg.space, resolve=True),  # type: ignore[arg-type]
        OmegaConf.to_container(cfg.variants, resolve=True),  # type: ignore[arg-type]
        schema,
    )
    return Sweep(cfg, base, space)


def _load_base(base: Any, overrides: list[str]) -> DictConfig:
    if base is None or isinstance(base, str):
        return load_config(base, overrides)
    tree = OmegaConf.to_container(base, resolve=True)
    if not isinstance(tree, dict):
        raise UserInputError("base must be a loop config file path or a loop config mapping.")
    inline = [_dotlist(k, v) for k, v in _flat(tree).items()]
    return load_config(None, inline + list(overrides))


def loop_metric_names(cfg: DictConfig) -> set[str]:
    """The metric columns of the loop's per-iteration rows for the loop config ``cfg``."""
    names = set(_LOOP_COMMON) | {f"seconds_{s}" for s in _LOOP_STAGES}
    for i, f in enumerate(feature_spaces(cfg)):
        suffix = "" if i == 0 else f"_{f}"
        names |= {f"{m}{suffix}" for m in _LOOP_PER_FEATURE} | {f"fd_{f}"}
    return names


def check_sweep(sweep: Sweep, pool_rows: int | None = None) -> list[DictConfig]:
    """Every check that can run before a trial starts; each error names the key to fix.

    Every value a trial can take (grid and choice values, range bounds, variants) is set into the
    base loop config (type check) and checked like ``raycollapse run`` / ``select`` would check
    it; a tracking service the base config asks for must be installed. ``pool_rows``: the size
    of the select trials' pool (budgets are checked against it).
    Returns those loop configs (the base first).
    """
    c = sweep.cfg
    for key, value, low in (
        ("num_samples", c.num_samples, 1),
        ("max_concurrent_trials", c.max_concurrent_trials, 1),
        ("scheduler.grace_period", c.scheduler.grace_period, 1),
    ):
        if value is not None and value < low:
            raise UserInputError(f"{key} must be >= {low}, got {value}.")
    if c.scheduler.reduction_factor <= 1:
        raise UserInputError(
            f"scheduler.reduction_factor must be > 1, got {c.scheduler.reduction_factor}."
        )
    if (c.resources.cpu is not None and c.resources.cpu < 0) or c.resources.gpu < 0:
        raise UserInputError("resources.cpu and resources.gpu must be >= 0.")
    check_tracking(sweep.base.tracking)
    configs = [sweep.base]
    for key, values in sweep.space.values_to_check().items():
        configs += [with_values(sweep.base, {key: v}, "space") for v in values]
    configs += [with_values(sweep.base, v, "variants") for v in sweep.space.variants]
    if c.kind == "select":
        _check_select(sweep, configs, pool_rows)
        metrics: set[str] = set(SELECT_METRICS)
    else:
        for cfg in configs:
            check_run(cfg)
        most = max(int(cfg.loop.iterations) for cfg in configs)
        if c.scheduler.name == "asha" and c.scheduler.grace_period > most:
            raise UserInputError(
                f"scheduler.grace_period={c.scheduler.grace_period} is more than the most "
                f"iterations a trial runs ({most}); lower it or use scheduler.name=none."
            )
        metrics = set().union(*(loop_metric_names(cfg) for cfg in configs))
    if c.objective.metric not in metrics:
        hint = difflib.get_close_matches(c.objective.metric, sorted(metrics), n=1)
        raise UserInputError(
            f"objective.metric '{c.objective.metric}' is not a metric of {c.kind} trials; choose from "
            f"{', '.join(sorted(metrics))}." + (f" Did you mean '{hint[0]}'?" if hint else "")
        )
    return configs


def _check_select(sweep: Sweep, configs: list[DictConfig], pool_rows: int | None) -> None:
    outside = [k for k in sweep.space.keys() if not k.startswith(("select.", "knn."))]
    if outside:
        raise UserInputError(
            f"select trials run selection on a fixed pool, so they sweep only select.* and knn.* "
            f"keys; got {', '.join(outside)} (use kind: loop to sweep those)."
        )
    for cfg in configs:
        sel = cfg.select
        if sel.method == "none":
            raise UserInputError("select trials need select.method greedy, threshold or random.")
        if sel.budget is None or sel.budget < 2:
            raise UserInputError(f"select.budget must be set and >= 2, got {sel.budget}.")
        if pool_rows is not None and sel.budget > pool_rows:
            raise UserInputError(
                f"select.budget={sel.budget} is larger than the pool ({pool_rows} rows)."
            )
        if cfg.knn.k < 1 or cfg.knn.k >= sel.budget:
            raise UserInputError(
                f"knn.k={cfg.knn.k} must be >= 1 and < select.budget={sel.budget}."
            )
        if sel.method == "threshold":
            if not 0.0 < sel.decay < 1.0:
                raise UserInputError(f"select.decay must be in (0, 1), got {sel.decay}.")
            if sel.tau0 is not None and sel.tau0 <= 0:
                raise UserInputError(f"select.tau0 must be > 0 (or null), got {sel.tau0}.")


def sweep_yaml(sweep: Sweep) -> str:
    """The resolved sweep (config and base loop config): saved beside the results, compared on
    resume."""
    return yaml.safe_dump(
        {"sweep": to_dict(sweep.cfg), "base": to_dict(sweep.base)}, sort_keys=True
    )
