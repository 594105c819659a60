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


def _authors_accumulated(origins, n, seed):
    """The paper's syn_type "accumulated", written out: n // G + 1 from a permutation of each
    origin (oldest first), concatenated, cut to n (with this project's seeded permutations)."""
    from raycollapse.seeds import derive_rng

    names = []
    for o in origins:
        if o not in names:
            names.append(o)
    per = n // len(names) + 1
    rng = derive_rng(seed, 0xACC)
    out = []
    for name in names:
        rows = [i for i, o in enumerate(origins) if o == name]
        perm = rng.permutation(len(rows))
        for j in range(per):
            if j < len(rows):
                out.append(rows[perm[j]])
    return out[:n]


def test_per_generation_shares_follow_the_papers_accumulated_baseline():
    from raycollapse.curation.paradigms import baseline_indices, per_generation_indices

    origins = ["real"] * 10 + ["gen_0"] * 20 + ["gen_1"] * 20
    for n, seed in ((10, 0), (9, 3), (30, 1)):
        got = per_generation_indices(origins, n, seed)
        assert got.tolist() == _authors_accumulated(origins, n, seed)
        assert len(set(got.tolist())) == n
    # 10 of 3 origins: 4 + 4 + 2 (the newest fills the rest)
    shares = lineage([origins[i] for i in per_generation_indices(origins, 10, 0)])
    assert shares == {"share_real": 0.4, "share_gen_0": 0.4, "share_gen_1": 0.2}
    cands = [(o, i) for i, o in enumerate(origins)]
    uniform = baseline_indices(cands, 10, seed=5, method="none", shares="uniform")
    assert uniform.tolist() == np.random.default_rng(5).choice(50, 10, replace=False).tolist()
    # random selection stays uniform whatever the baseline setting
    assert (
        baseline_indices(cands, 10, seed=5, method="random", shares="per_generation").tolist()
        == uniform.tolist()
    )
    assert (
        baseline_indices(cands, 10, seed=5, method="none", shares="per_generation").tolist()
        == per_generation_indices(origins, 10, 5).tolist()
    )
    # an origin smaller than its share: the rest is filled from the others, still distinct
    small = ["real"] * 2 + ["gen_0"] * 20
    got = per_generation_indices(small, 12, 0)
    assert len(set(got.tolist())) == 12 and {0, 1} <= set(got.tolist())
