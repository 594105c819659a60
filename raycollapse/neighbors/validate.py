"""Validation of feature arrays, distance arrays and neighbour counts, shared by all core code.

Every failure raises :class:`raycollapse.errors.UserInputError` with a message that names the
offending argument, says what is wrong (shape, row index, value) and how to fix it.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from raycollapse.errors import UserInputError

__all__ = ["as_distances", "as_features", "check_k", "check_same_dim"]


def as_features(x: Any, name: str = "features", *, min_rows: int = 2) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array of shape (N, d), or raise UserInputError.

    Accepted: anything ``np.asarray`` turns into a 2-D integer or floating-point array (lists,
    numpy arrays, CPU torch tensors). Rejected, each with a message naming ``name``: a non-numeric
    dtype (strings, objects, booleans, complex), a shape that is not 2-D, fewer than 2 rows, zero
    columns, and NaN or infinite values (also values too large for float32). No copy is made
    when ``x`` is already a C-contiguous float32 array. ``min_rows`` (default 2: a point set
    needs two points to have a neighbour) may be lowered to 1 for query sets.
    """
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged nested lists, unconvertible objects
        raise UserInputError(
            f"{name} could not be read as a numeric array ({exc}); pass a 2-D array of shape "
            "(N points, d features) with rows of equal length"
        ) from exc
    if arr.dtype.kind not in "iuf":
        raise UserInputError(
            f"{name} must be a numeric (integer or floating-point) array, got dtype {arr.dtype}; "
            "convert the features to float32 first"
        )
    if arr.ndim != 2:
        hint = " (a single feature per point? reshape to (N, 1))" if arr.ndim == 1 else ""
        raise UserInputError(
            f"{name} must be a 2-D array of shape (N points, d features), got shape "
            f"{arr.shape}{hint}"
        )
    n, d = arr.shape
    if n < min_rows:
        raise UserInputError(
            f"{name} must have at least {min_rows} points (rows), got {n} (shape {arr.shape}); "
            "provide more samples"
        )
    if d < 1:
        raise UserInputError(
            f"{name} must have at least 1 feature (column), got shape {arr.shape}; "
            "check the embedding step"
        )
    if arr.dtype.kind == "f":
        _check_finite(arr, name, what="NaN or infinite values")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if out is not arr and arr.dtype != np.float32:
        # float64 values beyond ~3.4e38 (or huge integers) become inf in float32.
        _check_finite(out, name, what="values too large for float32 (|x| > 3.4e38)")
    return out


def _check_finite(arr: np.ndarray, name: str, what: str) -> None:
    """Raise UserInputError naming how many rows of ``arr`` hold non-finite values."""
    finite_rows = np.isfinite(arr).all(axis=1)
    if finite_rows.all():
        return
    bad = np.flatnonzero(~finite_rows)
    raise UserInputError(
        f"{name} contain {what} in {bad.size} of {arr.shape[0]} rows (first bad row index: "
        f"{int(bad[0])}); drop or repair those rows before computing neighbours"
    )


def check_k(
    k: Any,
    n: int,
    *,
    what: str = "points",
    hint: str = "the paper uses k=3",
    self_excluded: bool = True,
) -> int:
    """Check that ``k`` is a valid neighbour count among ``n`` ``what``: an integer, 1 <= k < n.

    Returns ``k`` as a Python int. ``k < n`` because the k-th neighbour of a point excludes the
    point itself, so at most ``n - 1`` neighbours exist; ``self_excluded=False`` (queries
    searched in a database of ``n`` rows) allows ``k = n``. ``hint`` says what k usually is.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise UserInputError(f"k must be an integer, got {k!r}; pass e.g. --k 3")
    k = int(k)
    if k < 1:
        raise UserInputError(f"k must be >= 1, got {k}; raise --k ({hint})")
    if self_excluded and k >= n:
        raise UserInputError(f"k must be < number of {what} N={n}, got {k}; lower --k")
    if k > n:
        raise UserInputError(f"k must be <= number of {what} N={n}, got {k}; lower --k")
    return k


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise UserInputError when feature sets ``a`` and ``b`` differ in dimension."""
    if a.shape[1] != b.shape[1]:
        raise UserInputError(
            f"{name_a} have {a.shape[1]} features but {name_b} have {b.shape[1]}; embed both "
            "with the same feature extractor"
        )


def as_distances(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a non-empty 1-D float64 array of finite distances >= 0, or raise
    UserInputError naming ``name``, the count of bad entries and the first one."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{name} must be a 1-D array of distances ({exc})") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise UserInputError(
            f"{name} must be a non-empty 1-D array of distances, got shape {arr.shape}"
        )
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        raise UserInputError(
            f"{name} holds {int(bad.sum())} negative or non-finite distances (first at index "
            f"{int(np.flatnonzero(bad)[0])}); distances must be finite and >= 0"
        )
    return arr
