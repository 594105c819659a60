"""Output safety for the commands that write a file or folder (``train``, ``generate``, ``embed``,
``select``): checked before any work, never replacing what the user did not ask to replace.

- :func:`check_output` refuses an output that is one of the inputs (or inside an input folder,
  or holding one), an existing output without ``--overwrite`` (unless the command resumes the
  same work: ``resume_signature`` equals the one stored there), and an output whose folder cannot
  be written (a probe file is created and removed);
- :func:`output_guard` removes, when the command fails with a user error, the output it created
  (a failure of another kind, an interrupt or a crash, keeps it: it is a resumable partial state);
- :func:`read_signature` / :func:`write_signature`: the signature of the work an output folder
  holds (``.raycollapse-signature.json``), compared by the next invocation;
- :func:`fingerprint`: a content checksum of input files, for signatures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from raycollapse.errors import UserInputError
from raycollapse.io import storage

SIGNATURE_FILE = ".raycollapse-signature.json"
_CHUNK = 1 << 20


def _local(p: str | Path) -> Path | None:
    text = str(p)
    return None if "://" in text else Path(text).expanduser().absolute()


def _same_or_inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside folder ``b`` (symlinks resolved)."""
    ra, rb = a.resolve(), b.resolve()
    return ra == rb or rb in ra.parents


def is_empty(uri: str | Path) -> bool:
    """True when ``uri`` does not exist or is an empty folder."""
    fs, path = storage.open_fs(uri)
    info = fs.get_file_info(path)
    if info.type == storage.pafs.FileType.NotFound:
        return True
    if info.type == storage.pafs.FileType.File:
        return False
    return not fs.get_file_info(storage.pafs.FileSelector(path, recursive=False))


def check_output(
    out: str | Path,
    *,
    flag: str = "--out",
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    resume_signature: dict[str, Any] | None = None,
) -> bool:
    """Check before any work that ``out`` may be written; True when it is to be resumed.

    Refuses (``UserInputError`` naming ``flag``): ``out`` equal to, inside or holding one of
    ``inputs``; an existing non-empty ``out`` without ``overwrite`` unless it holds the work of
    ``resume_signature`` (then True: the caller continues it); a folder that cannot be written.
    With ``overwrite`` an existing output stays until the caller replaces it (atomically for
    files, :func:`clear_output` for folders).
    """
    local = _local(out)
    if local is not None:
        for given in inputs:
            src = _local(given) if given is not None else None
            if src is None or not src.exists():
                continue
            if _same_or_inside(local, src) or _same_or_inside(src, local):
                raise UserInputError(
                    f"{flag} '{out}' is the input '{given}' (or inside it, or holds it); writing "
                    "there would destroy the input. Pass another output path."
                )
    resume = False
    if not is_empty(out):
        found = read_signature(out)
        if resume_signature is not None and found == resume_signature:
            resume = True
        elif not overwrite:
            why = (
                " and holds other work (another config or other inputs)"
                if found is not None and resume_signature is not None
                else ""
            )
            raise UserInputError(
                f"{flag} '{out}' already exists{why}; pass --overwrite to replace it, "
                "or choose another path."
            )
    check_writable(out, flag=flag)
    return resume


def check_writable(out: str | Path, *, flag: str = "--out") -> None:
    """Create, write and delete a probe file where ``out`` goes (its folder for a file name
    with a suffix, else ``out`` itself); created folders are removed again."""
    local = _local(out)
    target = local if local is not None else None
    folder = str(out) if (target is None or not target.suffix or target.is_dir()) else None
    if folder is None and target is not None:
        folder = str(target.parent)
    created = _missing_parents(folder)
    probe = storage.join(folder, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(folder)
        storage.write_text_atomic(probe, "ok")
        fs, path = storage.open_fs(probe)
        fs.delete_file(path)
    except (OSError, PermissionError) as exc:
        raise UserInputError(
            f"cannot write {flag} '{out}' ({exc}); choose a writable location."
        ) from None
    finally:
        for d in created:  # deepest first: only the folders the probe made, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()


def _missing_parents(folder: str) -> list[Path]:
    """The local folders (deepest first) that do not exist yet on the way to ``folder``."""
    p = _local(folder)
    out: list[Path] = []
    while p is not None and not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def clear_output(out: str | Path) -> None:
    """Remove an existing output (file or folder) the user asked to overwrite."""
    fs, path = storage.open_fs(out)
    info = fs.get_file_info(path)
    if info.type == storage.pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == storage.pafs.FileType.File:
        fs.delete_file(path)


@contextlib.contextmanager
def output_guard(out: str | Path) -> Iterator[None]:
    """Remove ``out`` (and the folders made for it) if the body fails with a ``UserInputError``
    and ``out`` did not exist before: a refused command leaves nothing behind. Other failures
    keep it (a crash or an interrupt leaves a partial state that a re-run resumes)."""
    local = _local(out)
    created = _missing_parents(str(local)) if local is not None else []
    existed = not created and storage.exists(out)
    try:
        yield
    except UserInputError:
        if not existed and local is not None:
            if local.is_dir():
                shutil.rmtree(local, ignore_errors=True)
            elif local.exists():
                local.unlink()
            for d in created[1:]:
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise


def read_signature(out: str | Path) -> dict[str, Any] | None:
    """The signature stored in output folder ``out``; None when it has none (or is a file)."""
    uri = storage.join(out, SIGNATURE_FILE)
    try:
        if not storage.exists(uri):
            return None
        return json.loads(storage.read_text(uri))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_signature(out: str | Path, signature: dict[str, Any]) -> None:
    """Store the signature of the work in output folder ``out`` (before the work starts)."""
    storage.write_text_atomic(
        storage.join(out, SIGNATURE_FILE), json.dumps(signature, sort_keys=True, default=str)
    )


def fingerprint(path: str | Path) -> str:
    """A sha256 over the names and bytes of a file, or of every file under a folder (sorted,
    hidden names skipped); a URI is fingerprinted through its filesystem."""
    fs, root = storage.open_fs(path)
    info = fs.get_file_info(root)
    if info.type == storage.pafs.FileType.File:
        files = [root]
    elif info.type == storage.pafs.FileType.Directory:
        found = fs.get_file_info(storage.pafs.FileSelector(root, recursive=True))
        files = sorted(
            f.path for f in found if f.type == storage.pafs.FileType.File
            and not any(part.startswith(".") for part in os.path.relpath(f.path, root).split("/"))
        )  # fmt: skip
    else:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, root).encode() + b"\0")
        with fs.open_input_stream(f) as src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
