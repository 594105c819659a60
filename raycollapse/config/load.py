"""Loading the config tree, ``key=value`` overrides, and the one conversion to plain data.

Every command takes ``[--config FILE] [key=value ...]``: the file is merged over the defaults of
``raycollapse.config.schema``, then the dotted overrides. An unknown key or a wrong type fails
before any work starts, naming the key and listing the valid ones. Command-line flags such as
``--k`` are shorthands that write into this same tree (``knn.k``); there is no second way to
configure anything.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from raycollapse.config.schema import Config
from raycollapse.errors import UserInputError


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def explain(
    exc: OmegaConfBaseException, schema: DictConfig, origin: str, kind: str = "config"
) -> UserInputError:
    """An OmegaConf error as a message naming the key, the problem and the valid keys.

    ``schema``: the tree the key was looked up in; ``origin``: where the value came from (shown);
    ``kind``: what the tree is, in the message ("config", "sweep config").
    """
    full_key = str(getattr(exc, "full_key", "") or "")
    if isinstance(exc, ConfigKeyError | ConfigAttributeError) and full_key:
        parent_path, _, leaf = full_key.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        valid = _valid_keys(parent)
        hint = difflib.get_close_matches(leaf, valid, n=1)
        where = f"under '{parent_path}'" if parent_path else "at the top level"
        msg = f"unknown {kind} key '{full_key}' ({origin}). Valid keys {where}: {', '.join(valid)}."
        if hint:
            msg += f" Did you mean '{parent_path + '.' if parent_path else ''}{hint[0]}'?"
        return UserInputError(msg)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = f" for key '{full_key}'" if full_key else ""
    return UserInputError(f"bad {kind} value{key} ({origin}): {first_line}")


def read_yaml_mapping(path: Path, what: str, hint: str) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (``yaml.safe_load``); ``what`` names the file in errors,
    ``hint`` says how to fix a missing one."""
    if not path.is_file():
        raise UserInputError(f"{what} '{path}' does not exist; {hint}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{what} '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserInputError(
            f"{what} '{path}' must hold a mapping of sections, not {type(data).__name__}."
        )
    return data


def load_config(
    config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """Defaults <- ``config_file`` (YAML, read with ``yaml.safe_load``) <- ``key=value`` overrides.

    Raises ``UserInputError`` for a missing file, bad YAML, an unknown key or a wrong type.
    The result is read-only-structured: assigning an unknown key later also fails.
    """
    schema = OmegaConf.structured(Config)
    cfg = schema
    if config_file is not None:
        path = Path(config_file)
        data = read_yaml_mapping(path, "config file", "pass an existing YAML file")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except OmegaConfBaseException as exc:
            raise explain(exc, schema, f"in {path.name}") from None
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"override '{item}' must look like key=value (e.g. knn.k=5).")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise explain(exc, schema, f"override '{item}'") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def apply_overrides(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """Write flag shorthands (``--k 5`` -> ``knn.k=5``) into the tree, skipping ``None`` values."""
    items = [f"{k}={_dotlist_value(v)}" for k, v in values.items() if v is not None]
    if not items:
        return cfg
    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as exc:
        raise explain(exc, schema, "command-line flag") from None


def _dotlist_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_dict(cfg: Any, defaults: type | None = None) -> dict[str, Any]:
    """The one conversion of a config tree or section to plain Python containers, resolved.

    ``cfg``: a ``DictConfig``, a schema dataclass instance, a plain mapping, or ``None`` (with
    ``defaults``). ``defaults``: a schema dataclass (e.g. ``SampleConfig``); the result then holds
    every field of it, missing keys taking its defaults, and an unknown key or a wrong type fails
    like an override does. Plain data is what travels to Ray actors and workers: a DictConfig
    would drag OmegaConf's struct flags along.
    """
    if defaults is None:
        if cfg is None:
            raise TypeError("to_dict(None) needs defaults= (the section's schema dataclass)")
        node = cfg if isinstance(cfg, DictConfig) else _to_node(cfg)
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    schema = OmegaConf.structured(defaults)
    if cfg is None:
        return OmegaConf.to_container(schema, resolve=True)  # type: ignore[return-value]
    given = cfg if isinstance(cfg, DictConfig) else _to_node(cfg)
    try:
        merged = OmegaConf.merge(schema, given)
    except OmegaConfBaseException as exc:
        raise explain(exc, schema, f"{defaults.__name__} section") from None
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def _to_node(value: Any) -> DictConfig:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return OmegaConf.structured(value)
    if isinstance(value, Mapping):
        return OmegaConf.create(dict(value))
    raise TypeError(f"expected a config (DictConfig, dataclass or mapping), got {type(value)}")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what every run folder saves as ``config.yaml``).

    ``cfg``: anything ``to_dict`` takes without defaults.
    """
    node = cfg if isinstance(cfg, DictConfig) else _to_node(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def diff_configs(
    a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two plain config dicts: ``(key, a_value, b_value)``."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_configs(va, vb, dotted + "."))
        elif va != vb:
            out.append((dotted, va, vb))
    return out
