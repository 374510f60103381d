"""Selector fidelity (issue #16): the warm-up draw follows the run seed and flex epoch, not the selector's `seed`;
`exclude_selected` of less / cluster_less / nice; LESS subtasks from a raw-data column (`subtask_column`);
`gradient_type: sign`. Selection logic on hand-made features; `sign` on the untrained test model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataflex.config import DEFAULTS, RunConfig
from dataflex.core.errors import ConfigError, DataError
from dataflex.core.registry import REGISTRY
from dataflex.features import GradientDatastore, less_scores
from dataflex.train.modes import select
from dataflex.train.modes import static_select as one_shot


def _build(name, pool, params, eval_dataset=None):
    import dataflex.train.selector  # noqa: F401  (registers the built-ins)

    runtime = {"dataset": pool, "eval_dataset": eval_dataset, "accelerator": None, "data_collator": None}
    return REGISTRY.build("selector", name, runtime=runtime, cfg=params)


def _cfg(component, params, seed, **flex_kw):
    train = {**DEFAULTS["train"], "per_device_train_batch_size": 4, "seed": seed}
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": component,
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 1,
        "components": {"selectors": {component: {"name": component, "params": params}}},
        **flex_kw,
    }
    return RunConfig.from_params({"train": {**train, "num_train_epochs": 2}, "dataflex": flex})


class _Plan:
    def __init__(self) -> None:
        self.segments: list[tuple[int, int, list[int]]] = []

    def add_segment(self, start: int, end: int, indices: list[int]) -> None:
        self.segments.append((start, end, indices))


def _warmups(pool, selector_seed, run_seed):
    """Every warm-up segment the select mode draws for a `random` selector with `selector_seed` in a run seeded
    `run_seed` (two flex epochs of 4 steps: warm-ups at steps 0 and 4)."""
    cfg = _cfg("random", {"seed": selector_seed}, run_seed)
    mode = select.SelectMode(cfg, len(pool))
    mode.component = "random"  # what `components` sets when a Run builds the selector
    sel = _build("random", pool, {"seed": selector_seed})
    run = SimpleNamespace(
        callbacks={"selector": sel},
        pool=pool,
        args=SimpleNamespace(seed=run_seed),
        trainer=SimpleNamespace(plan=_Plan()),
    )
    mode.add_warmups(run, 0, mode.schedule.max_steps)
    return [s[2] for s in run.trainer.plan.segments]


# ----------------------------------------------------------------------------- 1. warm-up seeding


def test_the_warmup_draw_follows_the_run_seed_and_flex_epoch_not_the_selector_seed(sft_pool):
    base = _warmups(sft_pool, selector_seed=42, run_seed=1)
    assert len(base) == 2 and base[0] != base[1]  # fresh per flex epoch
    assert _warmups(sft_pool, selector_seed=123, run_seed=1) == base  # the selector's seed: same warm-up data
    other = _warmups(sft_pool, selector_seed=42, run_seed=2)
    assert other[0] != base[0] and other[1] != base[1]  # the run seed: other warm-up data
    # The selector's seed keeps its own uses (here `random`'s selection draw).
    a, b = _build("random", sft_pool, {"seed": 1}), _build("random", sft_pool, {"seed": 2})
    assert a.select(None, 2, 8) != b.select(None, 2, 8)


def test_less_warmup_is_decoupled_from_its_projector_seed(sft_pool):
    target = sft_pool.select(range(4))
    draws = []
    for seed in (42, 123):
        sel = _build("less", sft_pool, {"seed": seed}, eval_dataset=target)
        sel.run_seed, sel.flex_epoch = 5, 1
        draws.append(sel.warmup(8))
        assert sel.settings.seed == seed  # the projector still follows the selector's seed
    assert draws[0] == draws[1]


def test_static_select_gives_the_run_seed_as_run_seed_not_as_the_selector_seed(sft_pool):
    from dataflex.train.static_select_config import StaticSelectConfig

    ss = StaticSelectConfig.from_dict({"selector": "random", "params": {}})
    sel = one_shot.build_selector(ss, sft_pool, {"t": sft_pool.select(range(4))}, seed=7)
    assert (sel.seed, sel.run_seed) == (42, 7)  # the same selector seed as in dynamic_select
    ss = StaticSelectConfig.from_dict({"selector": "random", "params": {"seed": 3}})
    assert one_shot.build_selector(ss, sft_pool, {"t": sft_pool.select(range(4))}, seed=7).seed == 3


# ----------------------------------------------------------------------------- 2. exclude_selected


@pytest.fixture
def features_by_value(monkeypatch):
    """`GradientDatastore.load(x)` returns x as the features: selections on hand-made tensors."""
    monkeypatch.setattr(GradientDatastore, "load", staticmethod(lambda ref: SimpleNamespace(features=ref)))


def _less(pool, target, **params):
    return _build("less", pool, params, eval_dataset=target)


def _feats(n, m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"pool": torch.randn(n, 16, generator=gen), "target": torch.randn(m, 16, generator=gen)}


def test_less_exclude_selected_picks_disjoint_rows_within_a_flex_epoch(sft_pool, features_by_value):
    target = sft_pool.select(range(6))
    feats = _feats(len(sft_pool), len(target))
    # DataFlex's default: a deterministic top-k repeats the same rows at every update.
    sel = _less(sft_pool, target)
    assert sel.select(None, 2, 10, features=feats) == sel.select(None, 4, 10, features=feats)
    assert sel.state_dict() == {}

    sel = _less(sft_pool, target, exclude_selected=True)
    first, second = sel.select(None, 2, 10, features=feats), sel.select(None, 4, 10, features=feats)
    assert not set(first) & set(second) and len(set(second)) == 10
    ranking = torch.sort(-less_scores([feats["pool"]], [feats["target"]], [1.0], sel.subtasks, "mean")).indices
    assert first + second == ranking[:20].tolist()  # the next best rows, in score order
    state = sel.state_dict()
    assert state == {"selected_flex_epoch": 0, "selected_rows": sorted(first + second)}

    # A selector restored from that state (a resumed run) picks exactly what this one picks next.
    resumed = _less(sft_pool, target, exclude_selected=True)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # TrainState carries it as JSON
    assert resumed.select(None, 6, 10, features=feats) == sel.select(None, 6, 10, features=feats)

    # A new flex epoch restarts the pass: the memory is empty again.
    sel.flex_epoch = 1
    assert sel.select(None, 8, 10, features=feats) == first
    assert sel.state_dict() == {"selected_flex_epoch": 1, "selected_rows": sorted(first)}


def test_exclude_selected_with_too_few_rows_left_is_one_config_error(sft_pool, features_by_value):
    target = sft_pool.select(range(4))
    feats = _feats(len(sft_pool), len(target))
    sel = _less(sft_pool, target, exclude_selected=True)
    half = len(sft_pool) // 2
    sel.select(None, 2, half, features=feats)
    sel.select(None, 4, len(sft_pool) - half, features=feats)  # the whole pool, each row once
    with pytest.raises(ConfigError, match="exclude_selected leaves 0 unpicked rows in flex epoch 0") as err:
        sel.select(None, 6, 1, features=feats)
    assert "\n" not in str(err.value)
    # Without it, a budget above the pool repeats the ranking, as before.
    assert len(_less(sft_pool, target).select(None, 2, len(sft_pool) + 3, features=feats)) == len(sft_pool) + 3


def test_dynamic_select_refuses_exclude_selected_when_a_flex_epoch_outgrows_the_pool():
    # G = 4, update_step 2 → 8 rows per selection, update_times 2 → 16 per flex epoch.
    cfg = _cfg("less", {"exclude_selected": True}, 0, update_times=2)
    select.check_select_config(cfg, True, pool_size=16)
    with pytest.raises(ConfigError, match="flex epoch 0 selects 16 rows and the pool has 15") as err:
        select.check_select_config(cfg, True, pool_size=15)
    assert "\n" not in str(err.value)
    select.check_select_config(_cfg("less", {}, 0, update_times=2), True, pool_size=15)  # repeats allowed


def test_cluster_less_exclude_selected_takes_rows_outside_the_memory(sft_pool, monkeypatch):
    from dataflex.features.embeddings import EmbeddingStore
    from dataflex.train.selector import cluster_less_selector as mod

    n = len(sft_pool)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    centroids = rng.normal(size=(4, 8)).astype(np.float32)
    emb = torch.from_numpy(centroids[labels] + 0.1 * rng.normal(size=(n, 8)).astype(np.float32))
    reps = [i for c in range(4) for i in np.flatnonzero(labels == c)[:2].tolist()]
    tensors = {
        "rep": torch.from_numpy(rng.normal(size=(len(reps), 16)).astype(np.float32)),
        "target": torch.from_numpy(rng.normal(size=(3, 16)).astype(np.float32)),
    }
    monkeypatch.setattr(
        mod, "load_file", lambda path: {"labels": torch.from_numpy(labels), "centroids": torch.from_numpy(centroids)}
    )
    monkeypatch.setattr(EmbeddingStore, "load", staticmethod(lambda ref: emb))
    monkeypatch.setattr(GradientDatastore, "load", staticmethod(lambda ref: SimpleNamespace(features=tensors[ref])))
    feats = {
        "pool": "pool",
        "clusters": {"path": "x"},
        "representatives": reps,
        "rep_features": "rep",
        "target": "target",
    }
    target = sft_pool.select(range(3))
    plain = _build("cluster_less", sft_pool, {}, eval_dataset=target)
    assert plain.select(None, 2, 12, features=feats) == plain.select(None, 4, 12, features=feats)
    sel = _build("cluster_less", sft_pool, {"exclude_selected": True}, eval_dataset=target)
    first, second = sel.select(None, 2, 12, features=feats), sel.select(None, 4, 12, features=feats)
    assert len(set(first) | set(second)) == 24
    assert sel.state_dict()["selected_rows"] == sorted(first + second)


# ----------------------------------------------------------------------------- 3. subtasks in one dev file

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "subject": "math"},
    {"instruction": "Name the year.", "input": "end of the war", "output": "1945", "subject": "history"},
    {"instruction": "Add the numbers.", "input": "4 + 4", "output": "8", "subject": "math"},
    {"instruction": "Name the king.", "input": "of the franks", "output": "charles", "subject": "history"},
    {"instruction": "Add the numbers.", "input": "7 + 1", "output": "8", "subject": "math"},
    {"instruction": "Name the city.", "input": "capital of rome", "output": "rome", "subject": "history"},
]


@pytest.fixture
def mmlu_like(tmp_path, tokenizer):
    """A dev file with two subjects in it, and the same rows split into one file per subject."""
    from dataflex.data import build_dataset

    files = {
        "dev_all": ROWS,
        "dev_math": [r for r in ROWS if r["subject"] == "math"],
        "dev_history": [r for r in ROWS if r["subject"] == "history"],
    }
    for name, rows in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in files}))

    def build(names):
        return build_dataset(
            dataset=names, dataset_dir=tmp_path, tokenizer=tokenizer, template="default", cutoff_len=64, stage="sft"
        )

    return tmp_path, build


def _partition(ds, subtasks):
    """The subtasks as a set of groups of row contents (independent of row order and id numbering)."""
    groups: dict[int, set] = {}
    for ids, s in zip(ds["input_ids"], subtasks):
        groups.setdefault(s, set()).add(tuple(ids))
    return {frozenset(g) for g in groups.values()}


def test_subtask_column_equals_splitting_the_dev_file_into_datasets(sft_pool, mmlu_like, features_by_value):
    root, build = mmlu_like
    one = select.target_dataset({"dev_all": build(["dev_all"])}, "subject", str(root))
    two = select.target_dataset({"dev_math": build(["dev_math"]), "dev_history": build(["dev_history"])})
    assert one["subject"] == [r["subject"] for r in ROWS]

    by_column = _less(sft_pool, one, aggregation="max", subtask_column="subject")
    by_files = _less(sft_pool, two, aggregation="max")
    assert len(set(by_column.subtasks)) == 2
    assert _partition(one, by_column.subtasks) == _partition(two, two["domain_id"])

    # The same target rows (features keyed by content) in each target's own order: the same scores and picks.
    gen = torch.Generator().manual_seed(0)
    vec = {tuple(ids): torch.randn(16, generator=gen) for ids in one["input_ids"]}
    pool = torch.randn(len(sft_pool), 16, generator=gen)
    feats_one = {"pool": pool, "target": torch.stack([vec[tuple(i)] for i in one["input_ids"]])}
    feats_two = {"pool": pool, "target": torch.stack([vec[tuple(i)] for i in two["input_ids"]])}
    picked = by_column.select(None, 2, 10, features=feats_one)
    assert picked == by_files.select(None, 2, 10, features=feats_two)
    # (equal up to float summation order: the rows of a subtask come in another order)
    metric = by_files.last_metric["train_eval_similarity"]
    assert by_column.last_metric["train_eval_similarity"] == pytest.approx(metric, rel=1e-6)
    # Without the column the file is one subtask: LESS's max over subtasks is then a plain mean.
    whole = _less(sft_pool, one.remove_columns("subject"), aggregation="max")
    assert whole.subtasks == [0] * len(ROWS)
    s_split = less_scores([pool], [feats_one["target"]], [1.0], by_column.subtasks, "max")
    s_whole = less_scores([pool], [feats_one["target"]], [1.0], whole.subtasks, "max")
    assert not torch.allclose(s_split, s_whole)

    # static_select: the same split of a target's rows.
    union = one_shot.target_union({"mmlu": build(["dev_all"])}, "subject", str(root))
    split = one_shot.target_union({"mmlu": build(["dev_math", "dev_history"])})
    sel = _less(sft_pool, union, aggregation="max", subtask_column="subject")
    assert _partition(union, sel.subtasks) == _partition(split, split["domain_id"])


def test_dynamic_select_reads_the_subtask_column_from_the_run_dev_files(sft_pool, mmlu_like, tmp_path):
    root, build = mmlu_like
    cfg = _cfg("less", {"aggregation": "max", "subtask_column": "subject"}, 0)
    cfg = RunConfig.from_params({**cfg.to_params(), "data": {**cfg.to_params()["data"], "dataset_dir": str(root)}})
    run = SimpleNamespace(
        eval_sets={"dev_all": build(["dev_all"])},
        cfg=cfg,
        args=SimpleNamespace(output_dir=str(tmp_path / "out")),
        runtime=lambda **kw: {"dataset": sft_pool, "accelerator": None, "data_collator": None, **kw},
    )
    sel = select.SelectMode(cfg, len(sft_pool)).components(run)["selector"]
    split = select.target_dataset({"dev_math": build(["dev_math"]), "dev_history": build(["dev_history"])})
    assert _partition(sel.eval_dataset, sel.subtasks) == _partition(split, split["domain_id"])
    # The split is part of the selection's cache key.
    plain = _less(sft_pool, sel.eval_dataset.remove_columns("subject"), aggregation="max")
    assert select._eval_fingerprint(sel) != select._eval_fingerprint(plain)


def test_subtask_column_problems_are_one_line(sft_pool, mmlu_like):
    root, build = mmlu_like
    rows = [dict(r) for r in ROWS]
    del rows[3]["subject"]
    (root / "dev_all.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="subtask_column 'subject': row 3 of dataset 'dev_all' has no 'subject' value"):
        select.target_dataset({"dev_all": build(["dev_all"])}, "subject", str(root))
    target = sft_pool.select(range(3))
    for params, message in [
        ({"subtask_column": "input_ids"}, "is a column of the tokenised rows"),
        ({"subtask_column": ""}, "must name a column of the target's raw rows"),
        ({"subtask_column": "subject"}, "'subject' is not a column of the target rows"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            _build("less", sft_pool, params, eval_dataset=target)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- 4. gradient_type: sign


def test_less_runs_with_sign_gradients_and_the_others_accept_them(sft_pool, untrained_model_dir, tmp_path):
    from dataflex.models import load_model

    torch.manual_seed(0)
    model = load_model(str(untrained_model_dir), finetuning_type="lora", lora_target="all", lora_rank=4, lora_alpha=8)
    with torch.no_grad():  # a non-zero B so every LoRA weight has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pool, target = sft_pool.select(range(12)), sft_pool.select(range(40, 44))
    sel = _build(
        "less", pool, {"gradient_type": "sign", "proj_dim": 32, "cache_dir": str(tmp_path)}, eval_dataset=target
    )
    feats = sel.compute_features(model, 0)  # no optimizer state needed
    stored = GradientDatastore.load(feats["pool"])
    assert stored.manifest["key_fields"]["settings"]["gradient_type"] == "sign" and stored.features.shape == (12, 32)
    picked = sel.select(model, 0, 4, features=feats)
    assert len(set(picked)) == 4 and all(0 <= i < 12 for i in picked)

    REGISTRY.check("selector", "cluster_less", {"gradient_type": "sign"})
    REGISTRY.check("selector", "nice", {"gradient_type": "sign", "policy_model_path": str(untrained_model_dir)})
    for name, extra in (("less", {}), ("cluster_less", {}), ("nice", {"policy_model_path": "x"})):
        with pytest.raises(ConfigError, match=f"'{name}': gradient_type must be one of sgd, adam, sign, got 'signum'"):
            REGISTRY.check("selector", name, {"gradient_type": "signum", **extra})
