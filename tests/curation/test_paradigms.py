"""Paradigm plans (docs/design.md, "Paradigms") built from row references."""

import numpy as np
import pytest

from raycollapse.curation.paradigms import fresh_count, lineage, pick_fresh_real, plan_next
from raycollapse.errors import UserInputError

REAL = [("real", i) for i in range(4)]
POOL0 = [("gen_0", i) for i in range(8)]
POOL1 = [("gen_1", i) for i in range(8)]
TRAIN1 = [("gen_0", i) for i in range(4)]


def test_replace_uses_last_pool_only():
    plan = plan_next(
        "replace", train_size=4, previous_train=TRAIN1, pools=[POOL0, POOL1], real_train=REAL
    )
    assert plan.candidates == POOL1 and plan.keep == [] and plan.n_select == 4 and plan.n_fresh == 0


def test_accumulate_candidates_are_real_and_every_generation():
    plan = plan_next(
        "accumulate", train_size=4, previous_train=TRAIN1, pools=[POOL0, POOL1], real_train=REAL
    )
    assert plan.candidates == REAL + POOL0 + POOL1 and plan.n_select == 4


def test_accumulate_all_grows():
    plan = plan_next(
        "accumulate_all", train_size=4, previous_train=TRAIN1, pools=[POOL0, POOL1], real_train=REAL
    )
    assert plan.keep == TRAIN1 and plan.candidates == POOL1 and plan.n_select == 4


@pytest.mark.parametrize("lam, n_fresh", [(0.0, 0), (0.25, 1), (0.5, 2), (1.0, 4)])
def test_fresh_fraction(lam, n_fresh):
    plan = plan_next(
        "fresh",
        train_size=4,
        previous_train=TRAIN1,
        pools=[POOL0],
        real_train=REAL,
        fresh_fraction=lam,
    )
    assert plan.n_fresh == n_fresh == fresh_count(4, lam) and plan.n_select == 4 - n_fresh


def test_unknown_paradigm():
    with pytest.raises(UserInputError, match="unknown paradigm 'swap'"):
        plan_next("swap", train_size=4, previous_train=[], pools=[POOL0], real_train=REAL)


def test_pick_fresh_real_never_reuses_and_is_seeded():
    used = {0, 1, 2, 102}
    a = pick_fresh_real(np.arange(10) + 100, used | {100, 101}, 4, seed=3, iteration=1)
    assert len(set(a.tolist())) == 4 and not {100, 101, 102} & set(a.tolist()) and a.min() >= 100
    np.testing.assert_array_equal(
        a, pick_fresh_real(np.arange(10) + 100, used | {100, 101}, 4, seed=3, iteration=1)
    )
    with pytest.raises(UserInputError, match="only 7 remain"):
        pick_fresh_real(np.arange(10) + 100, used | {100, 101}, 8, seed=3, iteration=1)


def test_lineage_shares():
    assert lineage(["real", "gen_0", "gen_0", "gen_1"]) == {
        "share_gen_0": 0.5,
        "share_gen_1": 0.25,
        "share_real": 0.25,
    }
