"""Scale-out without launching: how a step and rows are shared between processes, how a worker's failure is
reported, and launch configs checked before any work.
(The 2-process runs are in tests/integration/test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

from dataflex.distributed import gather_varlen, rank_block
from dataflex.distributed.launch import failure_reason
from dataflex.train.trainer.plan import shard_step


def test_shares_of_a_step_and_of_rows_are_contiguous_and_complete():
    class Acc:
        def __init__(self, p, r):
            self.num_processes, self.process_index = p, r

    step = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [shard_step(step, 4, 2, r) for r in (0, 1)] == [step[:2], step[2:]]  # full step: A micro-batches each
    assert [shard_step([[7]], 4, 2, r) for r in (0, 1)] == [[[7]], []]  # a short last step may leave one empty
    assert shard_step(step, 4, 1, 0) is step
    for n in (0, 1, 5, 10):
        blocks = [rank_block(n, Acc(3, r)) for r in range(3)]
        assert [i for b in blocks for i in b] == list(range(n)) and max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert torch.equal(gather_varlen(None, torch.ones(2)), torch.ones(2))


def test_failure_reason_names_the_exception_or_the_signal():
    lines = ["noise", "[rank1]: Traceback (most recent call last):", "[rank1]: ValueError: bad thing", "exit 1"]
    assert failure_reason(lines) == "rank 1: ValueError: bad thing"
    assert failure_reason(["traceback : Signal 9 (SIGKILL) received by PID 12"]) == "a worker was killed by SIGKILL"
    knock_on = "[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
    assert failure_reason([knock_on, "Signal 9 (SIGKILL) received by PID 3"]) == "a worker was killed by SIGKILL"
    assert failure_reason([knock_on, lines[2]]) == "rank 1: ValueError: bad thing"


def test_launch_configs_are_checked_before_any_work(tmp_path):
    from dataflex.core.errors import ConfigError
    from dataflex.distributed.launch import check_launch_config, launch_command

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    ds = tmp_path / "ds_z2.json"
    ds.write_text("{}")
    with pytest.raises(ConfigError, match="distributed_type FSDP is not used: set train.fsdp"):
        check_launch_config({"num_processes": 2, "accelerate_config": str(fsdp)})
    check_launch_config({"num_processes": 2, "deepspeed": str(ds)})  # ZeRO-0 (no stage): plain DDP
    ds.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        check_launch_config({"num_processes": 2, "deepspeed": str(ds)})
    with pytest.raises(ConfigError, match="has num_processes 4 but train.num_processes is 2"):
        check_launch_config({"num_processes": 2, "accelerate_config": str(ddp)})
    with pytest.raises(ConfigError, match="does not exist"):
        check_launch_config({"num_processes": 2, "accelerate_config": str(tmp_path / "nope.yaml")})
    check_launch_config({"num_processes": 4, "accelerate_config": str(ddp)})
    cmd = launch_command(4, tmp_path / "task.json", accelerate_config=str(ddp))
    assert cmd[cmd.index("--config_file") + 1] == str(ddp) and "--multi_gpu" not in cmd
    assert cmd[-3:] == ["-m", "dataflex.distributed.worker", str(tmp_path / "task.json")]
