"""NEAR, TSDS, ClusterLESS and NICE: the math on hand-made inputs, index alignment with the processed pool, caches,
bad input, and an end-to-end check that NEAR / TSDS pick the target domain on the demo corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataflex.core.errors import ConfigError, DataError
from dataflex.features.clustering import kmeans, spread_budget
from dataflex.features.distribution import near_order, seeded_draw, tsds_probabilities
from dataflex.features.embeddings import EmbeddingSettings, EmbeddingStore
from dataflex.features.neighbors import kde_density, knn

MODEL_ENC = {"encoder": "model", "batch_size": 16}


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


# ----------------------------------------------------------------------------- on the processed pool


def _lora(tiny_model_dir):
    from dataflex.models import load_model

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), finetuning_type="lora", lora_target="all", lora_rank=4, lora_alpha=8)
    with torch.no_grad():  # a non-zero B so every LoRA weight has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def _dev(demo_dir, tokenizer, name="arith_dev", **kw):
    from dataflex.data import build_dataset

    return build_dataset(
        dataset=[name], dataset_dir=demo_dir, tokenizer=tokenizer, template="default", cutoff_len=64, stage="sft", **kw
    )


def test_indices_are_pool_rows_after_filtering_max_samples_and_shuffling(demo_dir, tokenizer, tiny_model_dir, tmp_path):
    from dataflex.data import build_dataset
    from dataflex.train.selector.near_selector import NearSelector

    pool = build_dataset(
        dataset=["arith_train", "reverse_train", "sort_train"],
        dataset_dir=demo_dir,
        tokenizer=tokenizer,
        template="default",
        cutoff_len=64,
        stage="sft",
        max_samples=12,
    )
    assert pool["sample_id"] == list(range(len(pool)))
    # Filter rows out and shuffle (what processing may do): the selector sees row positions of *this* dataset.
    pool = pool.filter(lambda r: r["sample_id"] % 3 != 0).shuffle(seed=3).flatten_indices()
    wanted = [4, len(pool) - 2]
    target = pool.select(wanted)
    model = _lora(tiny_model_dir)
    sel = NearSelector(pool, None, None, eval_dataset=target, cache_dir=str(tmp_path), max_K=3, **MODEL_ENC)
    picked = sel.select(model, 0, 2)
    assert [pool[i]["input_ids"] for i in picked] == [pool[i]["input_ids"] for i in wanted]
    many = sel.select(model, 0, len(pool))  # more than max_K · M: continued by distance, still pool rows
    assert sorted(many) == list(range(len(pool)))


def test_embedding_and_neighbour_caches_hit_on_rerun(sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path):
    from dataflex.train.selector.tsds_selector import TsdsSelector

    model = _lora(tiny_model_dir)
    target = _dev(demo_dir, tokenizer)
    sel = TsdsSelector(
        sft_pool, None, None, eval_dataset=target, cache_dir=str(tmp_path), max_K=40, kde_K=20, **MODEL_ENC
    )
    first = sel.compute_features(model, 1)
    assert not first["cache_hit"]
    again = sel.compute_features(model, 7)  # another step, same state: a hit
    assert again["cache_hit"] and again["probs"] == first["probs"]
    assert sel.select(model, 3, 10, features=again) == sel.select(model, 3, 10, features=first)
    assert len(set(sel.select(model, 3, 10, features=first))) == 10
    with torch.no_grad():  # a changed model is a miss, never a silent reuse
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    assert not sel.compute_features(model, 1)["cache_hit"]
    store = EmbeddingStore(tmp_path / "e")
    s2 = EmbeddingSettings(encoder="model", layer=1)
    assert store.embed(target, s2, model=model)["status"] == "computed"
    assert store.embed(target, s2, model=model)["status"] == "hit"


def test_bad_input_is_one_config_error_line(sft_pool, tiny_model_dir):
    from dataflex.core.registry import REGISTRY

    cases = [
        ("near", {}, None, "needs an eval_dataset"),
        ("tsds", {"alpha": 1.5}, sft_pool, "alpha must be"),
        ("tsds", {"max_K": 0}, sft_pool, "max_K must be"),
        ("near", {"encoder": "/no/such/encoder"}, sft_pool, "never download"),
        ("cluster_less", {"max_cluster_share": 0}, sft_pool, "max_cluster_share"),
        ("nice", {}, sft_pool, "needs policy_model_path"),
        ("nice", {"policy_model_path": str(tiny_model_dir), "reward": "bleu"}, sft_pool, "nice reward must be"),
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


# ----------------------------------------------------------------------------- ClusterLESS and NICE


def test_cluster_less_selects_spread_clusters_from_less_features(
    sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path
):
    from dataflex.train.selector.cluster_less_selector import ClusterLessSelector

    model = _lora(tiny_model_dir)
    sel = ClusterLessSelector(
        sft_pool,
        None,
        None,
        eval_dataset=_dev(demo_dir, tokenizer),
        cache_dir=str(tmp_path),
        encoder="model",
        n_clusters=6,
        representatives=2,
        gradient_type="sgd",
        proj_dim=64,
        max_cluster_share=0.4,
    )
    feats = sel.compute_features(model, 0)
    assert len(feats["representatives"]) == 12 and not feats["cache_hit"]
    picked = sel.select(model, 0, 20, features=feats)
    assert len(set(picked)) == 20 and all(0 <= i < len(sft_pool) for i in picked)
    assert sel.last_metric["largest_cluster_share"] <= 0.4 and sel.last_metric["clusters_used"] >= 3
    assert sel.compute_features(model, 5)["cache_hit"]
    with pytest.raises(ConfigError, match="optimizer state"):
        ClusterLessSelector(sft_pool, None, None, eval_dataset=sft_pool, cache_dir=str(tmp_path)).compute_features(
            model, 0
        )


def test_nice_features_equal_the_reward_weighted_sum_of_per_rollout_gradients(
    tiny_model_dir, demo_dir, tokenizer, tmp_path
):
    import datasets

    from dataflex.features import per_sample_gradient_features
    from dataflex.features.gradients import per_sample_losses, trainable_parameters
    from dataflex.features.rollouts import rollout_dataset, rollout_table, rollout_weights
    from dataflex.train.selector.nice_selector import nice_target_features

    target = _dev(demo_dir, tokenizer).select(range(3))
    table = rollout_table(
        target, str(tiny_model_dir), tokenizer, "token_f1", tmp_path / "r", mc_samples=3, seed=1, max_new_tokens=6
    )
    rows = table["rows"]
    assert table["status"] == "computed" and len(rows) == 9 and {r["eval_id"] for r in rows} == {0, 1, 2}
    again = rollout_table(
        target, str(tiny_model_dir), tokenizer, "token_f1", tmp_path / "r", mc_samples=3, seed=1, max_new_tokens=6
    )
    assert again["status"] == "hit" and again["rows"] == rows
    # Hand-set rewards (the tiny model rarely earns one) so every weight path is exercised, incl. a zero reward.
    for j, r in enumerate(rows):
        r["reward"] = [0.0, 0.5, 1.0][j % 3]
    model = _lora(tiny_model_dir)
    for baseline, nll in (("none", "sum"), ("mean", "mean")):
        keep, w = rollout_weights(rows, 3, 3, baseline=baseline, nll=nll)
        ds = datasets.Dataset.from_dict(rollout_dataset(rows, keep))
        got = nice_target_features(per_sample_gradient_features(model, ds, projector="none", batch_size=4), w)
        named = trainable_parameters(model)
        expect = torch.zeros(3, sum(p.numel() for _, p in named))
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            lab = torch.tensor([[-100] * len(r["prompt_ids"]) + r["response_ids"]])
            loss = per_sample_losses(model, ids, lab)[0] * (len(r["response_ids"]) if nll == "sum" else 1)
            grads = torch.autograd.grad(loss, [p for _, p in named])
            base = np.mean([x["reward"] for x in rows if x["eval_id"] == r["eval_id"]]) if baseline == "mean" else 0
            expect[r["eval_id"]] += (r["reward"] - base) / 3 * torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-6)


def test_nice_selector_end_to_end_with_adam_features(sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path):
    from dataflex.train.selector.nice_selector import NiceSelector

    sft_pool = sft_pool.select(range(0, len(sft_pool), 4))
    model = _lora(tiny_model_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    row = sft_pool[0]
    model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.backward()
    opt.step()
    # sort_dev: the test-size policy earns some token-F1 there (numbers it copies from the prompt).
    sel = NiceSelector(
        sft_pool,
        None,
        None,
        eval_dataset=_dev(demo_dir, tokenizer, "sort_dev").select(range(4)),
        cache_dir=str(tmp_path),
        policy_model_path=str(tiny_model_dir),
        mc_samples=2,
        max_new_tokens=8,
        proj_dim=64,
        reward="token_f1",
        tokenizer_path=str(tiny_model_dir),
    )
    table = sel.rollouts(model, {})
    if not any(r["reward"] for r in table["rows"]):  # a policy that earns nothing: the error says so
        with pytest.raises(DataError, match="reward 0"):
            sel.compute_features(model, 0, optimizer=opt)
        pytest.skip("the test-size policy earned no reward on these prompts")
    feats = sel.compute_features(model, 0, optimizer=opt)
    assert not feats["cache_hit"] and feats["rollouts"]["status"] == "hit"
    assert sel.compute_features(model, 0, optimizer=opt)["cache_hit"]
    picked = sel.select(model, 0, 10, features=feats)
    assert len(set(picked)) == 10 and all(0 <= i < len(sft_pool) for i in picked)
    sgd = NiceSelector(
        sft_pool,
        None,
        None,
        eval_dataset=sel.eval_dataset,
        cache_dir=str(tmp_path),
        policy_model_path=str(tiny_model_dir),
        mc_samples=2,
        max_new_tokens=8,
        proj_dim=64,
        gradient_type="sgd",
        tokenizer_path=str(tiny_model_dir),
    )
    # The Adam transform is really applied (DataFlex's NICE returned the raw gradient).
    assert sgd.compute_features(model, 0)["pool"]["state_key"] != feats["pool"]["state_key"]


# ----------------------------------------------------------------------------- end to end on the demo corpus


@pytest.mark.slow
@pytest.mark.parametrize("name", ["near", "tsds"])
def test_near_and_tsds_pick_the_target_domain_with_minilm(name, sft_pool, demo_dir, tokenizer, tmp_path):
    from dataflex.core.registry import REGISTRY

    target = _dev(demo_dir, tokenizer)
    params = {"tokenizer_path": str(tokenizer.name_or_path)}
    if name == "tsds":
        # On this 120-row pool the default C = 5 never meets the stopping rule ((α/C)·cost ≥ (1 − α)·M) before the
        # radius covers the whole pool (measured: 43% of the mass on arith with max_K = 120); C = 1 weighs
        # transport more, which stops at ~38 neighbours per query.
        params.update(C=1.0, max_K=120, kde_K=30)
    runtime = {
        "dataset": sft_pool,
        "eval_dataset": target,
        "accelerator": None,
        "data_collator": None,
        "cache_dir": str(tmp_path),
    }
    sel = REGISTRY.build("selector", name, runtime=runtime, cfg=params)
    picked = sel.select(None, 0, 20)
    domains = sft_pool["domain_id"]
    fraction = sum(domains[i] == 0 for i in picked) / len(picked)
    base = domains.count(0) / len(domains)
    print(f"{name}: arith fraction {fraction:.2f} (pool base rate {base:.2f})")
    assert fraction >= 0.8 > 2 * base


@pytest.mark.slow
def test_near_inside_dynamic_select_and_one_shot_static_select(sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path):
    from dataflex.config import DEFAULTS
    from dataflex.train import select
    from dataflex.train import static_select as one_shot
    from dataflex.train.less import build_targets

    model = {
        "model_name_or_path": str(tiny_model_dir),
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "dtype": "fp32",
    }
    train = {
        **DEFAULTS["train"],
        "output_dir": str(tmp_path / "dyn"),
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-3,
        "logging_steps": 2,
        "progress_bar": False,
    }
    params = {"encoder": "model", "max_K": 20}
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": "near",
        "warmup_step": 1,
        "update_step": 2,
        "update_times": 1,
        "components": {"selectors": {"near": {"name": "near", "params": params}}},
    }
    result = select.run_all(sft_pool, {"arith_dev": _dev(demo_dir, tokenizer)}, model, train, flex)
    (history,) = result["selection_history"]
    assert sum(history["domain_counts"].values()) == 8 and result["global_step"] == 3

    data = {**DEFAULTS["data"], "dataset_dir": str(demo_dir), "cutoff_len": 64}
    cfg = one_shot.config(
        {
            "selector": "near",
            "params": params,
            "targets": ["arith_dev"],
            "max_samples": 12,
            "final_epochs": 1,
            "cache_dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "sel"),
        }
    )
    one_shot.check_config(cfg, data)
    targets = build_targets(data, cfg, tokenizer, seed=0)
    warm = one_shot.warmup(sft_pool, model, train, cfg)
    feats = one_shot.compute_features(sft_pool, targets, warm, model, train, cfg)
    sel = one_shot.select(sft_pool, targets, warm, feats, model, train, cfg, data)
    (chosen,) = sel["targets"].values()
    assert len(chosen["indices"]) == 12 and (tmp_path / "sel" / "selected" / "arith_dev.jsonl").is_file()
    assert one_shot.compute_features(sft_pool, targets, warm, model, train, cfg)["features"]["cache_hit"]
    out = one_shot.final_train(sft_pool, sel, model, {**train, "output_dir": str(tmp_path / "final")}, cfg)
    assert out["selected_samples"] == 12 and out["train_type"] == "static_select"
    with pytest.raises(ConfigError, match="static_select.percentage"):
        one_shot.check_config({**cfg, "max_samples": None, "percentage": 2})
