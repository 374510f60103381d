"""The shape of the code the project promises: one run core, one loop without attribute probing, no formatter
escapes. These fail when a change forks the run core or hides code from the formatter."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "dataflex"


def _calls(name: str) -> dict[str, int]:
    """Where `name(...)` is called in src/dataflex (as a bare name or an attribute), per file."""
    found: dict[str, int] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if called == name:
                    rel = str(path.relative_to(SRC))
                    found[rel] = found.get(rel, 0) + 1
    return found


def test_the_trainer_is_built_only_by_the_run_core():
    assert _calls("Trainer") == {"train/run.py": 1}


def test_the_run_core_assembles_tokenizer_collator_and_accelerator_once():
    # (the loop's own default serves loop-level tests and benches that build a Trainer by hand)
    assert _calls("make_accelerator") == {"train/run.py": 1, "train/trainer/loop.py": 1}
    assert _calls("DataCollatorForCausalLM").get("train/run.py") == 1
    assert not {f for f in _calls("DataCollatorForCausalLM") if f.startswith(("train/modes", "pipelines"))}


def test_the_loop_does_not_probe_its_components():
    tree = ast.parse((SRC / "train" / "trainer" / "loop.py").read_text())
    probes = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
    ]
    assert not probes, f"attribute probing in the loop at lines {probes}; extend Callback / LossStrategy instead"


def test_no_formatter_escapes():
    root = SRC.parents[1]
    marked = [
        str(p.relative_to(root))
        for folder in ("src", "tests", "bench")
        for p in (root / folder).rglob("*.py")
        if "fmt: " + "skip" in p.read_text() or "fmt: " + "off" in p.read_text()
    ]
    assert not marked, marked


def _restated_defaults(components: dict) -> list[str]:
    """Entries of a components mapping that repeat their constructor's default (a second home for it)."""
    import inspect

    import dataflex.train.mixer  # noqa: F401  (registers the built-ins)
    import dataflex.train.selector  # noqa: F401
    import dataflex.train.weighter  # noqa: F401
    from dataflex.core.registry import REGISTRY

    kinds = {"selectors": "selector", "mixers": "mixer", "weighters": "weighter"}
    found = []
    for section, entries in components.items():
        for key, entry in (entries or {}).items():
            params = inspect.signature(REGISTRY.get(kinds[section], entry["name"]).__init__).parameters
            for name, value in (entry.get("params") or {}).items():
                if name in params and params[name].default is not inspect.Parameter.empty:
                    if params[name].default == value:
                        found.append(f"{section}.{key}.{name}: {value!r}")
    return found


def test_component_defaults_live_only_in_constructor_signatures():
    """examples/components.yaml and the demo's components file set only what differs from a component's default."""
    import yaml

    root = SRC.parents[1]
    example = yaml.safe_load((root / "examples" / "components.yaml").read_text())
    demo = yaml.safe_load((root / "conf" / "base" / "demo_components.yml").read_text())
    assert not _restated_defaults(example), _restated_defaults(example)
    assert not _restated_defaults(demo), _restated_defaults(demo)
