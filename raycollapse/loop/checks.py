"""Checks of a loop run that need its real data or its storage, each naming the key and the fix.

Every check that needs neither is in ``raycollapse.config.checks`` (``check_command(cfg, "run")``).
"""

from __future__ import annotations

import uuid

from raycollapse.config.schema import Config
from raycollapse.curation.paradigms import fresh_count
from raycollapse.errors import UserInputError
from raycollapse.io import storage


def check_real_size(cfg: Config, n_real: int) -> None:
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
