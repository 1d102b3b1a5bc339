"""Set-up of a training run: everything `amorlip.train.train` does before its first step, building the `Run`.

The order is part of the contract: the RNG draws (seed, data, evaluation sets, model, objective) happen in the same
sequence in every run, so a resumed run continues bit-exactly. `set_up` is the sequence; each step below it is one
function.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from amorlip import checkpoint as ckpt
from amorlip import distributed, objectives, outlog, reclip
from amorlip.batching import split_batch
from amorlip.config import Config, ConfigError, describe
from amorlip.data.types import TrainStream
from amorlip.metrics_log import MetricsLogger
from amorlip.model_options import aug_cfg
from amorlip.models import build_model, model_config, param_groups
from amorlip.objectives.base import Objective, ObjectiveContext
from amorlip.progress import Progress
from amorlip.runlock import RUN_IN_USE_FIX, FolderInUse, FolderLock
from amorlip.step import has_batch_norm
from amorlip.train_eval import build_eval_sets
from amorlip.train_state import Run, find_resume_path, resume


def set_up(cfg: Config, stream: TrainStream | None, held: contextlib.ExitStack) -> Run:
    """Collective: every rank calls this together (process group, run-folder lock, objective, DDP). The run
    folder's lock (released by `held`), checks, data, model, objective, RECLIP phases, optimizer, resume, logger
    and progress line; `stream` (None: built from cfg.data) is this rank's training data."""
    dist_info = _init_process(cfg)
    held.callback(_lock_run_dir(cfg.run_dir, dist_info).release)
    split_batch(cfg.train.batch_size, dist_info.world_size, cfg.train.accum_steps)
    seed_everything(cfg.train.seed)

    objective_cls = objectives.get(cfg.objective)
    # Data first: a missing path or empty shard list fails before any model is built.
    if stream is None:
        stream = _build_stream(cfg, dist_info, objective_cls.needs_indices)
    if stream.steps_per_epoch < 1:
        raise ConfigError(
            f"the dataset has {stream.dataset_size} samples, fewer than one batch of {cfg.train.batch_size}; "
            "lower --train.batch-size or add data"
        )
    run = _build_run(cfg, dist_info, stream, objective_cls)
    resume(run)
    _start(run)
    return run


def _build_run(cfg: Config, dist_info: distributed.DistInfo, stream: TrainStream,
               objective_cls: type[Objective]) -> Run:
    """Collective: every rank calls this together (`_build_objective`). The evaluation sets, the model (initial
    weights only for a fresh run), the objective, the RECLIP phases, the optimizer and the scaler, in that order."""
    steps_per_epoch = stream.steps_per_epoch
    total_steps = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * steps_per_epoch
    eval_sets, diagnostic_sets = _evaluation_data(cfg, dist_info, stream)

    # initial weights (model.pretrained) only for a new run: a resumed one takes them from its checkpoint
    resume_path = find_resume_path(cfg, cfg.run_dir, dist_info.is_main)
    model, train_transform, eval_transform, tokenizer = build_model(
        cfg.model, device=dist_info.device, load_pretrained_weights=resume_path is None, output_dict=True,
        aug=cfg.sections.get("aug"), **objective_cls.model_overrides
    )
    objective = _build_objective(cfg, objective_cls, dist_info, stream, total_steps)
    # RECLIP phases (docs/reclip.md): small images / short captions first, the model's native size last.
    resolution = reclip.ResolutionRun(cfg.sections.get("resolution"), model, total_steps,
                                      train_transform, eval_transform, tokenizer,
                                      aug_cfg=aug_cfg(cfg.sections.get("aug")))
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_temperature)
    optimizer = build_optimizer(groups, cfg, dist_info.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dist_info.device.type == "cuda" and cfg.model.precision == "fp16")
    return Run(cfg=cfg, dist=dist_info, run_dir=cfg.run_dir, resume_path=resume_path, stream=stream,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_sets=eval_sets,
               diagnostic_sets=diagnostic_sets, model=model,
               tokenizer=tokenizer, eval_transform=eval_transform, objective=objective, resolution=resolution,
               optimizer=optimizer, scaler=scaler)


def _evaluation_data(cfg: Config, dist_info: distributed.DistInfo,
                     stream: TrainStream) -> tuple[tuple[list, Any], Any]:
    """Main rank: the held-out sets (the user's val_path / imagenet_root are read and checked here) and the pairs
    of eval.normalizers; ([], None) and None elsewhere."""
    eval_sets = build_eval_sets(cfg) if dist_info.is_main and (cfg.eval.zeroshot or cfg.eval.retrieval) else ([], None)
    diagnostic_sets = None
    if dist_info.is_main and cfg.eval.normalizers:  # consumes no RNG
        from amorlip.evaluate.normalizers import build_diagnostic_sets

        diagnostic_sets = build_diagnostic_sets(cfg, stream)
    return eval_sets, diagnostic_sets


