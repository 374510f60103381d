"""dataflex-cli: train, offline-select, export, make-demo-data, make-tiny-model, version.

`train` takes a DataFlex / LLaMA-Factory flat YAML, maps it onto the grouped Kedro parameters, validates
everything it can before any heavy work, and runs the pipeline of its `train_type` in a Kedro session.
A user mistake ends with one `dataflex-cli: error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import click

from dataflex import __version__
from dataflex.core.errors import ConfigError, DataFlexError

# Kedro imports `<package>.cli` for project-specific `kedro` commands and needs a `cli` group there.
# The project adds none: dataflex-cli is its own entry point (main below).
cli = click.Group(name="dataflex", help="dataflex adds no kedro subcommands; use dataflex-cli.")

# Third-party deprecation noise that every run printed and no user can act on: kedro and kedro-mlflow call omegaconf's
# register_new_resolver, mlflow asks for type hints on a class it defines itself, peft calls a renamed transformers
# method. Silenced by dataflex-cli and by the Kedro project settings (dataflex.settings); nothing else is.
QUIET_WARNINGS = (
    (UserWarning, r"register_new_resolver\(\) is deprecated"),
    (UserWarning, r".*Add type hints to the `predict` method"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


def quiet_known_warnings() -> None:
    """Filter QUIET_WARNINGS out (before the imports that would emit them). Also as a filter of the `py.warnings`
    logger Kedro routes warnings to: mlflow emits its warning inside its own `catch_warnings()` with
    `simplefilter("once")`, which outranks any `filterwarnings` made before."""
    import logging
    import re
    import warnings

    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    patterns = [re.compile(message) for _, message in QUIET_WARNINGS]

    def known(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.search(text) for p in patterns)

    logger = logging.getLogger("py.warnings")
    if not any(getattr(f, "__name__", "") == "known" for f in logger.filters):
        logger.addFilter(known)


def find_project_root(start: Path | None = None) -> Path:
    """The Kedro project to run in: the nearest parent with a dataflex pyproject, else this package's repo."""
    candidates = [start or Path.cwd(), *(start or Path.cwd()).parents, Path(__file__).resolve().parents[2]]
    for path in candidates:
        pyproject = path / "pyproject.toml"
        if (
            pyproject.is_file()
            and (path / "conf" / "base").is_dir()
            and 'package_name = "dataflex"' in pyproject.read_text()
        ):
            return path
    raise ConfigError(
        "no dataflex Kedro project found (a folder with pyproject.toml and conf/base); "
        "run from the project or pass --project-dir"
    )


def build_train_params(
    config: str,
    overrides: list[str],
    cwd: Path | None = None,
    pipeline: str | None = None,
    project: Path | None = None,
) -> dict[str, Any]:
    """The flat YAML plus overrides as grouped parameters, validated (with `pipeline`'s own group, if any).
    Relative input paths resolve against the working directory, then the YAML's folder, then the project."""
    from dataflex.config import flat_to_grouped, load_yaml_config, parse_overrides, resolve_paths, validate_params

    flat = load_yaml_config(config)
    flat.update(parse_overrides(overrides))
    params = flat_to_grouped(flat)
    # A DataFlex YAML is not the demo: build nothing implicitly unless it points at the demo folders.
    search = (Path(config).resolve().parent, *((project,) if project else ()))
    params = resolve_paths(params, cwd or Path.cwd(), search)
    validate_params(params, pipelines=(pipeline,) if pipeline else ())
    return params


def cmd_train(ns: argparse.Namespace) -> int:
    project = Path(ns.project_dir).resolve() if ns.project_dir else find_project_root()
    params = build_train_params(ns.config, ns.overrides, pipeline=ns.pipeline, project=project)
    # Demo folders resolve against the project, like the Kedro defaults.
    params["demo"] = {
        **params["demo"],
        "data_dir": str(project / params["demo"]["data_dir"]),
        "model_dir": str(project / params["demo"]["model_dir"]),
    }
    runtime = dict(params)
    if ns.mlflow_uri:
        runtime["mlflow_uri"] = ns.mlflow_uri
    # The project hook prints the end-of-run summary (outputs, numbers, eval table, MLflow run), as for `kedro run`.
    run_kedro(project, ns.pipeline or params["dataflex"]["train_type"], runtime)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """`dataflex-cli compare CONFIG.yaml`: the flat YAML's base config and its `compare_*` keys, every arm x seed
    checked before Kedro starts (one line, exit 2), then `kedro run --pipelines=compare`."""
    from dataflex.pipelines.compare.cells import plan_cells

    project = Path(ns.project_dir).resolve() if ns.project_dir else find_project_root()
    params = build_train_params(ns.config, ns.overrides, project=project)
    params["demo"] = {
        **params["demo"],
        "data_dir": str(project / params["demo"]["data_dir"]),
        "model_dir": str(project / params["demo"]["model_dir"]),
    }
    from dataflex.config import load_yaml_config, parse_overrides

    if "output_dir" not in {**load_yaml_config(ns.config), **parse_overrides(ns.overrides)}:
        # The library default is the static run's folder: a comparison gets its own, as `kedro run` gives it.
        params["train"]["output_dir"] = str(Path.cwd() / "data" / "06_models" / "compare")
    plan_cells(params)
    runtime = dict(params)
    if ns.mlflow_uri:
        runtime["mlflow_uri"] = ns.mlflow_uri
    run_kedro(project, "compare", runtime)
    return 0


