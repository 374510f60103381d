"""DataFlex's component interfaces over ours (`dataflex.compat`): the proportion manager's DataFlex attributes, the
weighter's Trainer-like ctx, `mix` called by signature, the mixer hooks, attribute state, `selector_io`, DataFlex's
mixer files and their formats, and a user component taking a built-in's name.
(Short runs with components written against DataFlex: tests/integration/test_dataflex_components.py.)"""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataflex import compat
from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY, import_user_modules
from dataflex.train.dataset.mixed_proportion_manager import MixedProportionManager, MixedSnapshot
from dataflex.train.trainer import TrainingArguments
from dataflex.train.trainer.callbacks import TrainContext
from dataflex.train.trainer.losses import MicroBatchLosses, StepInputs, WeightedLoss
from dataflex.utils.selector_io import load_cached_selection, save_selection

ACC = SimpleNamespace(
    num_processes=1,
    process_index=0,
    local_process_index=0,
    is_main_process=True,
    is_local_main_process=True,
    device=torch.device("cpu"),
)


def _sources():
    import datasets

    sizes = [("a", 6), ("b", 4), ("c", 5)]
    rows = {name: [[d, r] for r in range(n)] for d, (name, n) in enumerate(sizes)}
    return {name: datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}) for name, ids in rows.items()}


def _losses(domain_ids, sums, counts, sample_ids=None):
    return MicroBatchLosses(
        token_loss_sum=torch.tensor(sums),
        token_count=torch.tensor(counts),
        window_tokens=int(sum(counts)),
        domain_id=torch.tensor(domain_ids),
        sample_id=torch.tensor(sample_ids) if sample_ids is not None else None,
    )


def _ctx(step, output_dir="out", max_steps=10):
    args = TrainingArguments(output_dir=str(output_dir), gradient_accumulation_steps=2, progress_bar=False)
    return TrainContext(step, max_steps, step / max_steps, 0, 2, ACC, args, ["a", "b", "c"])


# ----------------------------------------------------------------------------- the proportion manager


def test_manager_has_dataflex_attributes():
    src = _sources()
    m = MixedProportionManager(["a", "b", "c"], [6, 4, 5], init_proportions=[2, 1, 1], seed=1, sources=src)
    assert m.sizes == {"a": 6, "b": 4, "c": 5} and m.k == 3 and m.num_rows == 15
    assert m.sample_rule == "mixture" and m.sources["b"] is src["b"]
    assert m.initial_proportions.tolist() == [0.5, 0.25, 0.25] and m.probs is m.proportions
    m.probs = [1, 1, 2]  # DataFlex's attribute: assigning sets the proportions
    assert m.proportions.tolist() == [0.25, 0.25, 0.5] and m.initial_proportions.tolist() == [0.5, 0.25, 0.25]
    assert MixedProportionManager(["a", "b"], {"b": 3, "a": 7}).sizes == {"a": 7, "b": 3}  # a dict in, by name
    assert MixedProportionManager(["a", "b"], [3, 3]).initial_proportions is None
    with pytest.raises(ConfigError, match="lengths differ"):
        MixedProportionManager(["a", "b", "c"], [6, 4, 4], sources=src)


def test_rebuild_returns_a_snapshot_and_leaves_the_sampler_alone():
    m = MixedProportionManager(["a", "b", "c"], [6, 4, 5], init_proportions=[0.5, 0.25, 0.25], sources=_sources())
    before = m.state_dict()
    snap = m.rebuild(num_samples=8)
    assert isinstance(snap, MixedSnapshot) and len(snap) == 8 and snap.names == ["a", "b", "c"]
    assert sorted(np.bincount([d for d, _ in snap.index_table], minlength=3).tolist()) == [2, 2, 4]
    item = snap[0]
    d, row = snap.index_table[0]
    assert item["domain_id"] == d and item["input_ids"] == [d, row]
    assert m.state_dict() == before  # the training draws are not advanced
    assert snap.index_table == m.rebuild(num_samples=8).index_table != m.rebuild(num_samples=8, seed=9).index_table
    assert len(m.rebuild()) == 15  # default: the pool's size
    with pytest.raises(ConfigError, match="without source datasets"):
        MixedProportionManager(["a"], [2]).rebuild(2)[0]


def test_snapshot_is_the_window_since_the_last_mix_and_survives_resume():
    m = MixedProportionManager(["a", "b", "c"], [6, 4, 5], seed=3, sources=_sources())
    warm = [p for step in range(2) for p in m.draw(6, step)]
    assert sorted(m.snapshot().index_table) == sorted(warm)  # the warm-up window: everything drawn so far
    m.start_window()
    window = [p for step in range(2, 5) for p in m.draw(6, step)]
    snap = m.snapshot()
    assert len(snap) == 18 and sorted(snap.index_table) == sorted(window)
    resumed = MixedProportionManager(["a", "b", "c"], [6, 4, 5], seed=3, sources=_sources())
    resumed.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert resumed.snapshot().index_table == snap.index_table
    old = {k: v for k, v in m.state_dict().items() if k != "window_start"}  # a checkpoint from before windows
    resumed.load_state_dict(old)
    assert len(resumed.snapshot()) == 30


