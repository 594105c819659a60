"""Checks of a loop config that run before any work, each naming the key and the fix."""

from __future__ import annotations

import uuid

from omegaconf import DictConfig

from raycollapse.curation.paradigms import fresh_count
from raycollapse.errors import UserInputError
from raycollapse.features.weights import check_weights_available
from raycollapse.io import storage

FEATURE_NAMES = ("pixel", "clip", "dinov2", "inception")


def feature_spaces(cfg: DictConfig) -> list[str]:
    """Every feature space the run embeds into: metric spaces first, then the selection space."""
    names = [str(f) for f in cfg.loop.metric_features]
    if cfg.select.method in ("greedy", "threshold") and cfg.features.name not in names:
        names.append(str(cfg.features.name))
    return names


def pool_size(cfg: DictConfig) -> int:
    """m x B, the number of candidates generated per iteration."""
    return int(round(float(cfg.loop.pool_multiple) * int(cfg.loop.train_size)))


def check_static(cfg: DictConfig) -> None:
    """Everything that can be checked without reading data."""
    loop = cfg.loop
    if loop.iterations < 1:
        raise UserInputError(f"loop.iterations must be >= 1, got {loop.iterations}.")
    if loop.train_size < 2:
        raise UserInputError(f"loop.train_size (B) must be >= 2, got {loop.train_size}.")
    if loop.pool_multiple < 1:
        raise UserInputError(
            f"loop.pool_multiple (m) must be >= 1, got {loop.pool_multiple}: the pool must hold at least B samples."
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
    for name in loop.metric_features:
        if name not in FEATURE_NAMES:
            raise UserInputError(
                f"unknown feature space '{name}' in loop.metric_features; choose from {', '.join(FEATURE_NAMES)}."
            )
    need = int(loop.train_size) - (
        fresh_count(loop.train_size, loop.fresh_fraction) if loop.paradigm == "fresh" else 0
    )
    if loop.paradigm in ("replace", "accumulate_all", "fresh") and pool_size(cfg) < need:
        raise UserInputError(
            f"the pool of m x B = {pool_size(cfg)} samples is smaller than the {need} the selection must "
            "choose; raise loop.pool_multiple."
        )
    if cfg.select.method == "threshold":
        if not 0.0 < cfg.select.decay < 1.0:
            raise UserInputError(f"select.decay must be in (0, 1), got {cfg.select.decay}.")
        if cfg.select.tau0 is not None and cfg.select.tau0 <= 0:
            raise UserInputError(
                f"select.tau0 must be > 0 (or null to derive it), got {cfg.select.tau0}."
            )
    if cfg.knn.k >= loop.train_size:
        raise UserInputError(f"knn.k={cfg.knn.k} must be < loop.train_size={loop.train_size}.")
    for name in feature_spaces(cfg):
        pretrained = cfg.features.pretrained if name == cfg.features.name else None
        check_weights_available(name, pretrained)  # raises naming the model and how to supply it


def check_real_size(cfg: DictConfig, n_real: int) -> None:
    """B (and the fresh images every iteration) must fit in the real data."""
    loop = cfg.loop
    if loop.train_size > n_real:
        raise UserInputError(
            f"loop.train_size (B) = {loop.train_size} but the real data holds {n_real} images; "
            "lower loop.train_size or use more real data (data.n / data.path)."
        )
    if loop.paradigm == "fresh":
        total = loop.train_size + fresh_count(loop.train_size, loop.fresh_fraction) * (
            loop.iterations - 1
        )
        if total > n_real:
            raise UserInputError(
                f"paradigm fresh uses {total} distinct real images over {loop.iterations} iterations "
                f"but the real data holds {n_real}; lower loop.fresh_fraction or loop.iterations."
            )


def check_writable(uri: str) -> None:
    """The run's storage must accept a file: create, write and delete a probe."""
    probe = storage.join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(uri)
        storage.write_text_atomic(probe, "ok")
        fs, path = storage.open_fs(probe)
        fs.delete_file(path)
    except (OSError, PermissionError) as exc:
        raise UserInputError(
            f"cannot write to loop.storage='{uri}' ({exc}); choose a writable folder or URI."
        ) from None