def run_kedro(project: Path, pipeline: str, runtime_params: dict[str, Any]) -> dict[str, Any] | None:
    import json

    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    logging_yml = project / "conf" / "logging.yml"
    if logging_yml.is_file():  # Kedro looks for it relative to the working directory; a CLI run may start anywhere
        import yaml
        from kedro.framework.project import LOGGING

        LOGGING.configure(yaml.safe_load(logging_yml.read_text()))
    with KedroSession.create(project_path=project, runtime_params=runtime_params) as session:
        session.run(pipeline_names=[pipeline])
    _end_mlflow_runs()
    summary = Path(runtime_params["train"]["output_dir"]) / "run_summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def _end_mlflow_runs() -> None:
    # kedro-mlflow leaves its run on mlflow's stack (it re-enters it per node); close it for in-process callers.
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


def cmd_version(ns: argparse.Namespace) -> int:
    import kedro
    import torch
    import transformers

    print(
        f"dataflex {__version__} (kedro {kedro.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__})"
    )
    return 0


def cmd_make_demo_data(ns: argparse.Namespace) -> int:
    from dataflex.data import make_demo_data

    out = make_demo_data(
        ns.output,
        seed=ns.seed,
        train_per_domain=ns.train_per_domain,
        noise_domain=ns.noise_domain,
        noise_rate=ns.noise_rate,
    )
    print(f"demo corpus written to {out}")
    return 0


def cmd_make_tiny_model(ns: argparse.Namespace) -> int:
    from dataflex.data import make_demo_data
    from dataflex.train.tiny_model import make_tiny_model

    data = Path(ns.data)
    if not (data / "dataset_info.json").is_file():
        make_demo_data(data, seed=ns.seed)
    out = make_tiny_model(ns.output, data, size=ns.size, arch=ns.arch, seed=ns.seed, pretrain_steps=ns.steps)
    print(f"tiny model written to {out}")
    return 0


# LLaMA-Factory's merge YAML (`llamafactory-cli export`): what each key means here.
EXPORT_KEYS = {"model_name_or_path", "adapter_name_or_path", "export_dir", "export_size", "export_device", "template"}
EXPORT_NOTICE_KEYS = {"trust_remote_code", "export_legacy_format", "finetuning_type", "infer_dtype"}


def export_args(config: str) -> dict[str, Any]:
    """(adapter, output, base, max_shard_size) from a LLaMA-Factory merge YAML; relative paths against the working
    directory, then the YAML's folder."""
    import yaml

    from dataflex.utils.io import read_user_text
    from dataflex.utils.logging import logger

    try:
        cfg = yaml.safe_load(read_user_text(config, "export config", ConfigError)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"export config {config} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"export config {config} must be a mapping of LLaMA-Factory export keys")
    unknown = sorted(set(cfg) - EXPORT_KEYS - EXPORT_NOTICE_KEYS)
    if unknown:
        valid = ", ".join(sorted(EXPORT_KEYS | EXPORT_NOTICE_KEYS))
        raise ConfigError(f"export config {config}: unknown key(s) {', '.join(unknown)}; valid: {valid}")
    for key in ("adapter_name_or_path", "export_dir"):
        if not cfg.get(key):
            raise ConfigError(f"export config {config} needs {key}")
    if cfg.get("export_legacy_format"):
        raise ConfigError(
            "export_legacy_format: true writes pickled .bin weights; this project writes safetensors only"
        )
    if str(cfg.get("export_device", "cpu")) not in ("cpu", "auto"):
        raise ConfigError(f"export_device must be cpu or auto, got {cfg['export_device']!r}")
    size = cfg.get("export_size", 5)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"export_size must be an integer >= 1 (GB per shard), got {size!r}")
    ignored = sorted(k for k in EXPORT_NOTICE_KEYS & set(cfg) if k != "export_legacy_format")
    if ignored:  # the merge runs in fp32 on CPU and copies the tokenizer as saved: these change nothing
        logger.info("export: %s change nothing here (fp32 merge on CPU)", ", ".join(ignored))
    places = [Path.cwd(), Path(config).resolve().parent]

    def find(value: str) -> str:
        hits = [p / value for p in places if (p / value).exists()]
        return str(hits[0].resolve()) if hits and not Path(value).is_absolute() else value

    base = cfg.get("model_name_or_path")
    return {
        "adapter": find(str(cfg["adapter_name_or_path"])),
        "output": str((Path.cwd() / str(cfg["export_dir"])).resolve()),
        "base": find(str(base)) if base else None,
        "max_shard_size": f"{size}GB",
        "template": str(cfg["template"]) if cfg.get("template") else None,  # LF writes its chat template too
    }


