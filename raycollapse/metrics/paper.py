"""The paper's own metric computations, beside the project's (docs/reproduction.md).

- ``generalization_score_paper`` (the paper's ``memorization_score_npy.py``): for each of the
  first G generated images, the minimum over a random subset of T training images of the mean
  squared difference of their DINOv2 outputs, *all tokens* (Hugging Face ``last_hidden_state``:
  CLS and patches); the score is the mean over the G images. The project's
  ``generalization_score`` is instead the mean Euclidean nearest-neighbour distance to the whole
  training set in one feature space (docs/design.md, "Generalization score").
- ``fid_torchvision`` (the paper's ``FID.py``): the Fréchet distance between torchvision
  Inception-v3 pool features of the first N generated images and of all real images
  (:mod:`~raycollapse.features.torchvision_inception`), beside clean-fid's ``fid``.

:func:`paper_settings` reads them from a config, :func:`resolve_paper_weights` checks their
weights offline before any work, :func:`paper_metrics` computes the row's columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from raycollapse.config.load import to_dict
from raycollapse.errors import UserInputError
from raycollapse.metrics.distribution import frechet_distance
from raycollapse.neighbors.knn import knn_search
from raycollapse.neighbors.validate import as_features, check_same_dim
from raycollapse.seeds import derive_rng

__all__ = [
    "paper_generalization_score",
    "paper_metrics",
    "paper_settings",
    "resolve_paper_weights",
]

_TRAIN_SUBSET = 0x6E5  # seed purpose of the training subset (docs/design.md, "Seeding")


def paper_generalization_score(generated_tokens: np.ndarray, train_tokens: np.ndarray) -> float:
    """Mean over generated rows of the minimum over training rows of the mean squared difference.

    Rows are ``N x tokens x dim`` arrays (or already flat ``N x D``): the mean is over all
    ``tokens x dim`` entries, as ``np.mean((a - b) ** 2)`` in the paper's code. Exact: squared
    nearest-neighbour distances divided by D.
    """
    gen = np.asarray(generated_tokens)
    tr = np.asarray(train_tokens)
    gen = as_features(gen.reshape(len(gen), -1), "generated tokens", min_rows=1)
    tr = as_features(tr.reshape(len(tr), -1), "training tokens", min_rows=1)
    check_same_dim(gen, tr, "generated tokens", "training tokens")
    d1 = knn_search(tr, gen, 1).distances[:, 0].astype(np.float64)
    return float(np.mean(d1 * d1) / gen.shape[1])


def paper_settings(cfg: Any) -> dict[str, Any] | None:
    """The plain settings :func:`paper_metrics` needs from a config tree; ``None`` when neither
    ``metrics.paper_generalization`` nor ``metrics.fid_torchvision`` is on.

    DINOv2 is built as the run's ``features`` section says (weights ``features.pretrained`` when
    ``features.name`` is dinov2, else its default tag; ``features.dinov2_preprocess``).
    """
    m = to_dict(cfg.metrics)
    if not (m["paper_generalization"] or m["fid_torchvision"]):
        return None
    dinov2 = to_dict(cfg.features)
    if dinov2["name"] != "dinov2":
        dinov2["pretrained"] = None
    dinov2["name"] = "dinov2"
    return {**m, "dinov2": dinov2, "seed": int(cfg.seed)}


def resolve_paper_weights(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve (offline) the weights the enabled metrics load: ``{"dinov2": ..., "inception": ...}``.

    Raises the same ``UserInputError`` as the embedding stages for weights that are not here.
    """
    from raycollapse.features.torchvision_inception import resolve_torchvision_inception
    from raycollapse.features.weights import check_weights_available

    out: dict[str, Any] = {}
    if settings["paper_generalization"]:
        d = settings["dinov2"]
        out["dinov2"] = check_weights_available(
            "dinov2", d["pretrained"], dinov2_model=d["dinov2_model"]
        )
    if settings["fid_torchvision"]:
        out["inception"] = resolve_torchvision_inception(settings["torchvision_inception"])
    return out


def paper_metrics(
    settings: Mapping[str, Any] | None,
    *,
    generated: np.ndarray,
    train: np.ndarray,
    real: np.ndarray,
    iteration: int,
) -> dict[str, float | None]:
    """The columns ``generalization_score_paper`` and ``fid_torchvision`` that are enabled.

    ``generated``: the iteration's pool in id order; ``train``: its training set; ``real``: all
    real images (uint8 ``N x H x W [x C]`` each). The training subset is a seeded random one of
    (run seed, ``iteration``); the generated images are the first ones of the pool (ids are
    independent samples). ``settings``: :func:`paper_settings` (``None``: no columns).
    ``generated`` and ``train`` may also be lazy rows (``len``, and a slice or an integer array
    giving an array): only the rows the metrics use are then read (``loop.measure.LazyImages``).
    """
    if settings is None:
        return {}
    device = "cuda" if settings["use_gpu"] else "cpu"
    row: dict[str, float | None] = {}
    if settings["paper_generalization"]:
        from raycollapse.features.dinov2 import dinov2_tokens
        from raycollapse.features.extractors import extractor_from_config

        n_gen = min(int(settings["paper_generalization_generated"]), len(generated))
        n_train = min(int(settings["paper_generalization_train"]), len(train))
        rng = derive_rng(int(settings["seed"]), int(iteration), _TRAIN_SUBSET)
        pick = np.sort(rng.permutation(len(train))[:n_train])
        ext = extractor_from_config(settings["dinov2"], device=device)
        bs = int(settings["batch_size"])
        row["generalization_score_paper"] = paper_generalization_score(
            dinov2_tokens(ext, generated[:n_gen], bs), dinov2_tokens(ext, train[pick], bs)
        )
    if settings["fid_torchvision"]:
        from raycollapse.features.torchvision_inception import (
            TorchvisionInception,
            resolve_torchvision_inception,
        )

        n_gen = min(int(settings["fid_torchvision_generated"]), len(generated))
        if n_gen < 2 or len(real) < 2:
            raise UserInputError(
                f"fid_torchvision needs at least 2 generated and 2 real images, got {n_gen} and {len(real)}."
            )
        net = TorchvisionInception(
            resolve_torchvision_inception(settings["torchvision_inception"]),
            device=device,
            batch_size=int(settings["batch_size"]),
        )
        row["fid_torchvision"] = frechet_distance(net(generated[:n_gen]), net(real))
    return row
