"""NEAR, TSDS, ClusterLESS and NICE without a model: the math on hand-made inputs and bad input.
(The selectors on the processed pool and the tiny model are in tests/integration/test_embedding_selectors.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from dataflex.core.errors import ConfigError, DataError
from dataflex.features.clustering import kmeans, spread_budget
from dataflex.features.distribution import near_order, seeded_draw, tsds_probabilities
from dataflex.features.neighbors import kde_density, knn

# ----------------------------------------------------------------------------- pure math


def test_near_walks_the_neighbour_matrix_column_major():
    idx = np.array([[5, 1, 7], [1, 2, 9], [3, 5, 4]])
    # 1st column 5, 1, 3; then 2nd column 1 (dup), 2, 5 (dup); then 7, 9, 4.
    assert near_order(idx) == [5, 1, 3, 2, 7, 9, 4]
    assert near_order(idx, 4) == [5, 1, 3, 2]
    with pytest.raises(DataError, match="negative"):
        near_order(np.array([[0, -1]]))


def test_tsds_probabilities_on_hand_checked_cases():
    # One query, rho = 1, d = 0.1..0.4, alpha=0.6, C=5: the greedy never stops early; the pointer runs to K-2 = 2,
    # level s = 3 ⇒ 1/3 on each of the three nearest candidates, nothing on the 4th.
    d = np.array([[0.1, 0.2, 0.3, 0.4]])
    i = np.array([[4, 2, 0, 1]])
    p, info = tsds_probabilities(d, i, np.ones(5), 5, alpha=0.6, C=5.0)
    np.testing.assert_allclose(p, [1 / 3, 0, 1 / 3, 0, 1 / 3])
    assert info["level"] == 3
    # alpha/C = 9 ⇒ the first pop's cost 0.2·1 − 0.1 = 0.1 already gives 0.9 ≥ (1 − 0.9)·1: all mass on the nearest.
    p, _ = tsds_probabilities(d, i, np.ones(5), 5, alpha=0.9, C=0.1)
    np.testing.assert_allclose(p, [0, 0, 0, 0, 1])
    # Two queries, a dense candidate (ρ = 2) shared by both, alpha=0.5, C=1 (stop when total ≥ 2):
    #  a = [1/2, 1], b = [0, 1]. pop q0 (a=.5): s=.5, cost0 = 1·.5 − 0 = .5, total .5 → last0=0, advance: a0=1.5,
    #  b0=1. pop q1 (a=1): s=1, cost1 = 2·1 − 1 = 1, total 1.5 → last1=0, advance: a1=1.5, b1=1+2/2=2.
    #  pop q0 (a=1.5, lower index first): s=1.5, cost0 = 3·1.5 − 1 = 3.5, total 4.5 ≥ 2 ⇒ stop with last = [0, 0].
    #  q0: p[0] += (1/2)/(1.5·2) = 1/6; remainder 1/2 − 1/6 = 1/3 → its 2nd candidate (row 1).
    #  q1: p[2] += (1/2)/(1.5·1) = 1/3; remainder 1/6 → its 2nd candidate (row 0).  Sum = 1.
    d2 = np.array([[0.0, 1.0, 3.0], [1.0, 2.0, 4.0]])
    i2 = np.array([[0, 1, 3], [2, 0, 3]])
    rho = np.array([2.0, 1.0, 1.0, 1.0])
    p, info = tsds_probabilities(d2, i2, rho, 4, alpha=0.5, C=1.0)
    np.testing.assert_allclose(p, [1 / 6 + 1 / 6, 1 / 3, 1 / 3, 0])
    assert info["level"] == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="alpha"):
        tsds_probabilities(d2, i2, rho, 4, alpha=1.0)


def test_kde_density_counts_itself_and_near_points():
    pts = np.array([[0.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    rho = kde_density(pts, sigma=1.0, k=3)
    np.testing.assert_allclose(rho, [1 + 0.75, 1 + 0.75, 1.0])
    np.testing.assert_allclose(kde_density(pts, sigma=0.0), [1, 1, 1])


def test_seeded_draw_is_reproducible_and_survives_a_small_support():
    p = np.array([0.0, 0.5, 0.25, 0.25, 0.0])
    assert seeded_draw(p, 3, seed=7) == seeded_draw(p, 3, seed=7)
    assert sorted(seeded_draw(p, 3, seed=7)) == [1, 2, 3]
    many = seeded_draw(p, 6, seed=1)  # only 3 rows have mass: all taken, then repeated
    assert len(many) == 6 and set(many) == {1, 2, 3}


def test_knn_never_returns_missing_neighbours_and_caps_k():
    rng = np.random.default_rng(0)
    cand, q = rng.normal(size=(300, 8)), rng.normal(size=(5, 8))
    d_exact, i_exact = knn(cand, q, 50)
    d_ivf, i_ivf = knn(cand, q, 250, exact_threshold=10)  # IVF with K far beyond nprobe's lists
    assert (i_ivf >= 0).all() and i_ivf.shape == (5, 250)
    assert (np.diff(d_ivf, axis=1) >= -1e-6).all()
    ref = np.linalg.norm(cand[None] - q[:, None], axis=2)
    np.testing.assert_allclose(d_exact, np.sort(ref, axis=1)[:, :50], rtol=1e-4)
    assert knn(cand, q, 10_000)[1].shape == (5, 300)


def test_kmeans_plus_plus_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(c, 0.1, size=(30, 4)) for c in (0.0, 3.0, 6.0)])
    a, ca = kmeans(x, 3, seed=5)
    b, cb = kmeans(x, 3, seed=5)
    assert (a == b).all() and np.allclose(ca, cb)
    assert sorted(np.bincount(a).tolist()) == [30, 30, 30]  # k-means++ finds the three blobs
    assert len(np.unique(kmeans(x, 500, seed=0)[0])) == 90  # k capped at N


def test_cluster_budget_is_spread_so_a_huge_cluster_cannot_take_everything():
    members = [list(range(100)), [100, 101, 102], [200, 201], [300]]
    got = spread_budget([0, 1, 2, 3], members, 10, max_cluster_share=0.5)
    assert got == [0, 1, 2, 3, 4, 100, 101, 102, 200, 201]
    # Small clusters exhausted: later passes go back to the best cluster.
    got = spread_budget([0, 1, 2, 3], members, 20, max_cluster_share=0.25)
    assert got[:5] == [0, 1, 2, 3, 4] and got.count(300) == 1 and len(got) == len(set(got)) == 20
    assert sum(1 for i in got if i < 100) == 14
    with pytest.raises(ConfigError):
        spread_budget([0], members, 5, max_cluster_share=0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_config_error_line(sft_pool, untrained_model_dir):
    from dataflex.core.registry import REGISTRY

    cases = [
        ("near", {}, None, "needs an eval_dataset"),
        ("tsds", {"alpha": 1.5}, sft_pool, "alpha must be"),
        ("tsds", {"max_K": 0}, sft_pool, "max_K must be"),
        ("near", {"encoder": "/no/such/encoder"}, sft_pool, "never download"),
        ("cluster_less", {"max_cluster_share": 0}, sft_pool, "max_cluster_share"),
        ("nice", {}, sft_pool, "needs policy_model_path"),
        ("nice", {"policy_model_path": str(untrained_model_dir), "reward": "bleu"}, sft_pool, "nice reward must be"),
        ("near", {"max_k": 5}, sft_pool, "does not accept parameter"),
    ]
    for name, params, ev, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            REGISTRY.build(
                "selector",
                name,
                runtime={"dataset": sft_pool, "eval_dataset": ev, "accelerator": None, "data_collator": None},
                cfg=params,
            )
        assert "\n" not in str(err.value)
