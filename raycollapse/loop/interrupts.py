"""Ctrl-C reaches the user: no library handler swallows it.

Ray Train's ``TorchTrainer.fit`` replaces the process's SIGINT handler (in the main thread) with
one that asks its controller to abort and returns normally, and never puts the old one back:
a Ctrl-C during training ended the fit quietly, and every later Ctrl-C of the run was swallowed.
:func:`call_interruptible` runs such a call in a helper thread (Ray Train registers its handler
only in the main thread), while the main thread waits in short joins, so Python's own handler
raises ``KeyboardInterrupt`` there at once. The abandoned call dies with the process (a daemon
thread; Ray ends the driver's actors when it exits).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_interruptible(fn: Callable[[], T]) -> T:
    """``fn()``, interruptible by SIGINT (see the module docstring); its result or exception."""
    if threading.current_thread() is not threading.main_thread():
        return fn()  # no handler to protect: signals go to the main thread
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=target, name="raycollapse-interruptible", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]


def restore_sigint(handler: Any) -> None:
    """Put back the SIGINT ``handler`` noted at the start (main thread only), should a library
    have replaced it since."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not handler
    ):
        signal.signal(signal.SIGINT, handler)
