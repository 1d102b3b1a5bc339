"""Run a function in N gloo processes on the CPU (for distributed tests).

The processes come from a forkserver that imported torch, open_clip and amorlip once (per pytest worker), so a
test's processes start in well under a second instead of paying those imports each (spawn); the function and
its arguments are pickled as with spawn, so a module-level function is still required."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "open_clip", "amorlip", "amorlip.objectives", "dist_utils"]
"""What the forkserver imports before it forks a test's processes."""
mp.set_forkserver_preload(PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(result_dir, f"{rank}.pt"))
    except Exception:
        with open(os.path.join(result_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return each rank's result.

    `fn` must be a module-level function (it is pickled). Results are passed back with torch.save.
    """
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, d), nprocs=world_size,
                           join=True, start_method="forkserver")
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world_size)]
