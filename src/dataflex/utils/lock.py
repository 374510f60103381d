"""`RunLock`: one run at a time per output_dir.

An exclusive `flock`, held for the whole run, on a lock file named by the output_dir's resolved path in the
system's temp folder (so a refused or failed run leaves nothing in its output_dir). The kernel drops the lock
when the process ends, however it ends, so a killed run never leaves a stale one; the file records the holder's
PID and command for the one-line refusal of a second run. (The temp folder is per machine: runs on several
machines sharing one filesystem need distinct output_dirs.)"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from dataflex.core.errors import ConfigError


class RunLock:
    """`wait=False` (a run's output_dir): a held lock is refused in one line. `wait=True` (a shared cache entry such
    as a datastore's): wait for the holder, then carry on with what it wrote."""

    def __init__(self, output_dir: str | os.PathLike, *, wait: bool = False) -> None:
        self.output_dir = Path(output_dir).resolve()
        key = hashlib.sha256(str(self.output_dir).encode()).hexdigest()[:20]
        self.path = Path(tempfile.gettempdir()) / "dataflex-locks" / f"{key}.lock"
        self.wait = wait
        self._fh: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            if self.wait:
                from dataflex.utils.logging import logger

                logger.info("waiting for %s to finish writing %s", holder, self.output_dir)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise ConfigError(
                    f"output_dir {self.output_dir} is in use by another run ({holder}); wait for it to finish "
                    "or choose another output_dir"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode(), 0)
        self._fh = fd
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            os.close(self._fh)
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


# A folder holding any of these holds a run (finished: the first two; interrupted: the checkpoints).
RUN_MARKS = ("run_summary.json", "train_result.json", "checkpoints")
PROJECT_MARKS = ("pyproject.toml", ".git", "conf")


def claim_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, resuming: bool) -> bool:
    """Make `output_dir` this run's: refused (one line) when it holds another run, unless this run resumes it or
    `overwrite` (then the old run is moved aside and removed). Returns whether an old run was removed."""
    import shutil

    out = Path(output_dir)
    marks = [m for m in RUN_MARKS if (out / m).exists()]
    if not marks or resuming:
        return False
    if not overwrite:
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(marks)}); set overwrite_output_dir: true to replace "
            "it, resume_from_checkpoint to continue it, or choose another output_dir"
        )
    if any((out / m).exists() for m in PROJECT_MARKS):
        raise ConfigError(f"refusing to clear output_dir {out}: it looks like a project folder; choose a subfolder")
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}.tmp")
    os.replace(out, aside)  # atomic: the old run is gone from output_dir at once, deleted after
    shutil.rmtree(aside, ignore_errors=True)
    return True
