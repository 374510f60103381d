"""Scale-out: Kedro stays one process; nodes that train or extract features start `accelerate launch` workers
when `num_processes` > 1. See `launch.py` (the orchestrating side) and `worker.py` (each rank)."""

from dataflex.distributed.collectives import (
    barrier,
    broadcast_object,
    current_accelerator,
    gather_varlen,
    is_main,
    rank_block,
)
from dataflex.distributed.launch import WorkerError, distributed, in_worker, launch

__all__ = [
    "WorkerError",
    "barrier",
    "broadcast_object",
    "current_accelerator",
    "distributed",
    "gather_varlen",
    "in_worker",
    "is_main",
    "launch",
    "rank_block",
]