# ----------------------------------------------------------------------------- the weighter's ctx


def test_trainer_args_and_state_have_hf_names():
    fields = compat.trainer_fields(_ctx(4, max_steps=8))
    args, state = fields["args"], fields["state"]
    assert (state.global_step, state.max_steps, state.epoch, state.is_world_process_zero) == (4, 8, 0.5, True)
    assert args.local_rank == -1 and args.process_index == 0 and args.world_size == 1 and args.n_gpu == 0
    assert args.gradient_accumulation_steps == 2 and args.output_dir == "out" and args.train_batch_size == 8
    assert args.device == torch.device("cpu") and args.fp16 is False and args.torch_empty_cache_steps is None
    ddp = SimpleNamespace(**{**vars(ACC), "num_processes": 2, "process_index": 3, "local_process_index": 1})
    assert compat.TrainerArgs(TrainingArguments(), ddp).local_rank == 1
    with pytest.raises(AttributeError):
        _ = args.no_such_argument


def test_weighted_loss_gives_the_weighter_a_trainer_like_ctx():
    seen = []

    class Reader:
        needs_step_scores = False

        def get_weighted_loss(self, losses, *, ctx=None, model=None, inputs=None):
            seen.append((ctx.state.global_step, ctx.args.local_rank, ctx.args.world_size, ctx.global_step))
            return losses.mean()

    strategy = WeightedLoss(Reader(), warmup_step=1)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    strategy.start_step(StepInputs(ACC, None, [batch], False, 3, 1, lambda i: _ctx(3)))
    loss = strategy.loss(_losses([0, 1], [2.0, 4.0], [1, 2]), _ctx(3), None, batch)
    assert seen == [(3, -1, 1, 3)] and torch.isclose(loss, torch.tensor(1.0))  # (2 + 2) / 2 / 2 micro-batches


# ----------------------------------------------------------------------------- mix and the mixer's hooks


def test_mix_gets_the_keywords_its_signature_accepts():
    def narrow(model, step_id, batch, dataset=None):
        return (model, step_id, batch, dataset)

    def wide(model, step_id, **kwargs):
        return sorted(kwargs)

    def bare(model, step_id):
        return step_id

    offered = {"batch": 1, "domain_ids": 2, "data_collator": 3, "dataset": 4}
    assert compat.call_with_accepted(narrow, "m", 5, **offered) == ("m", 5, 1, 4)
    assert compat.call_with_accepted(wide, "m", 5, **offered) == ["batch", "data_collator", "dataset", "domain_ids"]
    assert compat.call_with_accepted(bare, "m", 5, **offered) == 5


def test_mixer_inputs_call_update_batch_info_and_keep_the_last_batch():
    calls = []

    class WithHook:
        def update_batch_info(self, batch_loss, domain_id):
            calls.append((batch_loss, domain_id))

    inputs = compat.MixerInputs(WithHook())
    inputs.on_micro_batch(_losses([2, 0], [3.0, 5.0], [2, 2], sample_ids=[7, 1]), _ctx(0))
    inputs.on_micro_batch(_losses([1, 1], [1.0, 3.0], [1, 1], sample_ids=[4, 9]), _ctx(0))
    assert calls == [(2.0, 2), (2.0, 1)]  # token-mean loss of the micro-batch, first sample's domain
    assert inputs.state_dict() == {"last_batch": [4, 9]}
    restored = compat.MixerInputs(object())  # no hook: nothing to call
    restored.load_state_dict(json.loads(json.dumps(inputs.state_dict())))
    restored.on_micro_batch(_losses([0], [1.0], [1]), _ctx(1))
    assert restored.last_batch == [4, 9] and not restored.batch_info


def test_batch_of_rebuilds_the_micro_batch(tokenizer, sft_pool):
    from dataflex.data import DataCollatorForCausalLM

    collate = DataCollatorForCausalLM(tokenizer)
    batch = compat.batch_of(sft_pool, [3, 50], collate, torch.device("cpu"))
    assert batch["sample_id"].tolist() == [3, 50] and batch["domain_id"].tolist() == sft_pool[[3, 50]]["domain_id"]


