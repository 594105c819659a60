"""The search space of a sweep: which loop config keys vary, and how.

A sweep's ``space`` maps loop config keys (dotted, ``select.method``, or nested,
``select: {method: ...}``) to

- a plain value: every trial uses it;
- ``{grid: [v1, v2, ...]}``: one trial per value (crossed with every other grid);
- ``{choice: [v1, v2, ...]}``: each sample draws one value;
- ``{uniform: [low, high]}``, ``{loguniform: [low, high]}`` (low > 0): a float in [low, high];
- ``{randint: [low, high]}``: an integer in low..high, both included.

``variants`` lists whole alternatives, each a set of fixed values, e.g.
``[{select.method: greedy, loop.pool_multiple: 2}, {select.method: threshold, select.tau0: 3.0}]``:
one trial per variant, crossed with the grids. A key is either in ``space`` or in the variants.

Nothing here imports Ray: :mod:`raycollapse.sweeps.tuner` turns a :class:`SearchSpace` into a
Tune ``param_space`` and a trial's Tune config back into loop config values (:meth:`values_for`).
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any

from raycollapse.errors import UserInputError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")
VARIANT_PARAM = "variant"  # the Tune parameter that picks a variant by its index


@dataclass(frozen=True)
class Dimension:
    """One swept key. ``kind``: ``value`` (fixed), a name of :data:`DISTRIBUTIONS`.

    ``values``: the fixed value as a 1-tuple, the grid / choice values, or ``(low, high)``.
    """

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The parsed, checked space: dimensions in the order given, then the variants."""

    dimensions: tuple[Dimension, ...]
    variants: tuple[dict[str, Any], ...]

    def keys(self) -> list[str]:
        """Every key a trial sets: the dimensions', then the variants' (first seen first)."""
        keys = [d.key for d in self.dimensions]
        for variant in self.variants:
            keys += [k for k in variant if k not in keys]
        return keys

    def values_to_check(self) -> dict[str, list[Any]]:
        """Per key, the values a trial can get that a check of the loop config should see:
        every grid / choice / fixed value, both bounds of a range, every variant's value."""
        out: dict[str, list[Any]] = {d.key: list(d.values) for d in self.dimensions}
        for variant in self.variants:
            for key, value in variant.items():
                out.setdefault(key, []).append(value)
        return out

    def values_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """The loop config values of one trial, from its Tune config ``params``."""
        values = {d.key: _plain(params[d.key]) for d in self.dimensions}
        if self.variants:
            values.update(self.variants[int(params[VARIANT_PARAM])])
        return values


def _plain(value: Any) -> Any:
    """Tune's samplers return numpy scalars; configs and YAML want Python ones."""
    return value.item() if hasattr(value, "item") and not isinstance(value, list | dict) else value


def _is_section(schema: dict[str, Any], key: str) -> bool:
    node: Any = schema
    for part in key.split("."):
        node = node[part]
    return isinstance(node, dict)


def _check_key(schema: dict[str, Any], key: str, where: str) -> None:
    """Refuse a key that is not in the loop config, naming it and the keys valid there."""
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            parent = ".".join(parts[:i])
            valid = sorted(node) if isinstance(node, dict) else []
            hint = difflib.get_close_matches(part, valid, n=1)
            msg = (
                f"{where}: '{key}' is not a loop config key. Valid keys "
                f"{'under ' + repr(parent) if parent else 'at the top level'}: {', '.join(valid)}."
            )
            if hint:
                msg += f" Did you mean '{(parent + '.') if parent else ''}{hint[0]}'?"
            raise UserInputError(msg)
        node = node[part]


def _leaves(tree: Any, schema: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """Flatten ``tree`` (dotted or nested keys) to ``{loop key: spec or value}``.

    Recursion follows the loop config's sections, so ``{select: {method: ...}}`` is a section
    while ``{select.tau0: {uniform: ...}}`` is a distribution of a leaf key.
    """
    if not isinstance(tree, dict):
        raise UserInputError(f"{where} must be a mapping of loop config keys, not {tree!r}.")
    out: dict[str, Any] = {}
    for raw, value in tree.items():
        key = f"{prefix}{raw}"
        _check_key(schema, key, where)
        if _is_section(schema, key):
            if not isinstance(value, dict):
                raise UserInputError(
                    f"{where}: '{key}' is a config section; give keys under it, e.g. '{key}.<key>'."
                )
            found = _leaves(value, schema, where, key + ".")
        else:
            found = {key: value}
        for k, v in found.items():
            if k in out:
                raise UserInputError(f"{where}: '{k}' is given twice.")
            out[k] = v
    return out


def _number(value: Any, key: str, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserInputError(f"space: '{key}' {kind} bounds must be finite numbers, got {value!r}.")
    return value


def _dimension(key: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict):
        return Dimension(key, "value", (spec,))
    if len(spec) != 1:
        raise UserInputError(
            f"space: '{key}' must have exactly one of {', '.join(DISTRIBUTIONS)}, got {sorted(spec)}."
        )
    (kind, args), *_ = spec.items()
    if kind not in DISTRIBUTIONS:
        hint = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        raise UserInputError(
            f"space: unknown distribution '{kind}' for '{key}'; use one of "
            f"{', '.join(DISTRIBUTIONS)}" + (f" (did you mean '{hint[0]}'?)" if hint else "") + "."
        )
    if not isinstance(args, list):
        raise UserInputError(f"space: '{key}' {kind} needs a list, got {args!r}.")
    if kind in ("grid", "choice"):
        if not args:
            raise UserInputError(f"space: '{key}' has an empty {kind}; list at least one value.")
        return Dimension(key, kind, tuple(args))
    if len(args) != 2:
        raise UserInputError(f"space: '{key}' {kind} needs [low, high], got {args!r}.")
    low, high = (_number(a, key, kind) for a in args)
    if low > high:
        raise UserInputError(f"space: '{key}' {kind} has low {low} > high {high}; swap them.")
    if kind == "loguniform" and low <= 0:
        raise UserInputError(f"space: '{key}' loguniform needs low > 0, got {low}.")
    if kind == "randint" and not all(isinstance(a, numbers.Integral) for a in (low, high)):
        raise UserInputError(f"space: '{key}' randint bounds must be integers, got {args!r}.")
    return Dimension(key, kind, (low, high))


def parse_space(
    space: dict[str, Any], variants: list[dict[str, Any]], schema: dict[str, Any]
) -> SearchSpace:
    """Check and parse ``space`` and ``variants`` against the loop config ``schema``.

    ``schema``: the loop config defaults as nested plain dicts (sections are dicts). Raises
    UserInputError naming the key for an unknown key, an empty grid or choice, low > high, an
    unknown distribution, a distribution inside a variant, or a key both swept and in a variant.
    """
    dims = tuple(_dimension(k, v) for k, v in _leaves(space or {}, schema, "space").items())
    parsed: list[dict[str, Any]] = []
    for i, variant in enumerate(variants or []):
        values = _leaves(variant, schema, f"variants[{i}]")
        for key, value in values.items():
            if isinstance(value, dict):
                raise UserInputError(
                    f"variants[{i}]: '{key}' must be a fixed value; put distributions in space."
                )
            if key in {d.key for d in dims}:
                raise UserInputError(
                    f"variants[{i}]: '{key}' is also in space; set it in one place only."
                )
        if not values:
            raise UserInputError(f"variants[{i}] is empty; give at least one key: value.")
        parsed.append(values)
    return SearchSpace(dims, tuple(parsed))
