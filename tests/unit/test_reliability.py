"""Run isolation and safety: one run per output_dir, stale temp files of killed writes, the base model of a
resumed checkpoint, an output_dir that cannot be written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.train.trainer.state import check_base
from dataflex.utils.io import remove_stale_temp
from dataflex.utils.lock import RunLock


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    probe = (
        "import sys\n"
        "from dataflex.utils.lock import RunLock\n"
        "from dataflex.core.errors import ConfigError\n"
        "try:\n"
        f"    RunLock({str(out)!r}).acquire()\n"
        "except ConfigError as exc:\n"
        "    print(exc); sys.exit(2)\n"
    )
    with RunLock(out):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert done.returncode == 2
        line = done.stdout.strip()
        assert "\n" not in line and f"output_dir {out.resolve()} is in use by another run (pid " in line
        assert not out.exists()  # the lock writes nothing into the output_dir
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0  # released (and a killed holder releases it too: the kernel drops flocks)


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".checkpoint-3.x1y2.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".checkpoint-3.x1y2.tmp" / "trainable.safetensors").write_bytes(b"half")
    (tmp_path / ".train_result.json.ab12.tmp").write_text("{")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir()
    assert remove_stale_temp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint-2", "checkpoints"]
    assert remove_stale_temp(tmp_path / "missing") == 0


def test_a_checkpoint_of_another_base_model_is_refused_unless_allowed():
    manifest = {"model_fingerprint": "aaaa" * 16}
    check_base(manifest, "aaaa" * 16, "ckpt")
    with pytest.raises(CheckpointError, match="trained on another base model .*allow_different_base: true"):
        check_base(manifest, "bbbb" * 16, "ckpt")
    check_base(manifest, "bbbb" * 16, "ckpt", allow=True)
    check_base({}, "bbbb" * 16, "ckpt")  # checkpoints of older versions carry no fingerprint


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    from dataflex.config.validate import check_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot be created"):
        check_output_dir(str(tmp_path / "file" / "sub"))
    check_output_dir(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()
