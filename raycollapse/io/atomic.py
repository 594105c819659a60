"""Atomic local writes of files and folders: write beside the target, then rename onto it.

A crash or a user error mid-write never leaves a half-written output under the final name.
Temporary names follow one rule (:func:`temp_name`), also used for URIs by
:mod:`raycollapse.io.storage`; they start with a dot, so shard listings skip them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_name(name: str, tag: str = "tmp") -> str:
    """A unique hidden sibling name for ``name``: ``.{stem}.{tag}-{8 hex}{suffix}``.

    The suffix is kept so that libraries that look at it (``np.save`` appends ``.npy`` to a
    name without it; pyarrow picks formats by it) write exactly the temporary name.
    """
    stem, dot, suffix = name.rpartition(".")
    if not stem:  # no suffix (or a leading dot only): keep the name whole
        stem, dot, suffix = name, "", ""
    return f".{stem}.{tag}-{uuid.uuid4().hex[:8]}{dot}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success rename it onto ``path``, else
    delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(temp_name(target.name))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``path``; on success it replaces ``path``
    (an existing folder there is moved aside, then deleted), else it is deleted.

    Between the two renames the target is briefly absent, never half-written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(temp_name(target.name))
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(temp_name(target.name, "old"))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def install_dir(src: str | Path, target: str | Path) -> None:
    """Copy folder ``src`` to ``target`` atomically (replacing an existing ``target``)."""
    with atomic_dir(target) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
