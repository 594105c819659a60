"""The one way a worker's ``UserInputError`` reaches the user: found inside Ray's wrappers.

A ``UserInputError`` raised in a Ray task, an actor or a Ray Train worker reaches the driver
wrapped: ``RayTaskError`` (the original in ``.cause``; its own ``str`` holds the remote
traceback), Ray Train's ``WorkerGroupError`` (``worker_failures``: rank -> the worker's
error, or a ``UserExceptionWithTraceback`` holding it in ``_base_exc``) or ``ControllerError``
(``controller_failure``), any of them possibly chained with ``__cause__``. :func:`user_error`
walks all of these; :func:`raise_if_user_error` re-raises what it finds as a plain
``UserInputError`` with the user's message and no traceback.

Ray Data is the exception: it wraps a failed batch in ``UserCodeException`` whose cause is lost
when it crosses to the driver, so the shard jobs (``stages.shard_job``) return a worker's user
error in their status rows instead of raising it.
"""

from __future__ import annotations

from collections.abc import Iterator

from raycollapse.errors import UserInputError


def _inner(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions one wrapper holds (Ray Core, Ray Data and Ray Train wrappers)."""
    for attr in ("cause", "_base_exc", "controller_failure", "__cause__"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException):
            yield inner
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        yield from (e for e in failures.values() if isinstance(e, BaseException))


def user_error(exc: BaseException) -> UserInputError | None:
    """The ``UserInputError`` inside ``exc`` (``exc`` itself, or wrapped by Ray); else None.

    Breadth-first, so the outermost user error wins. A ``RayTaskError`` that is also a
    ``UserInputError`` (Ray's dual class) is skipped for its ``.cause``: its message holds the
    remote traceback, the cause's is the user's message.
    """
    import ray

    queue, seen = [exc], set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserInputError) and not isinstance(e, ray.exceptions.RayTaskError):
            return e
        queue.extend(_inner(e))
    return None


def raise_if_user_error(exc: BaseException) -> None:
    """Raise the ``UserInputError`` inside ``exc`` with its message alone (``from None``: no
    traceback, no Ray wrapper); return when there is none, so the caller re-raises ``exc``."""
    found = user_error(exc)
    if found is not None:
        raise UserInputError(str(found)) from None
