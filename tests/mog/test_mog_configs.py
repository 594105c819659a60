"""configs/mog_2d.yaml, configs/mog_8d.yaml and configs/sweeps/mog.yaml load and pass every check
of ``raycollapse run`` / ``raycollapse sweep`` (their runs are measured, not run, here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raycollapse.config import load_config
from raycollapse.config.checks import check_command
from raycollapse.errors import UserInputError
from raycollapse.sweeps.config import check_sweep, load_sweep

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize("name, dim", [("mog_2d", 2), ("mog_8d", 8)])
def test_mog_configs_pass_the_run_checks(name, dim):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    check_command(cfg, "run")
    assert cfg.data.source == "mog" and cfg.data.mog.dim == dim and cfg.model.preset == "mlp"
    with pytest.raises(UserInputError, match="model.preset"):
        check_command(load_config(CONFIGS / f"{name}.yaml", ["model.preset=tiny"]), "run")


def test_mog_sweep_config_checks():
    sweep = load_sweep(CONFIGS / "sweeps" / "mog.yaml")
    configs = check_sweep(sweep)
    assert len(configs) == 1 + 3 + 2 + 3 + 3  # the base, then each value of each dimension
    assert {c.data.mog.components for c in configs} == {2, 5, 10}
    assert {c.select.method for c in configs} == {"none", "greedy", "threshold"}
