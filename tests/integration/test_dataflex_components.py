"""Components written against DataFlex's interfaces, as a DataFlex user writes them (a user module), in short runs
on the tiny model: a mixer reading `batch`, `domain_ids`, `dataset` and the manager's `sources` / `probs` and
calling `rebuild()`, with DataFlex's hooks; a weighter reading `ctx.state` and `ctx.args`; a selector caching its
selection with `selector_io`. Each records how it was called. Also the built-in ODM and DoReMi mixers writing
DataFlex's files in a run. (The interfaces one by one: tests/unit/test_dataflex_interfaces.py.)"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import lora_model_params, train_params

from dataflex.config import DEFAULTS, RunConfig
from dataflex.train.modes import mix, select
from dataflex.train.run import train

USER_COMPONENTS = textwrap.dedent('''
    import json
    import os

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset

    from dataflex.core.registry import register_mixer, register_selector, register_weighter
    from dataflex.train.mixer.base_mixer import Mixer
    from dataflex.train.selector.base_selector import Selector
    from dataflex.train.weighter.base_weighter import Weighter
    from dataflex.utils.logging import logger
    from dataflex.utils.selector_io import load_cached_selection, save_selection


    def record(path, entry):
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\\n")


    @register_mixer("df_batch_mixer")
    class BatchMixer(Mixer):
        """Next proportions from the domain counts of the last training batch, DataFlex-style."""

        def __init__(self, mixture_manager, record, output_dir=None, accelerator=None):
            super().__init__(mixture_manager)
            self.record = record
            self.output_dir = output_dir
            self.accelerator = accelerator
            self.prev_batch_info = None
            self.batch_infos = 0
            self.weight_calls = 0

        def update_batch_info(self, batch_loss, domain_id):
            self.prev_batch_info = {"loss": batch_loss, "domain_id": domain_id}
            self.batch_infos += 1

        def get_current_doremi_weights(self):
            self.weight_calls += 1
            return np.ones(self.mixture_manager.k)

        def mix(self, model, step_id, **kwargs):
            batch, domain_ids, dataset = kwargs["batch"], kwargs["domain_ids"], kwargs["dataset"]
            collator = kwargs["data_collator"]
            with torch.no_grad():
                loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
            first = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collator)))
            m = self.mixture_manager
            before = m.probs.tolist()
            counts = np.bincount(domain_ids.cpu().numpy(), minlength=m.k)
            new = (counts + 1) / (counts + 1).sum()
            m.set_proportions(new)
            snapshot = m.rebuild(num_samples=len(dataset))
            record(self.record, {
                "step": step_id,
                "batch_keys": sorted(batch),
                "batch_rows": int(batch["input_ids"].shape[0]),
                "domain_ids_of_batch": torch.equal(domain_ids, batch["domain_id"]),
                "loss": float(loss),
                "dataset": type(dataset).__name__,
                "dataset_len": len(dataset),
                "dataset_first_batch": sorted(first),
                "collator": type(collator).__name__,
                "sources": {n: [type(ds).__name__, len(ds)] for n, ds in m.sources.items()},
                "sizes": m.sizes,
                "probs_before": before,
                "probs_after": m.probs.tolist(),
                "rebuilt": [type(snapshot).__name__, len(snapshot)],
                "prev_batch_info": self.prev_batch_info,
                "batch_infos": self.batch_infos,
                "output_dir": self.output_dir,
            })
            return new

        def save_average_weights(self, output_dir):
            record(self.record, {"saved_to": output_dir, "weight_calls": self.weight_calls,
                                 "batch_infos": self.batch_infos})


    @register_weighter("df_step_weighter")
    class StepReader(Weighter):
        """Later samples weigh more; reads the Trainer-like ctx as DataFlex's weighters do."""

        def __init__(self, record, **kwargs):
            super().__init__(**kwargs)
            self.record = record

        def get_weighted_loss(self, losses, *, ctx=None, model=None, inputs=None):
            if ctx.args.local_rank in [-1, 0]:
                record(self.record, {
                    "global_step": ctx.state.global_step,
                    "max_steps": ctx.state.max_steps,
                    "local_rank": ctx.args.local_rank,
                    "world_size": ctx.args.world_size,
                    "gradient_accumulation_steps": ctx.args.gradient_accumulation_steps,
                    "losses": losses.numel(),
                    "inputs": sorted(inputs),
                })
            w = torch.linspace(1.0, 2.0, losses.numel(), device=losses.device)
            return (w * losses).sum() / w.sum()


    class IndexedDataset(Dataset):
        def __init__(self, original):
            self.dataset = original

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            return {"idx": index, **self.dataset[index]}


    @register_selector("df_cached_selector")
    class CachedLossSelector(Selector):
        """The highest-loss samples, cached per step under cache_dir with selector_io (DataFlex's pattern)."""

        def __init__(self, dataset, accelerator, data_collator, cache_dir, record):
            super().__init__(dataset, accelerator, data_collator, cache_dir)
            self.record = record

        def select(self, model, step_id, num_samples, **kwargs):
            save_path = os.path.join(self.cache_dir, f"step_{step_id}.json")
            if os.path.exists(save_path):
                indices, _ = load_cached_selection(save_path)
                record(self.record, {"step": step_id, "cached": True, "indices": indices})
                return indices
            losses = torch.zeros(len(self.dataset))
            model.eval()
            with torch.no_grad():
                for batch in DataLoader(IndexedDataset(self.dataset), batch_size=1, collate_fn=self.data_collator):
                    keys = ("input_ids", "attention_mask", "labels")
                    inputs = {k: batch[k].to(self.accelerator.device) for k in keys}
                    losses[batch["idx"]] = model(**inputs).loss.float().cpu()
            sel = torch.topk(losses, num_samples).indices.tolist()
            save_selection(save_path, sel, {"loss": [float(losses[i]) for i in sel]}, self.accelerator)
            logger.info("df_cached_selector: %d samples at step %d", len(sel), step_id)
            record(self.record, {"step": step_id, "cached": False, "indices": sel, "kwargs": sorted(kwargs)})
            return sel