def test_doremi_weights_loss_and_end_of_run_hook(tmp_path):
    class DataFlexDoReMi:
        def __init__(self):
            self.saved = []

        def get_current_doremi_weights(self):
            return np.array([0.5, 0.2, 0.3])

        def save_average_weights(self, output_dir):
            self.saved.append(output_dir)

    mixer = DataFlexDoReMi()
    strategy = compat.mixer_loss(mixer)
    losses = _losses([0, 2], [2.0, 6.0], [1, 2])  # token means 2 and 3
    loss = strategy.loss(losses, _ctx(1), None, {})
    assert torch.isclose(loss, torch.tensor((0.5 * 2 + 0.3 * 3) / 2 / 2))
    assert compat.mixer_loss(object()) is None
    compat.finish_mixer(mixer, tmp_path, SimpleNamespace(is_main_process=False))
    compat.finish_mixer(mixer, tmp_path, ACC)
    assert mixer.saved == [str(tmp_path)]


def test_attribute_state_carries_numbers_and_arrays_only():
    class Stateful:
        def __init__(self):
            self.mixture_manager = object()
            self.weights = np.array([0.2, 0.8])
            self.history = [np.array([1, 2]), np.array([3, 4])]
            self.prev_batch_info = {"loss": 1.5, "domain_id": 1}
            self.eps = np.float64(0.1)
            self.loaded = True  # a flag about an object: set-up, not state
            self.output_dir = "somewhere"
            self.model = None

    a = Stateful()
    state = json.loads(json.dumps(compat.attribute_state(a)))
    assert set(state) == {"weights", "history", "prev_batch_info", "eps", "model"}
    b = Stateful()
    b.weights, b.history, b.loaded, b.model = np.zeros(2), [], False, torch.nn.Linear(1, 1)
    compat.load_attribute_state(b, state)
    assert b.weights.tolist() == [0.2, 0.8] and b.weights.dtype == np.float64 and b.history[1].tolist() == [3, 4]
    assert b.prev_batch_info == {"loss": 1.5, "domain_id": 1} and b.eps == 0.1
    assert b.loaded is False and isinstance(b.model, torch.nn.Linear)  # an object is never overwritten


# ----------------------------------------------------------------------------- DataFlex's files


