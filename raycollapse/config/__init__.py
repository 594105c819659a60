"""The one typed config tree: schema (dataclasses), loading with ``key=value`` overrides, checks."""

from raycollapse.config.schema import *  # noqa: F403
