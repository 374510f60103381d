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
    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir).resolve()
        key = hashlib.sha256(str(self.output_dir).encode()).hexdigest()[:20]
        self.path = Path(tempfile.gettempdir()) / "dataflex-locks" / f"{key}.lock"
        self._fh: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
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
