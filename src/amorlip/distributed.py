"""torchrun initialisation and the collective helpers every objective uses.

All collectives an objective issues go through the helpers below, which count them
(`COLLECTIVES`), so tests and `amorlip bench` can verify communication claims such as
"AmorLIP gathers only on amortization steps".
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

COLLECTIVES: Counter = Counter()
"""Number of collective calls issued through this module, by kind (reset with `.clear()`)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks the local CUDA device when there is one, else the CPU."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda was asked for but no CUDA device is visible; use --train.device cpu")
        return torch.device("cuda", local_rank)
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Collective: every rank calls this together (the process group's rendezvous). Initialise the process
    group when launched by torchrun (env RANK/WORLD_SIZE), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    """Collective: every rank calls this together. Destroy the process group (nothing without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Collective: every rank calls this together (and its backward). Concatenate `x` from all ranks along
    dim 0, keeping the autograd graph.

    Backward sums the incoming gradients over ranks and returns each rank its own slice,
    so with DDP's gradient averaging the result equals the 1-process gradient of the
    concatenated batch (open_clip's `gather_with_grad`).
    """
    if world_size() == 1:
        return x
    COLLECTIVES["all_gather_grad"] += 1
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Collective: every rank calls this together. Concatenate detached `x` from all ranks along dim 0 (no
    gradient flows back)."""
    if world_size() == 1:
        return x.detach()
    COLLECTIVES["all_gather"] += 1
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """Collective: every rank calls this together. In-place mean over ranks (no-op in one process)."""
    if world_size() > 1:
        COLLECTIVES["all_reduce"] += 1
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(world_size())
    return x


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """Collective: every rank calls this together. In-place sum over ranks (no-op in one process)."""
    if world_size() > 1:
        COLLECTIVES["all_reduce"] += 1
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Collective: every rank calls this together. `x` in place becomes rank `src`'s (no-op in one process)."""
    if world_size() > 1:
        COLLECTIVES["broadcast"] += 1
        dist.broadcast(x, src=src)
    return x


def gather_objects(obj: Any) -> list[Any]:
    """Collective: every rank calls this together. Every process's `obj` (picklable), in rank order; `[obj]`
    with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """Collective: every rank calls this together. Element-wise OR of `flags` over all processes (one small
    all-reduce; none with one process), so that every process takes the same decision (save, stop) at the same
    step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: every rank calls this together (`any_ranks`). Whether `flag` is true on any process."""
    return any_ranks([flag], device)[0]


def barrier() -> None:
    """Collective: every rank calls this together. Wait until every rank has reached it."""
    if world_size() > 1:
        dist.barrier()


def trim_to_common_size(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Collective: every rank calls this together. Cut every rank's batch to the smallest local batch size over
    ranks (counted as `batch_sync`).

    Used for data sources that skip unreadable samples, so that feature gathers see equal shapes.
    """
    if world_size() == 1:
        return batch
    n = torch.tensor([batch["index"].shape[0]], device=device)
    COLLECTIVES["batch_sync"] += 1
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    keep = int(n.item())
    if keep == batch["index"].shape[0]:
        return batch
    return {k: v[:keep] for k, v in batch.items()}
