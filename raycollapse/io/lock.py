"""A lock on a run's storage: one ``run`` (or ``sweep``) writes a storage folder at a time.

The lock is the file ``<storage>/.raycollapse.lock`` holding its holder: host, pid, start time,
a random token and a heartbeat (seconds since the epoch, renewed every ``LEASE_S / 4`` by a
daemon thread). A second holder is refused with a message naming the first. A lock whose holder
is gone is taken over: on the same host when its pid no longer runs, on any host when its
heartbeat is older than ``LEASE_S`` (a crashed or killed run, or another machine that lost the
storage). Taking over renames the stale file away and checks that it still held the holder
judged stale, so two runs that find the same stale lock cannot both win.

Local folders use exclusive creation (``os.link`` of a complete temporary file: never a
half-written lock); URIs (object stores have no exclusive create) write and read back the token,
which narrows but cannot close the race of two simultaneous starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raycollapse.errors import UserInputError
from raycollapse.io import storage

LOCK_FILE = ".raycollapse.lock"
LEASE_S = 120.0


def _holder() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "heartbeat": now,
        "token": uuid.uuid4().hex,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_stale(holder: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether a lock's holder is gone: unreadable, its pid dead on this host, or no heartbeat
    for ``LEASE_S`` (any host; also covers a pid reused by another process)."""
    if not holder:
        return True
    now = time.time() if now is None else now
    if now - float(holder.get("heartbeat", 0)) > LEASE_S:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def describe(holder: dict[str, Any]) -> str:
    """``host pid N, started T, last heartbeat S s ago``."""
    ago = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"host {holder.get('host')} pid {holder.get('pid')}, started {holder.get('started')}, "
        f"last heartbeat {ago:.0f} s ago"
    )


def read_holder(uri: str) -> dict[str, Any] | None:
    """The holder in lock file ``uri``; None when absent or unreadable."""
    try:
        return json.loads(storage.read_text(uri))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _create_local(path: Path, holder: dict[str, Any]) -> bool:
    """Create ``path`` holding ``holder`` if it does not exist; False if it does."""
    tmp = path.with_name(f".lock-{holder['token']}")
    tmp.write_text(json.dumps(holder))
    try:
        os.link(tmp, path)  # atomic, fails when the lock exists; the file is complete already
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over_local(path: Path, judged: dict[str, Any] | None) -> None:
    """Move a stale lock aside, unless it changed since it was judged stale (someone else took
    it over meanwhile: then put theirs back)."""
    aside = path.with_name(f".lock-stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    moved = read_holder(str(aside))
    if moved != judged and moved is not None:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def acquire(folder: str, what: str = "run") -> dict[str, Any]:
    """Take the lock of ``folder`` (created if needed); the holder record. Refuses a live holder
    with ``UserInputError`` naming it."""
    storage.makedirs(folder)
    uri = storage.join(folder, LOCK_FILE)
    mine = _holder()
    local = "://" not in folder
    for _ in range(5):  # a takeover race lost to another starter ends in a refusal below
        if local:
            if _create_local(Path(uri), mine):
                return mine
        elif not storage.exists(uri):
            storage.write_text_atomic(uri, json.dumps(mine))
            if (read_holder(uri) or {}).get("token") == mine["token"]:
                return mine
        found = read_holder(uri)
        if found is not None and found.get("token") == mine["token"]:
            return mine
        if not is_stale(found):
            raise UserInputError(
                f"'{folder}' is in use by another {what} ({describe(found or {})}); wait for it "
                f"to finish or stop it. A lock left by a crashed {what} is taken over "
                f"automatically once its process is gone (or after {LEASE_S:.0f} s without a "
                "heartbeat from another host)."
            )
        if local:
            _take_over_local(Path(uri), found)
        else:
            storage.write_text_atomic(uri, json.dumps(mine))
    raise UserInputError(f"could not take the lock of '{folder}' ({uri}); try again.")


def release(folder: str, holder: dict[str, Any]) -> None:
    """Remove the lock of ``folder`` if ``holder`` still holds it."""
    uri = storage.join(folder, LOCK_FILE)
    found = read_holder(uri)
    if found is not None and found.get("token") == holder["token"]:
        fs, path = storage.open_fs(uri)
        with contextlib.suppress(OSError):
            fs.delete_file(path)


def _heartbeat(folder: str, holder: dict[str, Any], stop: threading.Event) -> None:
    uri = storage.join(folder, LOCK_FILE)
    while not stop.wait(LEASE_S / 4):
        found = read_holder(uri)
        if found is None or found.get("token") != holder["token"]:
            return  # taken over (this process was judged gone): never write over the new holder
        holder["heartbeat"] = time.time()
        with contextlib.suppress(OSError):
            storage.write_text_atomic(uri, json.dumps(holder))


@contextlib.contextmanager
def storage_lock(folder: str, what: str = "run") -> Iterator[dict[str, Any]]:
    """Hold the lock of ``folder`` for the body (see the module docstring); released after it,
    also on errors and interrupts. ``what`` names the holder kind in the refusal (run, sweep)."""
    holder = acquire(folder, what)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(folder, holder, stop), daemon=True)
    beat.start()
    try:
        yield holder
    finally:
        stop.set()
        release(folder, holder)
