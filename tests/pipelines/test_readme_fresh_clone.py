"""The README from a fresh clone, as a newcomer follows it (issue 20): `git clone` of the repository these tests run
from (its committed HEAD: uncommitted work is not in a clone), then the README's commands in the clone, in order:

- `make demo` (its setup already done: the clone's `.venv` has the packages of the venv running these tests),
- every `<!-- runnable -->` block, and every `<!-- runnable after the demo -->` block,
- `notebooks/less_datastore.ipynb` executed with nbconvert from `notebooks/`, failing on any cell's error,

and every output path the README names (outside its not-runnable blocks) must exist afterwards. The demo's assets
are put in place first at test size (the test model of conftest, a small corpus), so the commands run as written
but in seconds; the clone's own `src/` is the code that runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKERS = ("<!-- runnable -->", "<!-- runnable after the demo -->")
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")
# A path the README says a command writes: data/..., mlflow.db, mlruns/ (placeholders like <pipeline> skipped).
PATH = re.compile(r"(?<![\w/.-])(data/[\w./-]+|mlflow\.db|mlruns/)")


def readme_blocks(text: str) -> tuple[list[str], str]:
    """(the runnable blocks' scripts in order, the README without its not-runnable fenced blocks)."""
    lines = text.splitlines()
    scripts: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            kept.append(lines[i])
            i += 1
            continue
        end = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == "```")
        runnable = i > 0 and lines[i - 1].strip() in MARKERS
        if runnable:
            scripts.append("\n".join(lines[i + 1 : end]))
            kept.extend(lines[i : end + 1])
        i = end + 1
    return scripts, "\n".join(kept)


def named_paths(text: str) -> list[str]:
    """Output paths the README names in backticks or in a runnable command's comment."""
    found: list[str] = []
    for chunk in re.findall(r"`([^`\n]+)`", text) + re.findall(r"#([^\n]*)", text):
        for path in PATH.findall(chunk):
            if "<" not in path and path not in found:
                found.append(path.rstrip(".,:;"))
    return found


def _clone_venv(clone: Path) -> None:
    """The clone's `.venv`, as `make`'s setup would leave it, in a second: the packages of this test run's venv (a .pth
    line), but `dataflex` imported from the clone's `src/` (the venv's editable install would import the checkout
    these tests run from), and the console scripts (`kedro`, `dataflex-cli`, `jupyter`, ...) on the clone's python."""
    import sysconfig

    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_paths()["purelib"])
    (venv / site.relative_to(sys.prefix) / "_dataflex_clone.pth").write_text(f"{clone / 'src'}\n{site}\n")
    for script in (Path(sys.prefix) / "bin").iterdir():
        target = venv / "bin" / script.name
        if target.exists() or not script.is_file():
            continue
        try:
            first, _, rest = script.read_text().partition("\n")
        except UnicodeDecodeError:  # a binary
            continue
        if first.startswith("#!") and "python" in first:
            target.write_text(f"#!{venv / 'bin' / 'python'}\n{rest}")
            target.chmod(0o755)
    (venv / ".dataflex-installed").touch()  # make's setup stamp: newer than the clone's pyproject.toml


def _env(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MPLBACKEND", "PYTHONPATH")}
    env.update(
        PATH=os.pathsep.join([str(clone / ".venv" / "bin"), env.get("PATH", "")]),
        KEDRO_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode} in {cwd}:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, str]:
    """A clone after the README's commands: (its folder, everything they printed)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the project to clone")
    if shutil.which("make") is None:
        pytest.skip("needs make (the README's `make demo`)")
    from dataflex.data import make_demo_data

    clone = tmp_path_factory.mktemp("fresh") / "dataflex"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    _clone_venv(clone)
    # The demo's assets at test size, where `make demo` would build them (so the commands below run as written).
    make_demo_data(
        clone / "data" / "01_raw" / "demo", seed=0, train_per_domain=100, dev_per_domain=8, test_per_domain=16
    )
    shutil.copytree(tiny_model_dir, clone / "data" / "01_raw" / "tiny_llama")

    env = _env(clone)
    where = _run(
        [str(clone / ".venv" / "bin" / "python"), "-c", "import dataflex; print(dataflex.__file__)"], clone, env
    )
    assert where.strip() == str(clone / "src" / "dataflex" / "__init__.py")
    printed = _run(["make", "demo"], clone, env)
    scripts, _ = readme_blocks((clone / "README.md").read_text())
    assert len(scripts) >= 2, "the README has no runnable blocks"
    for script in scripts:
        printed += _run(["bash", "-euo", "pipefail", "-c", script], clone, env)
    (clone.parent / "readme-commands.log").write_text(printed)  # what a newcomer saw, for a failing assertion
    return clone, printed


def test_the_readme_commands_run_and_leave_every_output_they_name(fresh_clone):
    clone, printed = fresh_clone
    _, runnable_text = readme_blocks((clone / "README.md").read_text())
    paths = named_paths(runnable_text)
    assert "data/06_models/static/" in paths and "data/06_models/less/" in paths and "mlflow.db" in paths
    missing = [p for p in paths if not (clone / p).exists()]
    assert not missing, f"the README names outputs the commands did not create: {missing}"

    # Every run ended with its summary; each mode wrote its own folder (the demo's model is still the demo's).
    for mode in ("static", "less", "dynamic_weight"):
        assert f"dataflex: {mode} run finished" in printed
        assert f"outputs:  data/06_models/{mode}/" in printed
    assert (clone / "data" / "06_models" / "static" / "adapter" / "adapter_model.safetensors").is_file()
    import json

    assert json.loads((clone / "data/06_models/static/run_summary.json").read_text())["train_type"] == "static"
    assert json.loads((clone / "data/06_models/less/run_summary.json").read_text())["train_type"] == "less"
    # The known third-party deprecation noise is gone from the runs' output.
    noise = [line for line in printed.splitlines() if "register_new_resolver" in line or "is_gradient_check" in line]
    assert not noise, noise


def test_the_notebook_runs_from_the_notebooks_folder(fresh_clone, tmp_path):
    """What `jupyter lab notebooks/...` then running every cell does, without a browser; the histogram shows."""
    import importlib.util

    for module in ("nbconvert", "ipykernel"):
        if importlib.util.find_spec(module) is None or not (Path(sys.prefix) / "bin" / "jupyter").exists():
            pytest.skip(f"Jupyter is not installed ({module}): pip install -e '.[notebook]' (make's setup does)")
    clone, _ = fresh_clone
    notebooks = clone / "notebooks"
    cmd = ["jupyter", "nbconvert", "--to", "notebook", "--execute", "--output-dir", str(tmp_path)]
    _run([*cmd, "--ExecutePreprocessor.timeout=300", "less_datastore.ipynb"], notebooks, _env(clone))
    import json

    executed = json.loads((tmp_path / "less_datastore.ipynb").read_text())
    outputs = [o for cell in executed["cells"] for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the score histogram was not shown inline"
