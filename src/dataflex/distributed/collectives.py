"""Collectives over the processes of one accelerate launch (no-ops for one process).

Process shares may differ in size (a short last step, the last rows of a feature shard), which plain
`accelerator.gather` does not allow: `gather_varlen` pads, gathers and trims by the gathered counts.
Decisions (cache hit or miss, a selection) are made once on the main process and broadcast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def gather_varlen(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of every process's `tensor` in rank order (row counts may differ).
    `accelerator`: an Accelerator or accelerate's PartialState (anything with num_processes and device)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    from accelerate.utils import gather, pad_across_processes

    device = accelerator.device
    counts = gather(torch.tensor([tensor.shape[0]], device=device)).tolist()
    gathered = gather(pad_across_processes(tensor.to(device).contiguous(), dim=0))
    width = max(counts)
    parts = [gathered[r * width : r * width + n] for r, n in enumerate(counts)]
    return torch.cat(parts).to(tensor.device)


def broadcast_object(accelerator: Any, obj: Any) -> Any:
    """The main process's `obj` on every process (JSON-like values: decisions, paths, statuses)."""
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def current_accelerator() -> Any:
    """The accelerate state of this process when it is one of several launched workers, else None (without
    touching accelerate's process-wide state)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate.state import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank_block(n: int, accelerator: Any) -> range:
    """This process's contiguous share of rows 0..n-1 (near-equal, rank order): concatenating the shares of
    all processes (gather_varlen) gives the rows back in order, each exactly once, with no padding rows."""
    if accelerator is None or accelerator.num_processes == 1:
        return range(n)
    p, r = accelerator.num_processes, accelerator.process_index
    base, extra = divmod(n, p)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def cached_for_all(path: str | os.PathLike) -> bool:
    """Is the cache file there? Decided by the main process and the same on every process (a launched
    worker must not skip work its peers do); a plain `is_file()` in one process."""
    acc = current_accelerator()
    return bool(broadcast_object(acc, Path(path).is_file() if is_main(acc) else None))


@contextlib.contextmanager
def main_process_writes() -> Iterator[bool]:
    """`with main_process_writes() as writer: if writer: write(...)`: shared artefacts are written once, by the
    main process, and nobody reads them before it is done."""
    acc = current_accelerator()
    yield is_main(acc)
    barrier(acc)
