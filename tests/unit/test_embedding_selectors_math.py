"""NEAR, TSDS, ClusterLESS and NICE without a model: the math on hand-made inputs and bad input.
(The selectors on the processed pool and the tiny model are in tests/integration/test_embedding_selectors.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from dataflex.core.errors import ConfigError, DataError
from dataflex.features.clustering import (
    cluster,
    farthest_first,
    kmeans,
    num_clusters_for,
    random_partition,
    random_projection_lsh,
    ranked_by_strategy,
    spherical_kmeans,
    spread_budget,
)
from dataflex.features.distribution import near_order, seeded_draw, tsds_from_neighbors, tsds_probabilities
from dataflex.features.neighbors import kde_density, knn
from dataflex.utils.io import sha256_file

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


def _blobs(centers: np.ndarray, per: int = 20, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(0, spread, size=(per, centers.shape[1])) for c in centers])
    return x, np.repeat(np.arange(len(centers)), per)


def _same_partition(labels: np.ndarray, truth: np.ndarray) -> bool:
    """Every true blob is one cluster and no two blobs share one (label ids may differ)."""
    pairs = set(zip(truth.tolist(), labels.tolist()))
    return len(pairs) == len(set(truth.tolist())) == len({b for _, b in pairs})


@pytest.mark.parametrize("method", ["kmeans", "spherical", "farthest_first", "kcenter", "random_projection_lsh"])
def test_clustering_methods_recover_well_separated_blobs_deterministically(method):
    # Four tight blobs on distinct axes: far apart in Euclidean and in angle, so every method should find them.
    x, truth = _blobs(np.eye(8)[:4] * 5.0, spread=0.02)
    kw = {"lsh_bits": 6} if method == "random_projection_lsh" else {}
    labels, centroids = cluster(x, method, 4, seed=3, **kw)
    again, _ = cluster(x, method, 4, seed=3, **kw)
    assert (labels == again).all() and labels.dtype == np.int64
    assert _same_partition(labels, truth)
    # Centroids are the cluster means, whatever the method.
    np.testing.assert_allclose(centroids[labels[0]], x[labels == labels[0]].mean(axis=0))


def test_spherical_kmeans_groups_by_direction_not_length():
    # Two directions, each with points at very different norms: Euclidean k-means splits by length, cosine does not.
    rng = np.random.default_rng(0)
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    scales = np.array([1.0] * 10 + [20.0] * 10)
    x = np.concatenate([d * scales[:, None] + rng.normal(0, 0.01, (20, 3)) for d in dirs])
    truth = np.repeat([0, 1], 20)
    assert _same_partition(spherical_kmeans(x, 2, seed=0), truth)
    assert not _same_partition(kmeans(x, 2, seed=0)[0], truth)


def test_farthest_first_lsh_and_random_partition_follow_their_rules():
    x, _ = _blobs(np.eye(4) * 5.0, per=10)
    # k-center: each of the 4 blobs gets one center (the greedy always jumps to the farthest blob).
    assert len(np.unique(farthest_first(x, 4, seed=0))) == 4
    # LSH: more occupied buckets than K are folded modulo K, so the labels stay below K.
    lsh = random_projection_lsh(np.random.default_rng(0).normal(size=(200, 16)), 5, seed=1, bits=10)
    assert lsh.max() < 5 and len(np.unique(lsh)) == 5
    # Random partition: sizes differ by at most one, seeded, and another seed deals differently.
    part = random_partition(23, 5, seed=4)
    assert sorted(np.bincount(part).tolist()) == [4, 4, 5, 5, 5]
    assert (part == random_partition(23, 5, seed=4)).all() and (part != random_partition(23, 5, seed=5)).any()
    with pytest.raises(ConfigError, match="clustering_method must be one of"):
        cluster(x, "dbscan", 3)


def test_number_of_clusters_from_a_count_or_dataflex_cluster_size():
    assert num_clusters_for(130, n_clusters=8) == 8
    assert num_clusters_for(130, cluster_size=64) == 3  # DataFlex: ceil(N / cluster_size) clusters
    assert num_clusters_for(5, n_clusters=50) == 5  # never more clusters than rows


def test_representative_strategies_pick_what_their_names_say():
    # One cluster on a line with mean 3.5: distances 3.5, 2.5, 1.5, 0, 1, 6.5 from the centroid.
    x = np.array([[0.0], [1.0], [2.0], [3.5], [4.5], [10.0]])
    labels = np.zeros(6, dtype=np.int64)
    centroid = x.mean(axis=0, keepdims=True)
    nearest, farthest = [3, 4, 2, 1, 0, 5], [5, 0, 1, 2, 4, 3]
    for name in ("nearest", "centroid"):
        assert ranked_by_strategy(x, labels, centroid, name) == [nearest]
    for name in ("farthest", "boundary"):
        assert ranked_by_strategy(x, labels, centroid, name) == [farthest]
    mixed = ranked_by_strategy(x, labels, centroid, "mixed")[0]
    assert mixed[:4] == [nearest[0], farthest[0], nearest[1], farthest[1]] and sorted(mixed) == list(range(6))
    rand = ranked_by_strategy(x, labels, centroid, "random", seed=[1, 2])[0]
    assert rand == ranked_by_strategy(x, labels, centroid, "random", seed=[1, 2])[0] and sorted(rand) == list(range(6))
    assert rand != ranked_by_strategy(x, labels, centroid, "random", seed=[1, 3])[0]
    with pytest.raises(ConfigError, match="representative_strategy must be one of"):
        ranked_by_strategy(x, labels, centroid, "median")


def test_tsds_from_neighbors_is_kde_on_the_retrieved_rows_then_the_probabilities():
    rng = np.random.default_rng(2)
    pool, queries = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    dist, idx = knn(pool, queries, 10)
    got, _ = tsds_from_neighbors(pool, dist, idx, alpha=0.5, C=1.0, sigma=1.5, kde_K=5)
    union = np.unique(idx)
    rho = np.ones(40)
    rho[union] = kde_density(pool[union], 1.5, 5)
    want, _ = tsds_probabilities(dist, idx, rho, 40, alpha=0.5, C=1.0)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- DataFlex's precomputed files


def _build(name, pool, params, eval_dataset=None):
    from dataflex.core.registry import REGISTRY

    runtime = {"dataset": pool, "eval_dataset": eval_dataset, "accelerator": None, "data_collator": None}
    return REGISTRY.build("selector", name, runtime=runtime, cfg=params)


def test_near_walks_a_precomputed_top_indices_file_without_a_target(sft_pool, tmp_path):
    path = tmp_path / "top_indices.npy"
    np.save(path, np.array([[5, 1, 7], [1, 2, 9], [3, 5, 4]]))
    sel = _build("near", sft_pool, {"indices_path": str(path)})
    assert not sel.needs_model and sel.compute_features(None, 0)["cache_hit"]
    assert sel.select(None, 0, 4) == [5, 1, 3, 2]
    assert sel.select(None, 0, 9) == [5, 1, 3, 2, 7, 9, 4, 5, 1]  # past its distinct rows: the ranking repeats
    # The file's content is in the selector state, so a run's cached selection follows a regenerated file.
    assert sel.state_dict() == {"indices_sha256": sha256_file(path)}


def test_tsds_draws_from_a_precomputed_probability_file(sft_pool, tmp_path):
    probs = np.zeros(len(sft_pool))
    probs[[3, 8, 11, 20]] = [0.4, 0.3, 0.2, 0.1]
    path = tmp_path / "tsds_probs.npy"
    np.save(path, probs)
    sel = _build("tsds", sft_pool, {"probs_path": str(path), "seed": 7})
    picked = sel.select(None, 2, 3)
    assert set(picked) <= {3, 8, 11, 20} and len(set(picked)) == 3
    assert picked == seeded_draw(probs, 3, seed=7 * 1_000_003 + 2) == sel.select(None, 2, 3)
    assert sel.state_dict() == {"probs_sha256": sha256_file(path)}


def test_bad_precomputed_files_are_one_line_errors(sft_pool, tmp_path):
    n = len(sft_pool)
    cases = [
        ("near", "indices_path", np.array([1, 2, 3]), "non-empty \\[queries, K\\] matrix"),
        ("near", "indices_path", np.array([[0.5, 1.0]]), "must hold integers"),
        ("near", "indices_path", np.array([[0, n]]), f"holds rows 0..{n} but the pool has {n} rows"),
        ("near", "indices_path", np.array([[-1, 0]]), "holds rows -1"),
        ("tsds", "probs_path", np.ones(n - 1), f"has {n - 1} probabilities but the pool has {n}"),
        ("tsds", "probs_path", np.ones((n, 1)), "1-D numeric vector"),
        ("tsds", "probs_path", np.r_[-1.0, np.ones(n - 1)], "non-negative"),
        ("tsds", "probs_path", np.r_[np.nan, np.ones(n - 1)], "finite"),
    ]
    for name, key, arr, message in cases:
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        with pytest.raises(DataError, match=message) as err:
            _build(name, sft_pool, {key: str(path)})
        assert "\n" not in str(err.value)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(DataError, match="not a readable .npy array"):
        _build("near", sft_pool, {"indices_path": str(tmp_path / "junk.npy")})


# ----------------------------------------------------------------------------- DataFlex's parameter names


def _dataflex_components() -> dict:
    """DataFlex's components.yaml as its users bring it (the mirror is optional: a copy of its selector params)."""
    return {
        "cluster_less": {
            "gradient_type": "adam",
            "proj_dim": 4096,
            "seed": 42,
            "save_interval": 16,
            "cluster_size": 64,
            "samples_per_cluster": 4,
            "clustering_batch_size": 8,
            "clustering_max_iter": 10,
            "clustering_method": "kmeans",
            "representative_strategy": "random",
            "embedding_model_name_or_path": None,
            "embedding_model_dtype": "auto",
            "embedding_layer": -1,
        },
        "nice": {
            "gradient_type": "adam",
            "proj_dim": 4096,
            "seed": 123,
            "save_interval": 16,
            "reward_model_backend": "local_vllm",
            "reward_backend_params": {
                "local_vllm": {"hf_model_name_or_path": "meta-llama/Llama-3.1-8B", "vllm_max_model_len": None},
                "api": {"api_url": "https://api.openai.com/v1/chat/completions", "api_key": "DF_API_KEY"},
            },
            "mc_samples": 4,
            "max_new_tokens": 512,
            "generation_temperature": 0.7,
            "max_prompt_length": 4096,
        },
    }