''')


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "dataflex_style_components.py"
    path.write_text(USER_COMPONENTS)
    return str(path)


def _cfg(tmp_path, model_dir, train_type, section, name, params, user_modules=(), **flex):
    model = lora_model_params(model_dir)
    train_args = train_params(tmp_path / "out")
    base = {
        **DEFAULTS["dataflex"],
        "train_type": train_type,
        "component_name": name,
        "user_modules": list(user_modules),
        "components": {section: {name: {"name": name, "params": params}}},
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        **flex,
    }
    return RunConfig.from_params({"model": model, "train": train_args, "dataflex": base})


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataflex_style_mixer(tmp_path, tiny_model_dir, sft_pool, user_module):
    rec = tmp_path / "mixer.jsonl"
    cfg = _cfg(tmp_path, tiny_model_dir, "dynamic_mix", "mixers", "df_batch_mixer", {"record": str(rec)}, [user_module])
    result = mix.run_all(cfg, sft_pool)
    assert result["global_step"] == 6
    *calls, saved = _records(rec)
    assert [c["step"] for c in calls] == [2, 4]
    for c in calls:
        assert c["batch_keys"] == ["attention_mask", "domain_id", "input_ids", "labels", "sample_id"]
        assert c["batch_rows"] == 4 and c["domain_ids_of_batch"] and c["loss"] > 0
        # `dataset`: the rows of the round that just ended (2 steps x 4 samples), a DataFlex snapshot
        assert (c["dataset"], c["dataset_len"], c["collator"]) == ("MixedSnapshot", 8, "DataCollatorForCausalLM")
        assert c["dataset_first_batch"] == ["attention_mask", "domain_id", "input_ids", "labels", "sample_id"]
        assert c["sources"] == {n: ["Dataset", 40] for n in ("arith_train", "reverse_train", "sort_train")}
        assert c["sizes"] == {"arith_train": 40, "reverse_train": 40, "sort_train": 40}
        assert c["rebuilt"] == ["MixedSnapshot", 8] and c["output_dir"] == cfg.train.output_dir
        assert c["prev_batch_info"]["domain_id"] in (0, 1, 2) and c["prev_batch_info"]["loss"] > 0
    # update_batch_info after every micro-batch; its state carried between rounds in the mixer's attributes
    assert [c["batch_infos"] for c in calls] == [2, 4]
    assert calls[0]["probs_before"] == pytest.approx([1 / 3] * 3)
    assert calls[1]["probs_before"] == pytest.approx(calls[0]["probs_after"])  # what mix returned is in force
    history = [m["proportions"] for m in result["mixture_history"]]
    assert history[1:] == [pytest.approx(c["probs_after"]) for c in calls]
    # DataFlex's end-of-run hook, and its DoReMi loss weights asked for at every micro-batch from the start
    assert saved == {"saved_to": cfg.train.output_dir, "weight_calls": 6, "batch_infos": 6}


def test_dataflex_style_weighter(tmp_path, tiny_model_dir, sft_pool, user_module):
    rec = tmp_path / "weighter.jsonl"
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "dynamic_weight",
        "weighters",
        "df_step_weighter",
        {"record": str(rec)},
        [user_module],
        warmup_step=1,
        train_step=4,
    )
    cfg = RunConfig.from_params(
        {**cfg.to_params(), "train": {**cfg.to_params()["train"], "gradient_accumulation_steps": 2}}
    )
    result = train(cfg, sft_pool, mode="dynamic_weight")
    assert result["global_step"] == 4
    calls = _records(rec)
    assert [c["global_step"] for c in calls] == [1, 1, 2, 2, 3, 3]  # from warmup_step on, each micro-batch
    assert all(c["local_rank"] == -1 and c["world_size"] == 1 and c["max_steps"] == 4 for c in calls)
    assert all(c["gradient_accumulation_steps"] == 2 and c["losses"] == 4 for c in calls)
    assert calls[0]["inputs"] == ["attention_mask", "domain_id", "input_ids", "labels", "sample_id"]
    assert any(abs(h.get("weighted_loss", h["loss"]) - h["loss"]) > 1e-6 for h in result["log_history"])


def test_dataflex_style_selector_caches_with_selector_io(tmp_path, tiny_model_dir, sft_pool, user_module):
    rec, cache = tmp_path / "selector.jsonl", tmp_path / "cache"
    params = {"record": str(rec), "cache_dir": str(cache)}
    cfg = _cfg(tmp_path, tiny_model_dir, "dynamic_select", "selectors", "df_cached_selector", params, [user_module])
    result = select.run_all(cfg, sft_pool, None)
    assert result["global_step"] == 6
    calls = _records(rec)
    assert [(c["step"], c["cached"]) for c in calls] == [(2, False), (4, False)]
    assert {"optimizer_state", "scheduler_state", "current_update_times", "update_times", "tokenizer"} <= set(
        calls[0]["kwargs"]
    )
    for c in calls:
        saved = json.loads((cache / f"step_{c['step']}.json").read_text())
        assert list(saved) == ["indices", "metric"] and saved["indices"] == c["indices"]
        assert len(saved["metric"]["loss"]) == 8 and saved["metric"]["loss"] == sorted(saved["metric"]["loss"])[::-1]

    # Another run (its own output_dir, so this project's selection cache misses) reuses the selector's own cache.
    again = _cfg(tmp_path / "again", tiny_model_dir, "dynamic_select", "selectors", "df_cached_selector", params)
    again = RunConfig.from_params(
        {**again.to_params(), "dataflex": {**again.to_params()["dataflex"], "user_modules": [user_module]}}
    )
    assert select.run_all(again, sft_pool, None)["global_step"] == 6
    reused = _records(rec)[2:]
    assert [(c["step"], c["cached"]) for c in reused] == [(2, True), (4, True)]
    for c in reused:
        assert (
            json.loads((tmp_path / "again" / "out" / "selections" / f"step_{c['step']}.json").read_text())["indices"]
            == c["indices"]
        )


def test_builtin_odm_and_doremi_write_dataflex_files(tmp_path, tiny_model_dir, sft_pool):
    odm = {"alpha": 0.5, "warmup_steps": 1, "min_exploration_rate": 0.01}
    cfg = _cfg(tmp_path / "odm", tiny_model_dir, "dynamic_mix", "mixers", "odm", odm)
    assert mix.run_all(cfg, sft_pool)["global_step"] == 6
    lines = _records(tmp_path / "odm" / "out" / "odm_weights.jsonl")
    assert [x["step"] for x in lines] == [2, 3, 4, 5, 6]  # every update after warmup_steps
    assert lines[0]["domain_names"] == ["arith_train", "reverse_train", "sort_train"]

    base = _cfg(tmp_path / "doremi", tiny_model_dir, "dynamic_mix", "mixers", "doremi", {}, train_step=3)
    proxy = mix.doremi_config(base, "proxy", reference_dir=str(tiny_model_dir))  # as the doremi pipeline's step 2
    summary = mix.run_single_segment(proxy, sft_pool)
    out = tmp_path / "doremi" / "out"
    lines = _records(out / "doremi_weights.jsonl")
    assert [x["step"] for x in lines] == list(range(1, summary["global_step"] + 1))
    avg = json.loads((out / "doremi_average_weights.json").read_text())
    assert avg["update_times"] == summary["global_step"] and avg["average_weights"] == pytest.approx(
        summary["doremi_average_weights"]
    )
    assert (out / "doremi_step3_proportions.txt").read_text().startswith("# DoReMi Step 3 proportions\n")
