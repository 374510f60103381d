"""The documented commands stay true: every fenced shell block marked `<!-- runnable -->` in README.md and
docs/**/*.md runs with exit code 0 (bash, from the repository root, with .venv/bin first on PATH).

Only quick blocks that need no trained model are marked; each block runs in a fresh temporary directory
as TMPDIR, so `mktemp -d` inside a block cleans up with the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- runnable -->"
SHELLS = {"bash", "sh", "shell"}
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def parse_blocks(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """(line of the marker, script) for every marked block in `path`, and the problems found."""
    rel = path.relative_to(ROOT)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, str]] = []
    problems: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        opening = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if opening is None or opening.group(1) not in SHELLS:
            problems.append(f"{rel}:{i + 1}: {MARK} must be followed by a ```bash block")
            continue
        end = next((k for k in range(i + 2, len(lines)) if lines[k].strip() == "```"), None)
        if end is None:
            problems.append(f"{rel}:{i + 1}: the marked block is not closed")
            continue
        script = "\n".join(lines[i + 2 : end]).strip()
        if not script:
            problems.append(f"{rel}:{i + 1}: the marked block is empty")
            continue
        blocks.append((i + 1, script))
    return blocks, problems


def all_blocks() -> list:
    params = []
    for path in doc_files():
        for line, script in parse_blocks(path)[0]:
            rel = path.relative_to(ROOT)
            params.append(pytest.param(script, id=f"{rel}:{line}"))
    return params


BLOCKS = all_blocks()


def test_markers_are_well_formed():
    problems = [p for path in doc_files() for p in parse_blocks(path)[1]]
    assert not problems, "\n".join(problems)
    assert BLOCKS, "no runnable blocks found in README.md or docs/"


@pytest.mark.parametrize("script", BLOCKS)
def test_runnable_block(script: str, tmp_path: Path):
    bin_dirs = [str(ROOT / ".venv" / "bin"), str(Path(sys.executable).parent)]
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([*bin_dirs, env.get("PATH", "")]),
        TMPDIR=str(tmp_path),
        KEDRO_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"exit code {result.returncode}\n--- script\n{script}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}"
    )
