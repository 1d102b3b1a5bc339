"""How a global batch splits: evenly over the processes, then each process's share into `train.accum_steps`
micro-batches. One check for the config, the data streams, the trainer and the benchmarks; torch-free."""
from __future__ import annotations

from amorlip.errors import ConfigError


def split_batch(batch_size: int, world_size: int = 1, accum_steps: int = 1,
                error: type[ValueError] = ConfigError) -> int:
    """The per-process batch of the global `batch_size` over `world_size` processes. Raises `error` (a one-line
    message naming the fix) unless both are positive, `world_size` divides `batch_size` and `accum_steps` divides
    the per-process batch."""
    if world_size < 1 or batch_size < 1:
        raise error(f"batch_size ({batch_size}) and world_size ({world_size}) must be positive")
    if batch_size % world_size:
        raise error(f"global batch size {batch_size} is not divisible by the {world_size} processes; "
                    f"use a multiple of {world_size} for --train.batch-size")
    local = batch_size // world_size
    if local % accum_steps:
        where = (f"train.batch_size={batch_size}" if world_size == 1 else
                 f"the per-process batch of {local} (train.batch_size {batch_size} over {world_size} processes)")
        raise error(f"train.accum_steps={accum_steps} does not divide {where} (pass a divisor of the batch, per "
                    "process, as --train.accum-steps)")
    return local