def test_dataflex_cluster_less_params_map_onto_ours(sft_pool, caplog):
    import logging

    params = _dataflex_components()["cluster_less"]
    with caplog.at_level(logging.INFO, logger="dataflex"):
        sel = _build("cluster_less", sft_pool, params, eval_dataset=sft_pool)
    assert "save_interval=16 is accepted and ignored" in caplog.text
    assert (sel.cluster_size, sel.representatives, sel.embedding.batch_size, sel.kmeans_max_iter) == (64, 4, 8, 10)
    assert sel.representative_strategy == "random" and sel.clustering_method == "kmeans"
    sel = _build("cluster_less", sft_pool, {"num_clusters": 5, "cluster_size": 64}, eval_dataset=sft_pool)
    assert (sel.n_clusters, sel.cluster_size) == (5, None)  # an explicit count wins, as in DataFlex
    sel = _build(
        "cluster_less",
        sft_pool,
        {"clustering_method": "kcenter", "representative_strategy": "boundary", "embedding_layer": 2},
        eval_dataset=sft_pool,
    )
    assert (sel.clustering_method, sel.representative_strategy, sel.embedding.layer) == (
        "farthest_first",
        "farthest",
        2,
    )


def test_dataflex_nice_params_are_accepted_or_refused_in_one_line(sft_pool, untrained_model_dir, caplog):
    import logging

    params = {**_dataflex_components()["nice"], "policy_model_path": str(untrained_model_dir)}
    with pytest.raises(ConfigError, match="reward_model_backend local_vllm is not supported: vLLM and API") as err:
        _build("nice", sft_pool, params, eval_dataset=sft_pool)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="reward_model_backend api is not supported"):
        _build("nice", sft_pool, {**params, "reward_model_backend": "api"}, eval_dataset=sft_pool)
    local = {**params, "reward_model_backend": "local", "reward_model_path": str(untrained_model_dir)}
    with caplog.at_level(logging.INFO, logger="dataflex"):
        sel = _build("nice", sft_pool, local, eval_dataset=sft_pool)
    assert "reward_backend_params.local_vllm is ignored" in caplog.text and "save_interval=16" in caplog.text
    assert sel.reward == str(untrained_model_dir) and sel.temperature == 0.7 and sel.max_prompt_length == 4096
    assert sel.reward_prompts is not None  # a reward model reads the (default) reward prompts
    flat = {"reward_backend_params": {"local": {"hf_model_name_or_path": str(untrained_model_dir), "batch_size": 2}}}
    sel = _build("nice", sft_pool, {"policy_model_path": str(untrained_model_dir), **flat}, eval_dataset=sft_pool)
    assert sel.reward == str(untrained_model_dir) and sel.reward_batch_size == 2
    base = {"policy_model_path": str(untrained_model_dir)}
    cases = [
        ({"temperature": 0.5, "generation_temperature": 0.9}, "generation_temperature \\(DataFlex's name\\) and"),
        ({"reward_model_path": "/no/such/judge"}, "not a local sequence-classification model folder"),
        ({"reward": "exact_match", "reward_model_path": str(untrained_model_dir)}, "are one setting"),
        ({"prompt_template": "Q: {question}"}, "prompt_template uses \\{question\\}"),
        ({"reward_prompt_with_ref": "{instruction} {answer}"}, "reward_prompt_with_ref uses \\{answer\\}"),
        ({"reward_model_backend": "openai"}, "reward_model_backend must be local"),
        ({"reward_backend_params": {"local": {"port": 1}}}, "does not take port"),
        ({"max_prompt_length": 0}, "max_prompt_length must be"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            _build("nice", sft_pool, {**base, **extra}, eval_dataset=sft_pool)
        assert "\n" not in str(err.value)


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
        ("near", {"indices_path": "/no/such/top_indices.npy"}, None, "indices_path .* does not exist"),
        ("tsds", {"probs_path": "/no/such/tsds_probs.npy"}, None, "probs_path .* does not exist"),
        ("cluster_less", {"n_clusters": 8, "cluster_size": 64}, sft_pool, "set n_clusters .* or cluster_size"),
        ("cluster_less", {"representatives": 2, "samples_per_cluster": 3}, sft_pool, "are one setting"),
        ("cluster_less", {"clustering_method": "dbscan"}, sft_pool, "clustering_method must be one of"),
        ("cluster_less", {"representative_strategy": "median"}, sft_pool, "representative_strategy must be"),
        ("cluster_less", {"samples_per_cluster": 0}, sft_pool, "samples_per_cluster must be an integer"),
        ("cluster_less", {"lsh_num_bits": 40}, sft_pool, "lsh_num_bits must be at most 30"),
        ("cluster_less", {"embedding_model_dtype": "int8"}, sft_pool, "embedding_model_dtype must be one of"),
        ("cluster_less", {"embedding_model_name_or_path": "/no/such/model"}, sft_pool, "not a local model folder"),
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
