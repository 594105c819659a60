"""A worker's UserInputError reaches the driver as the same message: Ray task, actor, shard job,
Ray Train worker."""

from __future__ import annotations

import pytest
from shard_hooks import CountingStage

from raycollapse.errors import UserInputError
from raycollapse.stages.errors import raise_if_user_error, user_error
from raycollapse.stages.shard_job import ShardJob, run_shard_job

MSG = "column 'image' of 'pool/part-00003.parquet' is not PNG bytes; regenerate the pool."


def _caught(fn) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever Ray wraps it in
        fn()
    return info.value


def _same_message(exc: BaseException) -> None:
    """user_error finds the message; raise_if_user_error raises it alone, without a cause."""
    found = user_error(exc)
    assert isinstance(found, UserInputError) and str(found) == MSG
    with pytest.raises(UserInputError) as info:
        raise_if_user_error(exc)
    assert str(info.value) == MSG and info.value.__cause__ is None
    assert info.value.__suppress_context__  # no "during handling ..." traceback either


def test_plain_errors():
    assert user_error(UserInputError(MSG)) is not None
    assert user_error(RuntimeError("a bug")) is None
    chained = RuntimeError("outer")
    chained.__cause__ = UserInputError(MSG)
    _same_message(chained)
    raise_if_user_error(ValueError("not a user error"))  # returns: the caller re-raises


def test_ray_train_wrappers_in_process():
    """Ray Train's wrapper classes, built here: a worker error kept with its traceback string,
    inside the worker group's failures by rank."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    wrapped = UserExceptionWithTraceback(UserInputError(MSG), "Traceback ...")
    _same_message(WorkerGroupError("rank 1 failed", {0: RuntimeError("other"), 1: wrapped}))
    assert user_error(WorkerGroupError("x", {0: RuntimeError("a bug")})) is None


def test_ray_task_and_actor(ray_local):
    import ray

    @ray.remote
    def task() -> None:
        raise UserInputError(MSG)

    @ray.remote
    class Actor:
        def work(self) -> None:
            raise UserInputError(MSG)

    exc = _caught(lambda: ray.get(task.remote()))
    assert MSG in str(exc) and str(exc) != MSG  # Ray's wrapper carries the remote traceback
    _same_message(exc)
    _same_message(_caught(lambda: ray.get(Actor.remote().work.remote())))


def test_ray_data_shard_job_worker(tmp_path, ray_local):
    """A UserInputError in a shard (a Ray Data map_batches actor) comes back with the user's
    message, naming the shard."""

    class Failing(CountingStage):
        def process_shard(self, spec):
            raise UserInputError(MSG)

    stage = Failing(out=str(tmp_path / "o"), signature={"v": 1})
    job = ShardJob(stage, [{"shard": 0, "lo": 0, "hi": 2, "step": 1}], str(tmp_path / "o"), 1)
    with pytest.raises(UserInputError) as info:
        run_shard_job(job)
    assert str(info.value) == f"count shard '{tmp_path / 'o' / 'c-0.parquet'}' failed: {MSG}"


@pytest.mark.slow
def test_ray_train_worker(tmp_path, ray_local):
    """A TorchTrainer with one worker that raises: Ray Train's wrappers hold the message."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config: dict) -> None:
        raise UserInputError(MSG)

    trainer = TorchTrainer(
        train_loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path), name="fails"),
    )
    _same_message(_caught(trainer.fit))
