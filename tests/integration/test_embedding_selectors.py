"""NEAR, TSDS, ClusterLESS and NICE on the tiny model: index alignment with the processed pool, caches, and an
end-to-end check that NEAR / TSDS pick the target domain on the demo corpus.
(The math on hand-made inputs and bad input are in tests/unit/test_embedding_selectors_math.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import lora_model_params, train_params
from safetensors.torch import load_file

from dataflex.core.errors import ConfigError, DataError
from dataflex.features.embeddings import EmbeddingSettings, EmbeddingStore, hidden_state_embeddings

MODEL_ENC = {"encoder": "model", "batch_size": 16}


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


@pytest.mark.parametrize(
    ("method", "strategy"),
    [
        ("kmeans", "random"),
        ("spherical", "nearest"),
        ("farthest_first", "farthest"),
        ("random_projection_lsh", "mixed"),
        ("random_partition", "centroid"),
    ],
)
def test_cluster_less_runs_every_clustering_method_and_strategy(
    method, strategy, sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path
):
    from dataflex.core.registry import REGISTRY

    model = _lora(tiny_model_dir)
    runtime = {
        "dataset": sft_pool,
        "eval_dataset": _dev(demo_dir, tokenizer),
        "accelerator": None,
        "data_collator": None,
        "cache_dir": str(tmp_path),
    }
    # DataFlex's names: cluster_size 20 on 120 rows -> 6 clusters, 2 representatives each.
    cfg = {
        "cluster_size": 20,
        "samples_per_cluster": 2,
        "clustering_method": method,
        "representative_strategy": strategy,
        "assignment_chunk_size": 7,
        "gradient_type": "sgd",
        "proj_dim": 32,
    }
    sel = REGISTRY.build("selector", "cluster_less", runtime=runtime, cfg=cfg)
    feats = sel.compute_features(model, 0)
    labels = load_file(feats["clusters"]["path"])["labels"].numpy()
    assert len(np.unique(labels)) <= 6 and len(feats["representatives"]) == 2 * len(np.unique(labels))
    assert [labels[r] for r in feats["representatives"]] == sorted(labels[r] for r in feats["representatives"])
    picked = sel.select(model, 0, 15, features=feats)
    assert len(set(picked)) == 15 and sel.last_metric["clustering_method"] == method
    if strategy == "random":  # seeded by (seed, step): the same step repeats, another step redraws
        assert sel.compute_features(model, 0)["representatives"] == feats["representatives"]
        assert sel.compute_features(model, 1)["representatives"] != feats["representatives"]


def test_cluster_less_with_an_embedding_model_clusters_once_and_freezes(
    sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path, monkeypatch
):
    import dataflex.train.selector.cluster_less_selector as mod

    loads = []
    real = mod.load_embedding_model
    monkeypatch.setattr(mod, "load_embedding_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    model = _lora(tiny_model_dir)

    def build():
        return mod.ClusterLessSelector(
            sft_pool,
            None,
            None,
            eval_dataset=_dev(demo_dir, tokenizer),
            cache_dir=str(tmp_path),
            embedding_model_name_or_path=str(tiny_model_dir),
            embedding_dtype="fp32",
            embedding_layer=2,
            n_clusters=4,
            gradient_type="sgd",
            proj_dim=32,
        )

    sel = build()
    first = sel.compute_features(model, 0)
    assert first["pool"]["status"] == "computed" and first["clusters"]["status"] == "computed" and len(loads) == 1
    # The frozen clustering embeds with the standalone model, not the training model's current state.
    ref = hidden_state_embeddings(real(str(tiny_model_dir), "fp32"), sft_pool, layer=2)
    torch.testing.assert_close(EmbeddingStore.load(first["pool"]), ref)
    with torch.no_grad():  # training moves the model: the clusters stay (DataFlex's freeze-once)
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    later = sel.compute_features(model, 5)
    assert later["pool"]["key"] == first["pool"]["key"] and later["clusters"]["status"] == "hit"
    assert not later["cache_hit"]  # the representatives' LESS features do follow the model
    resumed = build().compute_features(model, 9)  # a new run on the same cache: not even a model load
    assert resumed["clusters"]["path"] == first["clusters"]["path"] and len(loads) == 1


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


def test_nice_with_dataflex_params_and_the_test_model_as_reward_model(
    sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path
):
    from dataflex.core.registry import REGISTRY
    from dataflex.features.rollouts import ClassifierReward

    model = _lora(tiny_model_dir)
    runtime = {
        "dataset": sft_pool.select(range(0, len(sft_pool), 6)),
        "eval_dataset": _dev(demo_dir, tokenizer, "sort_dev").select(range(3)),
        "accelerator": None,
        "data_collator": None,
        "cache_dir": str(tmp_path),
    }
    template = "Task: {instruction}\nExtra: {input}\nAnswer:"
    cfg = {
        "policy_model_path": str(tiny_model_dir),
        "tokenizer_path": str(tiny_model_dir),
        "reward_model_backend": "local",
        "reward_model_path": str(tiny_model_dir),
        "reward_prompt_with_ref": "JUDGE {instruction} | {input} | {reference} | {prediction}",
        "reward_prompt_without_ref": "JUDGE {instruction} | {prediction}",
        "prompt_template": template,
        "max_prompt_length": 12,
        "generation_temperature": 0.9,
        "save_interval": 16,
        "mc_samples": 2,
        "max_new_tokens": 4,
        "gradient_type": "sgd",
        "proj_dim": 32,
    }
    sel = REGISTRY.build("selector", "nice", runtime=runtime, cfg=cfg)
    assert sel.temperature == 0.9 and sel.reward == str(tiny_model_dir)
    rows = sel.rollouts(model, {})["rows"]
    assert len(rows) == 6 and all(0.0 < r["reward"] < 1.0 for r in rows)  # a sigmoid judge: never exactly 0 or 1
    # The policy saw the template's prompt, cut to its last max_prompt_length tokens (the answer cue kept).
    assert all(len(r["prompt_ids"]) <= 12 for r in rows)
    assert all(tokenizer.decode(r["prompt_ids"], skip_special_tokens=True).endswith("Answer:") for r in rows)
    judge = ClassifierReward(
        str(tiny_model_dir), with_ref=cfg["reward_prompt_with_ref"], without_ref="NOREF {prediction}"
    )
    texts = judge.texts(["sort 3 1"], ["1 3"], ["1 3"]) + judge.texts(["sort 3 1"], [""], [""])
    assert texts == ["JUDGE sort 3 1 | No additional input. | 1 3 | 1 3", "NOREF No response."]
    assert judge(["p"], ["c"], ["r"]) == judge(["p"], ["c"], ["r"])  # the untrained score head is seeded
    feats = sel.compute_features(model, 0)
    assert feats["rollouts"]["status"] == "hit" and 0 < feats["mean_reward"] < 1
    picked = sel.select(model, 0, 5, features=feats)
    assert len(set(picked)) == 5


# ----------------------------------------------------------------------------- end to end on the demo corpus


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


def test_near_inside_dynamic_select_and_one_shot_static_select(sft_pool, demo_dir, tokenizer, tiny_model_dir, tmp_path):
    from dataclasses import replace

    from dataflex.config import DEFAULTS, RunConfig
    from dataflex.train.modes import select
    from dataflex.train.modes import static_select as one_shot
    from dataflex.train.modes.less import build_targets
    from dataflex.train.static_select_config import check_config

    model = lora_model_params(tiny_model_dir)
    train = train_params(tmp_path / "dyn")
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
    cfg = RunConfig.from_params({"model": model, "train": train, "dataflex": flex})
    result = select.run_all(cfg, sft_pool, {"arith_dev": _dev(demo_dir, tokenizer)})
    (history,) = result["selection_history"]
    assert sum(history["domain_counts"].values()) == 8 and result["global_step"] == 3

    data = {**DEFAULTS["data"], "dataset_dir": str(demo_dir), "cutoff_len": 64}
    ss = {
        "selector": "near",
        "params": params,
        "targets": ["arith_dev"],
        "max_samples": 12,
        "final_epochs": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    check_config(ss, data)
    cfg = RunConfig.from_params({"model": model, "train": train, "data": data, "static_select": ss})
    targets = build_targets(cfg.data, ss["targets"], tokenizer, seed=0)
    warm = one_shot.warmup(cfg, sft_pool)
    feats = one_shot.compute_features(cfg, sft_pool, targets, warm)
    sel = one_shot.select(cfg, sft_pool, targets, warm, feats)
    (chosen,) = sel["targets"].values()
    assert len(chosen["indices"]) == 12 and set(sel["files"]) == {
        "selections/arith_dev.json",
        "selected/arith_dev.jsonl",
    }
    assert len(sel["files"]["selected/arith_dev.jsonl"].splitlines()) == 12
    assert one_shot.compute_features(cfg, sft_pool, targets, warm)["features"]["cache_hit"]
    final_cfg = replace(cfg, train=replace(cfg.train, output_dir=str(tmp_path / "final")))
    out = one_shot.final_train(final_cfg, sft_pool, {k: v for k, v in sel.items() if k != "files"})
    assert out["selected_samples"] == 12 and out["train_type"] == "static_select"
    with pytest.raises(ConfigError, match="static_select.percentage"):
        check_config({**ss, "max_samples": None, "percentage": 2})
