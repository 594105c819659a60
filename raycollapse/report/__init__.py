"""Reports of loop runs: one self-contained ``index.html`` comparing runs.

- :mod:`raycollapse.report.collect` reads run folders into plain data (never fails on a partial run),
- :mod:`raycollapse.report.plots` draws one PNG per metric (matplotlib, Agg, imported lazily),
- :mod:`raycollapse.report.html` renders the page with every image embedded.

No Ray here: a report runs on a laptop against copied or mounted run folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.atomic import atomic_path

INDEX = "index.html"


def prepare_out(out: str) -> str:
    """Create the output folder and check it is writable; return the ``index.html`` path.

    Called before any work so a bad ``--out`` fails in a second, not after the plots.
    """
    if "://" in out:
        try:
            storage.makedirs(out)
        except OSError as exc:
            raise UserInputError(
                f"cannot create output folder '{out}': {exc}. Pass a writable --out."
            ) from None
        return storage.join(out, INDEX)
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError / NotADirectoryError / PermissionError
        raise UserInputError(
            f"cannot create output folder '{out}': {exc.strerror or exc}. Pass a writable folder as --out."
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(
            f"output folder '{out}' is not writable; pass a writable folder as --out."
        )
    return str(folder / INDEX)


def write_index(text: str, out: str) -> str:
    """Write ``index.html`` under ``out`` atomically (temp name + rename); return its path."""
    target = prepare_out(out)
    try:
        if "://" in target:
            storage.write_text_atomic(target, text)
        else:
            with atomic_path(target) as tmp:
                tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserInputError(
            f"cannot write '{target}': {exc}. Pass a writable folder as --out."
        ) from None
    return target


def build_report(
    runs: Sequence[str], out: str, *, max_pairs: int = 8, title: str | None = None
) -> str:
    """Read ``runs``, plot their metrics, write ``out/index.html``; return its path.

    Raises ``UserInputError`` for a path that is not a run folder or an unwritable ``out``.
    """
    from raycollapse.report.collect import collect_runs
    from raycollapse.report.html import render
    from raycollapse.report.plots import plot_all

    if not runs:
        raise UserInputError("no runs given; pass one or more run folders.")
    prepare_out(out)
    data = collect_runs([str(r) for r in runs], max_pairs=max_pairs)
    return write_index(render(data, plot_all(data), title=title), out)


__all__ = ["INDEX", "build_report", "prepare_out", "write_index"]
