"""Registry and component bases: the seed page's examples register and build verbatim; bad keys are errors."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from dataflex.core.components_cfg import component_spec, load_components_cfg
from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY, import_user_modules

# The three examples exactly as the seed page (framework-design) shows them, as a user module.
SEED_EXAMPLES = textwrap.dedent("""
    from dataflex.core.registry import register_selector, register_mixer, register_weighter
    from dataflex.train.selector.base_selector import logger, Selector
    from dataflex.train.mixer.base_mixer import Mixer
    from dataflex.train.weighter.base_weighter import Weighter
    from dataflex.utils.logging import logger
    from typing import Any, Union
    from torch import nn
    import torch
    import numpy as np

    @register_selector('seed_custom')
    class CustomSelector(Selector):
        def __init__(self, dataset, accelerator, data_collator, cache_dir):
            super().__init__(dataset, accelerator, data_collator, cache_dir)
            logger.info(f"CustomSelector initialized.")

        def select(self, model, step_id: int, num_samples: int, **kwargs):
            return list(range(num_samples))

    @register_mixer("seed_random")
    class RandomMixer(Mixer):
        def __init__(self, mixture_manager, seed):
            super().__init__(mixture_manager)
            self.seed = seed

        def mix(self, model, step_id: int, **kwargs) -> np.ndarray:
            k = len(self.mixture_manager.names)
            np.random.seed(self.seed)
            raw = np.random.random(k)
            probs = raw / raw.sum()
            logger.info(f"[RandomMixer] Step {step_id} Generated proportions: {probs}")
            return probs

    @register_weighter("seed_custom")
    class CustomWeighter(Weighter):
        def __init__(self, strategy: str = "uniform", **kwargs):
            super().__init__(**kwargs)
            self.strategy = strategy
            logger.info(f"CustomWeighter initialized with strategy: {strategy}")

        def get_weighted_loss(self, losses: torch.Tensor, *, ctx: Any = None, model: nn.Module | None = None,
                              inputs: dict[str, Union[torch.Tensor, Any]] | None = None) -> torch.Tensor:
            if not torch.is_tensor(losses) or losses.dim() == 0:
                return losses
            weights = torch.ones_like(losses) / losses.numel()
            return torch.sum(weights * losses)
""")

COMPONENTS_YAML = textwrap.dedent("""
    selectors:
      seed_custom:
        name: seed_custom
        params:
          cache_dir: ../dataflex_saves/custom_output
    mixers:
      seed_random:
        name: seed_random
        params:
          seed: 42
    weighters:
      seed_custom:
        name: seed_custom
        params:
          strategy: uniform
""")


class _Manager:
    names = ["a", "b", "c"]


@pytest.fixture(scope="module")
def seed_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "seed_components.py"
    path.write_text(SEED_EXAMPLES)
    import_user_modules([str(path)])
    cfg_file = path.parent / "components.yaml"
    cfg_file.write_text(COMPONENTS_YAML)
    return cfg_file


def test_seed_examples_register_and_build(seed_module):
    cfg = load_components_cfg(seed_module)
    name, params = component_spec(cfg, "selector", "seed_custom")
    sel = REGISTRY.build(
        "selector",
        name,
        runtime={"dataset": list(range(10)), "accelerator": None, "data_collator": None, "eval_dataset": None},
        cfg=params,
    )
    assert sel.cache_dir == "../dataflex_saves/custom_output"
    assert sel.select(None, 0, 4) == [0, 1, 2, 3]

    name, params = component_spec(cfg, "mixer", "seed_random")
    mixer = REGISTRY.build("mixer", name, runtime={"mixture_manager": _Manager()}, cfg=params)
    probs = mixer.mix(None, 0)
    assert probs.shape == (3,) and np.isclose(probs.sum(), 1.0)

    name, params = component_spec(cfg, "weighter", "seed_custom")
    weighter = REGISTRY.build("weighter", name, runtime={}, cfg=params)
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.isclose(weighter.get_weighted_loss(losses), torch.tensor(2.0))
    assert "seed_custom" in REGISTRY.names("selector")


def test_unknown_param_is_an_error_naming_accepted(seed_module):
    with pytest.raises(ConfigError, match="does not accept parameter.*cache_dri.*accepted: dataset"):
        REGISTRY.build(
            "selector",
            "seed_custom",
            runtime={"dataset": [], "accelerator": None, "data_collator": None},
            cfg={"cache_dri": "x"},
        )


def test_missing_param_and_unknown_name(seed_module):
    with pytest.raises(ConfigError, match="needs parameter.*seed"):
        REGISTRY.build("mixer", "seed_random", runtime={"mixture_manager": _Manager()}, cfg={})
    with pytest.raises(ConfigError, match="unknown selector 'nope'.*seed_custom"):
        REGISTRY.build("selector", "nope")


def test_var_kwargs_constructor_receives_everything(seed_module):
    w = REGISTRY.build("weighter", "seed_custom", runtime={"accelerator": "acc"}, cfg={"strategy": "x", "extra": 1})
    assert w.strategy == "x" and w.runtime == {"extra": 1, "accelerator": "acc"}


def test_duplicate_name_from_another_class_is_refused(seed_module):
    from dataflex.core.registry import register_selector
    from dataflex.train.selector.base_selector import Selector

    with pytest.raises(ConfigError, match="already registered"):

        @register_selector("seed_custom")
        class Other(Selector):  # noqa: F811
            def select(self, model, step_id, num_samples, **kwargs):
                return []


def test_inline_components_override_file_and_bad_sections(tmp_path, seed_module):
    cfg = load_components_cfg(seed_module, inline={"mixers": {"seed_random": {"params": {"seed": 7}}}})
    assert component_spec(cfg, "mixer", "seed_random") == ("seed_random", {"seed": 7})
    # `name` lets one class serve under several keys.
    cfg = load_components_cfg(inline={"mixers": {"fast": {"name": "seed_random", "params": {"seed": 1}}}})
    assert component_spec(cfg, "mixer", "fast") == ("seed_random", {"seed": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("samplers: {}\n")
    with pytest.raises(ConfigError, match="unknown section 'samplers'"):
        load_components_cfg(bad)
    bad.write_text("selectors: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_components_cfg(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_components_cfg(tmp_path / "missing.yaml")


def test_user_module_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        import_user_modules([str(tmp_path / "nope.py")])
    with pytest.raises(ConfigError, match="cannot import user module"):
        import_user_modules("no_such_module_xyz")


def test_an_unknown_component_name_gets_a_suggestion():
    from dataflex.core.errors import ConfigError
    from dataflex.core.registry import REGISTRY

    with pytest.raises(ConfigError, match=r"unknown selector 'lesss' \(did you mean less\?\)"):
        REGISTRY.get("selector", "lesss")