def test_odm_writes_dataflex_odm_weights_jsonl(tmp_path):
    manager = MixedProportionManager(["a", "b", "c"], [5, 5, 5])
    cfg = {"alpha": 0.5, "warmup_steps": 1, "reward_scale": 2.0, "min_exploration_rate": 0.0}
    mixer = REGISTRY.build("mixer", "odm", runtime={"mixture_manager": manager, "output_dir": str(tmp_path)}, cfg=cfg)
    for step in range(1, 4):
        mixer.on_micro_batch(_losses([1, 0, 1], [4.0, 2.0, 8.0], [2, 2, 2]), _ctx(step - 1))
        mixer.on_step_end(_ctx(step), {})
    lines = [json.loads(x) for x in (tmp_path / "odm_weights.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3]  # one line per update, after warmup_steps
    keys = ["step", "timestamp", "domain_names", "domain_weights", "estimated_rewards", "exploration_rate", "alpha"]
    assert all(list(x) == keys for x in lines)
    assert lines[-1]["domain_weights"] == pytest.approx(manager.proportions.tolist())
    assert lines[-1]["estimated_rewards"] == pytest.approx(mixer.rewards.tolist()) and lines[0]["alpha"] == 0.5


def test_doremi_writes_dataflex_files(tmp_path, untrained_model_dir):
    manager = MixedProportionManager(["a", "b"], [5, 5])
    mixer = REGISTRY.build(
        "mixer",
        "doremi",
        runtime={"mixture_manager": manager, "output_dir": str(tmp_path)},
        cfg={"reference_model_path": str(untrained_model_dir), "reweight_eta": 1.0, "reweight_eps": 0.1},
    )
    for step, sums in ((1, [[2.0, 0.0], [4.0, 2.0]]), (2, [[0.0, 3.0], [2.0, 2.0]])):
        mixer._step_sums = torch.tensor(sums, dtype=torch.float64)  # excess sums, token counts per domain
        mixer.on_step_end(_ctx(step), {})
    lines = [json.loads(x) for x in (tmp_path / "doremi_weights.jsonl").read_text().splitlines()]
    assert [list(x) for x in lines] == [["step", "timestamp", "domain_names", "domain_weights", "perdomain_scores"]] * 2
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["perdomain_scores"] == [0.5, 0.0]
    assert lines[1]["domain_weights"] == pytest.approx(mixer.alpha.tolist())
    assert mixer.get_current_doremi_weights().tolist() == mixer.alpha.tolist()

    compat.finish_mixer(mixer, tmp_path, ACC)
    avg = json.loads((tmp_path / "doremi_average_weights.json").read_text())
    assert avg == {
        "description": "DoReMi Step 2: average domain weights for Step 3",
        "update_times": 2,
        "domain_names": ["a", "b"],
        "average_weights": pytest.approx(mixer.average_weights.tolist()),
    }
    txt = (tmp_path / "doremi_step3_proportions.txt").read_text().splitlines()
    w = mixer.average_weights
    assert txt == [
        "# DoReMi Step 3 proportions",
        f"# proportions: {w.tolist()}",
        f"a: {w[0]:.6f}",
        f"b: {w[1]:.6f}",
    ]


def test_step_log_of_a_resumed_run_replaces_the_lines_it_rewrites(tmp_path):
    path = tmp_path / "odm_weights.jsonl"
    first = compat.StepLog(path)
    for step in (1, 2, 3, 4):
        first.append({"step": step, "x": "first"})
    resumed = compat.StepLog(path)  # resumed from the step-2 checkpoint: steps 3 and 4 are written again
    resumed.append({"step": 3, "x": "again"})
    resumed.append({"step": 4, "x": "again"})
    assert [(x["step"], x["x"]) for x in map(json.loads, path.read_text().splitlines())] == [
        (1, "first"),
        (2, "first"),
        (3, "again"),
        (4, "again"),
    ]


# ----------------------------------------------------------------------------- selectors


def test_selector_io_has_dataflex_format(tmp_path):
    path = str(tmp_path / "cache" / "step_4.json")
    save_selection(path, [3, np.int64(1)], {"loss": [0.5, 0.25]}, ACC)
    text = (tmp_path / "cache" / "step_4.json").read_text()
    assert json.loads(text) == {"indices": [3, 1], "metric": {"loss": [0.5, 0.25]}} and '\n    "indices"' in text
    assert load_cached_selection(path) == ([3, 1], {"loss": [0.5, 0.25]})
    other = str(tmp_path / "other.json")
    save_selection(other, [1], {}, SimpleNamespace(is_main_process=False))  # only the main process writes
    assert not (tmp_path / "other.json").exists()
    (tmp_path / "bare.json").write_text("{}")
    assert load_cached_selection(str(tmp_path / "bare.json")) == ([], {})


def test_selector_collator_keeps_the_fields_a_selector_adds(tokenizer, sft_pool):
    from dataflex.data import DataCollatorForCausalLM
    from dataflex.train.selector.random_selector import RandomSelector

    sel = RandomSelector(sft_pool, ACC, DataCollatorForCausalLM(tokenizer), None)
    batch = sel.data_collator([{"idx": i, "tag": "x", **sft_pool[i]} for i in (5, 2)])
    assert batch["idx"].tolist() == [5, 2] and batch["sample_id"].tolist() == [5, 2]
    assert "tag" not in batch and "source_row" not in batch  # not an integer; a pool column dropped on purpose
    assert RandomSelector(sft_pool, ACC, None, None).data_collator is None


# ----------------------------------------------------------------------------- registering a built-in's name


@pytest.fixture
def registry_snapshot():
    REGISTRY.names("mixer")  # built-ins imported before the snapshot
    saved = {kind: dict(store) for kind, store in REGISTRY._store.items()}
    yield
    REGISTRY._store.clear()
    REGISTRY._store.update(saved)


def test_a_user_module_may_take_a_builtin_name(tmp_path, registry_snapshot, caplog):
    builtin = REGISTRY.get("mixer", "random")
    path = tmp_path / "df_random.py"
    path.write_text(
        textwrap.dedent("""
        import numpy as np
        from dataflex.core.registry import register_mixer
        from .base_mixer import Mixer  # a file copied out of DataFlex's package imports its base relatively

        @register_mixer("random")
        class RandomMixer(Mixer):
            def __init__(self, mixture_manager, seed):
                super().__init__(mixture_manager)
                self.seed = seed

            def mix(self, model, step_id, **kwargs):
                return np.ones(len(self.mixture_manager.names)) / len(self.mixture_manager.names)
        """)
    )
    with caplog.at_level("WARNING", logger="dataflex"):
        import_user_modules([str(path)])
        import_user_modules([str(path)])  # a run imports it again: no second notice
    ours = REGISTRY.get("mixer", "random")
    assert ours is not builtin and ours.__module__ == "dataflex_user_df_random"
    notices = [r.getMessage() for r in caplog.records if "replaces the built-in" in r.getMessage()]
    assert len(notices) == 1 and "dataflex.train.mixer.random_mixer.RandomMixer" in notices[0]
    REGISTRY.register("mixer", "random")(builtin)  # a built-in registered after its override: the user's stays
    assert REGISTRY.get("mixer", "random") is ours

    class Another(ours):
        pass

    with pytest.raises(ConfigError, match="already registered by dataflex_user_df_random.RandomMixer"):
        REGISTRY.register("mixer", "random")(Another)  # two user classes, one name
