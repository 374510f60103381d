"""`python -m dataflex.config.docs [--write | --check] [--out DIR]`: the generated configuration reference.

--write rewrites docs/config.md and docs/parameters.sample.yml from the schema; --check (the default) exits 1
when either is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataflex.config.reference import render_config_markdown, render_parameters_yaml

# src/dataflex/config/docs.py -> the repository's docs/ folder.
DOCS_DIR = Path(__file__).resolve().parents[3] / "docs"


def generated_files(out_dir: Path = DOCS_DIR) -> dict[Path, str]:
    """Each generated file and the text it should hold now."""
    return {
        out_dir / "config.md": render_config_markdown(),
        out_dir / "parameters.sample.yml": render_parameters_yaml(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataflex.config.docs", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated files")
    mode.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale (default)")
    parser.add_argument("--out", type=Path, default=DOCS_DIR, help=f"docs folder (default {DOCS_DIR})")
    ns = parser.parse_args(argv)
    stale = []
    for path, text in generated_files(ns.out).items():
        if ns.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        elif not path.is_file() or path.read_text() != text:
            stale.append(path)
    for path in stale:
        print(f"{path} is stale: run python -m dataflex.config.docs --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