def _start(run: Run) -> None:
    """Collective: every rank calls this together (`wrap`). The resumed step's RECLIP phase, the compiled /
    DDP-wrapped model, the logger, the run folder and the progress line."""
    cfg, model, resolution = run.cfg, run.model, run.resolution
    if cfg.train.accum_steps > 1 and run.is_main and has_batch_norm(model):
        print(f"note: {cfg.model.name} normalises with batch statistics (BatchNorm): with train.accum_steps "
              f"{cfg.train.accum_steps} they are micro-batch statistics, so the step is not exactly the full batch's")
    resolution.enter(run.step, model, run.optimizer)
    run.train_model = wrap(model, cfg, run.dist)
    if run.is_main and resolution.enabled:
        print(f"step {run.step}: {resolution.describe()}")

    run.logger = MetricsLogger(run.run_dir, run.is_main, cfg.train.tensorboard, fresh=run.resume_path is None,
                               wandb=cfg if cfg.train.wandb else None, device_type=run.device.type)
    if run.is_main:
        _prepare_run_dir(run)
    run.last_save_time = time.monotonic()
    run.progress = (Progress(run.total_steps, run.step, cfg.objective, bar=None if cfg.train.progress else False)
                    if run.is_main else None)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the start of the run's RNG draws)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(groups: list[dict[str, Any]], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameter groups; fused (one kernel per parameter) unless optim.fused is false or the
    device has no fused AdamW."""
    fused = cfg.optim.fused
    if fused is None:
        fused = device.type in ("cpu", "cuda") and all(
            p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                             **({"fused": True} if fused else {}))


def _init_process(cfg: Config) -> distributed.DistInfo:
    """Collective: every rank calls this together (`init_distributed` joins the process group). The process
    group (under torchrun), the device and its math settings."""
    dist_info = distributed.init_distributed(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if dist_info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    return dist_info


def _lock_run_dir(run_dir: Path, dist_info: distributed.DistInfo) -> FolderLock:
    """Collective: every rank calls this together (`gather_objects`). The main rank locks the run folder
    (amorlip.runlock) before any work; when another process holds it, every rank stops: the main rank with the
    error naming that process, the others quietly (exit 2)."""
    lock = FolderLock(run_dir, "run folder", RUN_IN_USE_FIX)
    error = None
    if dist_info.is_main:
        try:
            lock.acquire()
        except FolderInUse as e:
            error = str(e)
    error = distributed.gather_objects(error)[0]
    if error is not None:
        if dist_info.is_main:
            raise FolderInUse(error)
        raise SystemExit(2)
    return lock


def _build_stream(cfg: Config, dist_info: distributed.DistInfo, needs_indices: bool) -> TrainStream:
    """This rank's share of the training data (cfg.data)."""
    from amorlip.data.loader import build_train_stream

    return build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed, dist_info.rank, dist_info.world_size,
                              pin_memory=dist_info.device.type == "cuda", needs_indices=needs_indices)


def _build_objective(cfg: Config, objective_cls: type[Objective], dist_info: distributed.DistInfo,
                     stream: TrainStream, total_steps: int) -> Objective:
    """Collective: every rank calls this together (AmorLIP broadcasts its initial networks). The objective with
    its section of the config and what it needs to know about the run (ObjectiveContext)."""
    ctx = ObjectiveContext(
        dataset_size=stream.dataset_size,
        steps_per_epoch=stream.steps_per_epoch,
        total_steps=total_steps,
        total_epochs=math.ceil(total_steps / stream.steps_per_epoch),
        embed_dim=int(model_config(cfg.model.name)["embed_dim"]),
        local_batch_size=cfg.train.batch_size // dist_info.world_size,
        world_size=dist_info.world_size,
        rank=dist_info.rank,
        device=dist_info.device,
    )
    section = cfg.sections.get(objective_cls.section) if objective_cls.section else None
    return objective_cls(section, ctx).to(dist_info.device)


def wrap(model: torch.nn.Module, cfg: Config, dist_info: distributed.DistInfo) -> torch.nn.Module:
    """Collective: every rank calls this together under DDP (its construction broadcasts the weights).
    torch.compile / DDP around the model (again after a phase change resizes parameters)."""
    if cfg.model.compile:
        model = torch.compile(model)
    if dist_info.distributed:
        model = DDP(model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)
    return model


def _prepare_run_dir(run: Run) -> None:
    """Main rank: the run folder, its config.yaml, and (on resume) metrics.jsonl cut back to the checkpoint."""
    print(f"run folder: {run.run_dir}", flush=True)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    outlog.attach(run.run_dir / "out.log")
    for tmp in ckpt.remove_stale_temporaries(ckpt.checkpoint_dir(run.run_dir)):
        print(f"removed {tmp.name}, left by an interrupted checkpoint write")
    ckpt.atomic_write_text(describe(run.cfg), run.run_dir / "config.yaml")
    if run.resume_path is not None:
        run.logger.truncate_after(run.step, drop_eval_at_step=run.step >= run.total_steps)
        print(f"resumed from {run.resume_path} at step {run.step}")