def cmd_export(ns: argparse.Namespace) -> int:
    from dataflex.models import merge_and_export

    if ns.config:
        args = export_args(ns.config)
    elif ns.adapter and ns.output:
        args = {"adapter": ns.adapter, "output": ns.output, "base": ns.base, "max_shard_size": "5GB", "template": None}
    else:
        raise ConfigError("export needs a LLaMA-Factory merge YAML, or --adapter and --output")
    template = ns.template or args["template"]
    if template is not None:
        from dataflex.data.templates import get_template

        get_template(template)  # an unknown name is one line before the merge
    out = merge_and_export(
        args["adapter"],
        args["output"],
        base_model=args["base"],
        max_shard_size=args["max_shard_size"],
        template=template,
    )
    print(f"merged model written to {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dataflex-cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train from a DataFlex / LLaMA-Factory YAML")
    p.add_argument("config", help="YAML config (flat DataFlex keys)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--project-dir", default=None, help="Kedro project to run in (default: found from the CWD)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument(
        "--pipeline",
        default=None,
        choices=["doremi", "less", "static_select"],
        help="run this pipeline instead of the train_type's (doremi: reference -> proxy -> final; less: warm-up "
        "-> gradient datastore -> select for less_targets -> train on the selection; static_select: one selection "
        "by static_select_selector for static_select_targets, then training on it)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="equal-budget comparison of arms x seeds with a leaderboard")
    p.add_argument("config", help="YAML config: flat DataFlex keys (the base) and compare_arms, compare_seeds, ...")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--project-dir", default=None, help="Kedro project to run in (default: found from the CWD)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("make-demo-data", help="write the seeded multi-domain demo corpus")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-domain", type=int, default=300)
    p.add_argument("--noise-domain", default=None, help="inject label noise into this domain's train split")
    p.add_argument("--noise-rate", type=float, default=0.0)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("make-tiny-model", help="build and pre-train the tiny Llama (or MoE) on the demo corpus")
    p.add_argument("--output", required=True)
    p.add_argument("--data", default="data/01_raw/demo", help="demo corpus (built there if missing)")
    p.add_argument("--size", default="default", choices=["default", "test"])
    p.add_argument(
        "--arch", default="llama", choices=["llama", "moe"], help="llama, or moe: Mixtral-style, top-2 of 8 experts"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="pre-training steps")
    p.set_defaults(func=cmd_make_tiny_model)

    from dataflex.offline_select import add_parser as add_offline_select

    add_offline_select(sub)  # DataFlex's offline NEAR / TSDS tools: the .npy files indices_path / probs_path read

    p = sub.add_parser("export", help="merge a LoRA adapter into its base model")
    p.add_argument("config", nargs="?", help="LLaMA-Factory merge YAML (adapter_name_or_path, export_dir, ...)")
    p.add_argument("--adapter", default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument(
        "--template",
        default=None,
        help="chat template to write (default: the one the run saved next to its adapter, its training template)",
    )
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    # key=value overrides may come before or after options (`train X.yaml --pipeline less key=value`); argparse's
    # parse_intermixed_args cannot take subcommands, so the overrides after an option are collected here.
    quiet_known_warnings()
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        if ns.command not in ("train", "compare") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.overrides = [*ns.overrides, *extra]
    try:
        return ns.func(ns)
    except DataFlexError as exc:
        print(f"dataflex-cli: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # the Kedro hook's validation line
        if isinstance(exc.code, str):
            print(f"dataflex-cli: {exc.code}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
