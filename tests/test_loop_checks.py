"""Bad loop configs fail before any work, naming the key and the fix, and write nothing."""

from pathlib import Path

import pytest

from raycollapse.cli.main import main
from raycollapse.config import load_config
from raycollapse.errors import UserInputError
from raycollapse.loop.runner import run_loop

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.n=10", "loop.train_size=16"], "loop.train_size"),
        (["loop.pool_multiple=0.5"], "loop.pool_multiple"),
        (["loop.iterations=0"], "loop.iterations"),
        (["loop.paradigm=fresh", "loop.fresh_fraction=1.5"], "fresh_fraction"),
        (
            [
                "loop.paradigm=fresh",
                "loop.fresh_fraction=0.5",
                "loop.iterations=40",
                "data.n=100",
                "loop.train_size=16",
            ],
            "fresh",
        ),
        (["loop.metric_features=[pixel,sift]"], "sift"),
        (["loop.metric_features=[pixel,clip]"], "ViT-B-32"),
        (["select.method=threshold", "select.decay=1.0"], "select.decay"),
        (["knn.k=16", "loop.train_size=16"], "knn.k"),
    ],
)
def test_bad_loop_config(tmp_path, overrides, fragment):
    run = tmp_path / "run"
    cfg = load_config(None, [f"loop.storage={run}", *overrides])
    with pytest.raises(UserInputError, match=fragment):
        run_loop(cfg, log=lambda m: None)
    assert not run.exists()


def test_unwritable_storage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, [f"loop.storage={blocker}/run", "data.n=50", "loop.train_size=8"])
    with pytest.raises(UserInputError, match="cannot write to loop.storage"):
        run_loop(cfg, log=lambda m: None)


@pytest.mark.parametrize(
    "overrides, fragment",
    [(["loop.paradigm=swap"], "expected one of"), (["select.method=best"], "expected one of")],
)
def test_unknown_names_via_cli(tmp_path, capsys, overrides, fragment):
    code = main(["run", str(CONFIGS[0]), *overrides, f"loop.storage={tmp_path / 'r'}"])
    assert code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_match_the_schema(path):
    load_config(path)
