"""The quickstart's check of the paper's findings, on crafted metrics (no run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raycollapse.quickstart import VARIANTS, summarize

# Without selection both quantities fall every iteration; with greedy they end higher.
NONE_ENTROPY = [5.0, 4.0, 3.0]
NONE_GEN = [1.0, 0.8, 0.6]
GREEDY_ENTROPY = [5.0, 4.8, 4.6]
GREEDY_GEN = [1.0, 0.95, 0.9]


def _write(root: Path, name: str, entropy: list[float], gen: list[float]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = [
        {
            "iteration": i,
            "entropy_train": e,
            "generalization_score": g,
            "memorized_fraction": 0.0,
            "fd_pixel": 1.0,
        }
        for i, (e, g) in enumerate(zip(entropy, gen, strict=True))
    ]
    (run / "metrics.json").write_text(json.dumps(rows))
    return run


def _check(tmp_path: Path, none_e, none_g, greedy_e, greedy_g) -> bool:
    runs = {
        "no_selection": _write(tmp_path, "no_selection", none_e, none_g),
        "greedy": _write(tmp_path, "greedy", greedy_e, greedy_g),
    }
    assert set(runs) == set(VARIANTS)
    return summarize(runs)


def test_findings_hold(tmp_path, capsys):
    ok = _check(tmp_path, NONE_ENTROPY, NONE_GEN, GREEDY_ENTROPY, GREEDY_GEN)
    out = capsys.readouterr().out
    assert ok
    assert out.count("[yes]") == 4 and "[NO ]" not in out
    assert "4.600" in out and "0.600" in out  # the table prints each run's values


@pytest.mark.parametrize(
    "case, none_e, none_g, greedy_e, greedy_g",
    [
        ("entropy rises once without selection", [5.0, 4.0, 4.1], NONE_GEN, GREEDY_ENTROPY, GREEDY_GEN),
        ("entropy flat without selection", [5.0, 5.0, 4.0], NONE_GEN, GREEDY_ENTROPY, GREEDY_GEN),
        ("generalization rises without selection", NONE_ENTROPY, [1.0, 1.1, 0.6], GREEDY_ENTROPY, GREEDY_GEN),
        ("greedy entropy ends lower", NONE_ENTROPY, NONE_GEN, [5.0, 4.0, 2.9], GREEDY_GEN),
        ("greedy entropy ends equal", NONE_ENTROPY, NONE_GEN, [5.0, 4.0, 3.0], GREEDY_GEN),
        ("greedy generalization ends lower", NONE_ENTROPY, NONE_GEN, GREEDY_ENTROPY, [1.0, 0.9, 0.5]),
    ],
)  # fmt: skip
def test_findings_fail(tmp_path, capsys, case, none_e, none_g, greedy_e, greedy_g):
    ok = _check(tmp_path, none_e, none_g, greedy_e, greedy_g)
    out = capsys.readouterr().out
    assert not ok, case
    assert out.count("[NO ]") == 1, case  # exactly the broken finding is named
