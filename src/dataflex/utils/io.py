"""Atomic writes: nothing is ever half-written (temp file / temp dir + rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process umask (there is no getter that leaves it untouched)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the mode an ordinary open() would
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    # numpy / torch scalars and paths show up in metrics and configs.
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes an ordinary mkdir / open() would (0755 / 0644 under umask 022):
    mkdtemp makes 0700 and safetensors' writer 0600, which would keep teammates on a shared filesystem out."""
    root = Path(root)
    paths = [root, *root.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        wanted = 0o777 & ~_UMASK if p.is_dir() else (0o666 | (mode & 0o111)) & ~_UMASK
        if mode & 0o777 != wanted:
            os.chmod(p, wanted)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir next to `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        apply_umask(tmp)
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`, replacing a previous `path` whole (it is gone at once)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}.tmp")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def remove_stale_temp(root: str | os.PathLike) -> int:
    """Remove the temporary files and folders (`.<name>.*.tmp`) that interrupted atomic writes left under `root`;
    only call it while holding the run's lock on `root` (another run's writes in progress look the same)."""
    count = 0
    root = Path(root)
    if not root.is_dir():
        return 0
    for tmp in sorted(root.rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        count += 1
    return count


def read_user_text(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of a file the user gave; a folder, a symlink loop, an unreadable file or invalid UTF-8 is
    one `error` line naming `what`, the file and (for encoding) the byte offset."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:  # ELOOP (a symlink loop), EACCES, ...
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not valid UTF-8 (byte {exc.start}: {exc.reason}); save it as UTF-8") from None


def link_into(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put folder `source` at `target` atomically (temp dir + rename): hard links, so no second copy on disk, and
    a copy across filesystems. Nothing to do when `source` already is `target`."""
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        return target

    def link_tree(src: Path, dst: Path) -> None:
        for item in src.iterdir():
            if item.is_dir():
                (dst / item.name).mkdir()
                link_tree(item, dst / item.name)
                continue
            try:
                os.link(item, dst / item.name)
            except OSError:  # another filesystem (or no hard links): copy
                shutil.copy2(item, dst / item.name)

    with atomic_dir(target) as tmp:
        link_tree(source, tmp)
    return target
