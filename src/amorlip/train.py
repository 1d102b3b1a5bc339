"""The training loop, readable top to bottom.

    config -> data stream -> open_clip model -> objective -> AdamW step -> log / checkpoint / evaluate

`train()` is three calls: `_set_up` builds the `Run` (checks, data, evaluation sets, model, objective, RECLIP
phases, optimizer, resume, logger), `_loop` steps it (`_train_step` is one optimizer step; logging, checkpoints
and evaluation follow each step), and `_finish` writes the final checkpoint, evaluation and summary. The `Run`
holds the state; its `state_dict()` is the checkpoint.

The loop knows nothing about any particular objective: it hands each batch's features, the
temperature, the samples' indices and the step/epoch to `objective(...)`, applies the shared
temperature scheme, and back-propagates. Runs unchanged under torchrun (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from amorlip import checkpoint as ckpt
from amorlip import distributed, history, objectives, reclip
from amorlip import resume as resume_check
from amorlip.history import read_history  # noqa: F401 - the run's history, re-exported
from amorlip.progress import Progress
from amorlip.runlock import RUN_IN_USE_FIX, FolderInUse, FolderLock
from amorlip.signals import Stopped, StopRequest
from amorlip.step import forward_backward, has_batch_norm
from amorlip.batching import split_batch
from amorlip.config import Config, ConfigError, describe
from amorlip.data.sources import SOURCES
from amorlip.models import build_model, clamp_logit_scale, describe_precision, model_config, param_groups, unwrap
from amorlip.models import autocast as precision_autocast
from amorlip.objectives.base import Objective, ObjectiveContext, ObjectiveOutput
from amorlip.schedules import param_group_lr, rho_at, step_thresh_hit, watch_temperature


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_name(cfg: Config) -> str:
    return cfg.run_dir.name


def autocast_context(cfg: Config, device: torch.device):
    """model.precision's autocast: bf16 / amp_bf16 on CUDA or the CPU, fp16 on CUDA; none for fp32, pure_bf16."""
    return precision_autocast(cfg.model.precision, device)


class MetricsLogger:
    """JSONL always (main rank), TensorBoard and W&B (`wandb`: the run's config, see amorlip.logging_wandb) when
    asked."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, fresh: bool = False,
                 wandb: Config | None = None, device_type: str = "cpu") -> None:
        self.enabled = enabled
        self.path = history.metrics_path(run_dir)
        self.tb = None
        self.wandb = None
        if enabled and fresh:  # a new run never mixes its lines with a failed earlier run's
            self.path.unlink(missing_ok=True)
            for old in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
                old.unlink(missing_ok=True)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if enabled and wandb is not None:
            from amorlip.logging_wandb import WandbRun

            config = {**wandb.to_dict(), "precision_effective": describe_precision(wandb.model.precision, device_type)}
            self.wandb = WandbRun(run_dir, wandb.train.wandb_project, wandb.train.wandb_name or run_dir.name,
                                  wandb.train.wandb_tags, config, resume=not fresh)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, torch.Tensor, np.floating)) else v) for k, v in values.items()}
        history.append_row(self.path, {"step": step, **clean})  # a failed write: one error line, no torn line
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, clean)

    def summary(self, values: dict[str, Any]) -> None:
        """The run's final summary (W&B's run summary; summary.json is written by finish_run)."""
        if self.wandb is not None:
            self.wandb.summary(values)

    def truncate_after(self, step: int, drop_eval_at_step: bool = False) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again) and a torn last line; with
        `drop_eval_at_step` also the evaluation at the checkpoint's step (a finished run evaluates again)."""
        if not self.enabled:
            return
        torn = history.truncate_after(self.path.parent, step, drop_eval_at_step)
        if torn is not None:
            print(f"{self.path}: dropped a torn last line, left by an interrupted write ({torn[:40]!r}...)")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _to_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def build_eval_sets(cfg: Config):
    from amorlip.data.loader import build_eval_data
    from amorlip.data.samples import preserved_rng

    with preserved_rng():  # built before the model: must not change its initialisation
        return build_eval_data(cfg.data, cfg.train.seed, imagenet_root=cfg.eval.imagenet_root)


def run_evaluation(model, tokenizer, transform, eval_sets, cfg: Config, device: torch.device, *,
                   objective: torch.nn.Module | None = None, diagnostic_sets: Any = None) -> dict[str, float]:
    """Zero-shot and retrieval on `eval_sets`; with `diagnostic_sets` (eval.normalizers) also the normalizer
    diagnostics of the model and `objective` as they are now (`normalizer/...` keys, amorlip.evaluate.normalizers)."""
    from amorlip.evaluate import evaluate_model

    tasks, retrieval = eval_sets
    metrics = evaluate_model(
        unwrap(model),
        tokenizer,
        transform,
        tasks if cfg.eval.zeroshot else [],
        retrieval if cfg.eval.retrieval else None,
        device,
        cfg.eval.batch_size,
    )
    if diagnostic_sets is not None:
        from amorlip.evaluate.normalizers import run_diagnostics

        metrics.update(run_diagnostics(model, objective, diagnostic_sets, transform, tokenizer, device,
                                       cfg.eval.batch_size))
    return metrics


def build_optimizer(groups: list[dict[str, Any]], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameter groups; fused (one kernel per parameter) unless optim.fused is false or the
    device has no fused AdamW."""
    fused = cfg.optim.fused
    if fused is None:
        fused = device.type in ("cpu", "cuda") and all(
            p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                             **({"fused": True} if fused else {}))


def train(cfg: Config, stream: Any | None = None) -> RunResult:
    """Train according to `cfg`; returns the run folder, final step and final metrics.

    `stream` (a `TrainStream` for this rank) replaces the one built from `cfg.data`: `amorlip bench` passes
    pre-made batches to time the real training step. SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) during the run save a
    checkpoint and exit 128 + signal (amorlip.signals.Stopped).
    """
    with StopRequest() as stop, contextlib.ExitStack() as held:  # held: the run folder's lock, until the end
        run = _set_up(cfg, stream, held)
        _loop(run, stop)
        return _finish(run)


# ----------------------------------------------------------------------------------------------------
# The run's state
# ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: what set-up built, the counters the loop advances, and (`state_dict`) the checkpoint."""

    cfg: Config
    dist: distributed.DistInfo
    run_dir: Path
    resume_path: Path | None  # the checkpoint this run continues (None: a fresh run)
    stream: Any  # a TrainStream for this rank (or a stand-in with the same methods)
    steps_per_epoch: int
    total_steps: int
    eval_sets: tuple[list, Any]  # (zero-shot tasks, retrieval set); ([], None) off the main rank
    diagnostic_sets: Any  # eval.normalizers: the pairs of the normalizer diagnostics (None: off, or not main)
    model: torch.nn.Module  # the bare model: parameters, clamp, checkpoint and evaluation
    tokenizer: Any  # native tokenizer and eval transform (the final evaluation's); phases have their own
    eval_transform: Any
    objective: Objective
    resolution: reclip.ResolutionRun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    temp_thresh_hit: bool = False  # step_thresh (schedules.step_thresh_hit), from the temperature the last step left
    last_saved: int = -1  # the step of the newest checkpoint (-1: none yet)
    last_good: Path | None = None  # the newest checkpoint whose next step had a finite loss and gradient norm
    unconfirmed: Path | None = None  # the newest checkpoint while its next step has not run yet (or was not finite)
    last_save_time: float = 0.0  # time.monotonic() of the newest checkpoint (train.checkpoint_minutes)
    last_eval: dict[str, float] = field(default_factory=dict)
    # set at the end of set-up, in this order: the model compiled / wrapped in DDP, the logger, the progress line
    train_model: torch.nn.Module = field(init=False)
    logger: MetricsLogger = field(init=False)
    progress: Progress | None = field(init=False)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def has_eval_data(self) -> bool:
        return bool(self.eval_sets[0]) or self.eval_sets[1] is not None or self.diagnostic_sets is not None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: everything needed to continue exactly. Collective under DDP (every rank takes part):
        it holds every process's RNG states and data counters, as each rank continues with its own."""
        rng = distributed.gather_objects(ckpt.rng_state())
        data_stats = distributed.gather_objects(_stats_dict(self.stream.stats))
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": rng,
            "temp_thresh_hit": self.temp_thresh_hit,
            "data_stats": data_stats,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint made by `state_dict` (its settings already checked)."""
        reclip.load_model_state(self.model, state["model"], self.optimizer)  # at the resolution it was saved at
        ckpt.load_optimizer_state(self.optimizer, state["optimizer"])  # this run's lr, wd, betas, eps
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        rng = state["rng"]
        ckpt.set_rng_state(rng[self.dist.rank % len(rng)] if isinstance(rng, list) else rng)
        self.step = int(state["step"])
        self.temp_thresh_hit = bool(state.get("temp_thresh_hit", False))
        _restore_data_stats(self.stream.stats, state.get("data_stats"), self.dist.rank)


@dataclass
class StepOutput:
    """What one optimizer step leaves for the log line."""

    loss: torch.Tensor  # the back-propagated loss (objective + temperature scheme)
    result: ObjectiveOutput  # the objective's own loss and metrics
    grad_norm: torch.Tensor  # before clipping; nan when optim.grad_clip is 0
    rho: float
    samples: int  # over every process


# ----------------------------------------------------------------------------------------------------
# Set-up. The order is part of the contract: the RNG draws (seed, data, evaluation sets, model, objective)
# happen in the same sequence in every run, so a resumed run continues bit-exactly.
# ----------------------------------------------------------------------------------------------------


def _set_up(cfg: Config, stream: Any | None, held: contextlib.ExitStack) -> Run:
    """The run folder's lock (released by `held`), checks, data, model, objective, RECLIP phases, optimizer,
    resume, logger and progress line."""
    dist_info = _init_process(cfg)
    run_dir = cfg.run_dir
    held.callback(_lock_run_dir(run_dir, dist_info).release)
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
    steps_per_epoch = stream.steps_per_epoch
    total_steps = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * steps_per_epoch

    # evaluation data too (the user's val_path / imagenet_root are read and checked here)
    eval_sets = build_eval_sets(cfg) if dist_info.is_main and (cfg.eval.zeroshot or cfg.eval.retrieval) else ([], None)
    diagnostic_sets = None
    if dist_info.is_main and cfg.eval.normalizers:  # consumes no RNG
        from amorlip.evaluate.normalizers import build_diagnostic_sets

        diagnostic_sets = build_diagnostic_sets(cfg, stream)

    # initial weights (model.pretrained) only for a new run: a resumed one takes them from its checkpoint
    resume_path = _resume_path(cfg, run_dir, dist_info.is_main)
    model, train_transform, eval_transform, tokenizer = build_model(
        cfg.model, device=dist_info.device, load_pretrained_weights=resume_path is None, output_dict=True,
        **objective_cls.model_overrides
    )
    objective = _build_objective(cfg, objective_cls, dist_info, stream, total_steps)
    # RECLIP phases (docs/reclip.md): small images / short captions first, the model's native size last.
    resolution = reclip.ResolutionRun(cfg.sections.get("resolution"), model, total_steps,
                                      train_transform, eval_transform, tokenizer)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_temperature)
    optimizer = build_optimizer(groups, cfg, dist_info.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dist_info.device.type == "cuda" and cfg.model.precision == "fp16")
    run = Run(cfg=cfg, dist=dist_info, run_dir=run_dir, resume_path=resume_path, stream=stream,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_sets=eval_sets,
              diagnostic_sets=diagnostic_sets, model=model,
              tokenizer=tokenizer, eval_transform=eval_transform, objective=objective, resolution=resolution,
              optimizer=optimizer, scaler=scaler)
    _resume(run)

    if cfg.train.accum_steps > 1 and run.is_main and has_batch_norm(model):
        print(f"note: {cfg.model.name} normalises with batch statistics (BatchNorm): with train.accum_steps "
              f"{cfg.train.accum_steps} they are micro-batch statistics, so the step is not exactly the full batch's")
    resolution.enter(run.step, model, optimizer)
    run.train_model = _wrap(model, cfg, dist_info)
    if run.is_main and resolution.enabled:
        print(f"step {run.step}: {resolution.describe()}")

    run.logger = MetricsLogger(run_dir, run.is_main, cfg.train.tensorboard, fresh=resume_path is None,
                               wandb=cfg if cfg.train.wandb else None, device_type=dist_info.device.type)
    if run.is_main:
        _prepare_run_dir(run)
    run.last_save_time = time.monotonic()
    run.progress = (Progress(total_steps, run.step, cfg.objective, bar=None if cfg.train.progress else False)
                    if run.is_main else None)
    return run


def _init_process(cfg: Config) -> distributed.DistInfo:
    """The process group (under torchrun), the device and its math settings."""
    dist_info = distributed.init_distributed(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if dist_info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    return dist_info


def _lock_run_dir(run_dir: Path, dist_info: distributed.DistInfo) -> FolderLock:
    """Collective. The main rank locks the run folder (amorlip.runlock) before any work; when another process holds
    it, every rank stops: the main rank with the error naming that process, the others quietly (exit 2)."""
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


def _build_stream(cfg: Config, dist_info: distributed.DistInfo, needs_indices: bool) -> Any:
    """This rank's share of the training data (cfg.data)."""
    from amorlip.data.loader import build_train_stream

    return build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed, dist_info.rank, dist_info.world_size,
                              pin_memory=dist_info.device.type == "cuda", needs_indices=needs_indices)


def _build_objective(cfg: Config, objective_cls: type[Objective], dist_info: distributed.DistInfo,
                     stream: Any, total_steps: int) -> Objective:
    """The objective with its section of the config and what it needs to know about the run (ObjectiveContext)."""
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


def _resume(run: Run) -> None:
    """Continue from `run.resume_path` (its settings checked first); a fresh run refuses a folder that already
    holds checkpoints."""
    path = run.resume_path
    if path is None:
        if run.is_main and ckpt.latest_checkpoint(run.run_dir) is not None:
            raise ConfigError(
                f"run folder {run.run_dir} already holds checkpoints; continue it with --train.resume latest, "
                "or start a new one with --train.name NEW_NAME"
            )
        return
    state = ckpt.load_checkpoint(path, map_location=run.device)
    ckpt.check_finite(state, path)
    _check_resume_settings(state, run.cfg, run.dist.world_size, path, run.is_main)
    run.load_state_dict(state)
    run.last_saved, run.unconfirmed = run.step, path


def _wrap(model: torch.nn.Module, cfg: Config, dist_info: distributed.DistInfo) -> torch.nn.Module:
    """torch.compile / DDP around the model (again after a phase change resizes parameters)."""
    if cfg.model.compile:
        model = torch.compile(model)
    if dist_info.distributed:
        model = DDP(model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)
    return model


def _prepare_run_dir(run: Run) -> None:
    """Main rank: the run folder, its config.yaml, and (on resume) metrics.jsonl cut back to the checkpoint."""
    print(f"run folder: {run.run_dir}", flush=True)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for tmp in ckpt.remove_stale_temporaries(ckpt.checkpoint_dir(run.run_dir)):
        print(f"removed {tmp.name}, left by an interrupted checkpoint write")
    ckpt.atomic_write_text(describe(run.cfg), run.run_dir / "config.yaml")
    if run.resume_path is not None:
        run.logger.truncate_after(run.step, drop_eval_at_step=run.step >= run.total_steps)
        print(f"resumed from {run.resume_path} at step {run.step}")


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Throughput:
    """Between log lines: samples trained since the last one, and the data-skip count last reported."""

    skips: int
    t_last: float = field(default_factory=time.perf_counter)
    samples: int = 0

    def rate(self) -> float:
        """Samples/s since the last call."""
        now = time.perf_counter()
        rate = self.samples / max(now - self.t_last, 1e-9)
        self.t_last, self.samples = now, 0
        return rate


def _loop(run: Run, stop: StopRequest) -> None:
    """Train to train.steps (or train.stop_at), an epoch at a time; a RECLIP phase boundary restarts the data
    iterator at its step with the new phase's transforms."""
    cfg = run.cfg
    # Sources that can drop unreadable samples (`drops_samples`: csv, wds) may give ranks batches of different sizes, which
    # the feature gathers cannot take: trim every rank's batch to the smallest (one scalar all-reduce per step,
    # only for those sources and only with several processes).
    trim_batches = run.dist.distributed and SOURCES[cfg.data.source].drops_samples
    meter = _Throughput(skips=_skipped(run.stream.stats))
    run.model.train()
    while run.step < run.total_steps and not _stopped_early(run):
        epoch, skip = divmod(run.step, run.steps_per_epoch)
        if skip == 0:
            run.objective.on_epoch_start(epoch)
        _enter_phase(run)
        for batch in run.stream.iterate(epoch, skip, run.resolution.train_transform, run.resolution.tokenizer):
            if trim_batches:
                batch = distributed.trim_to_common_size(batch, run.device)
            out = _train_step(run, batch, epoch)
            _log_step(run, out, epoch, meter)
            _checkpoint_if_due(run, stop)
            _evaluate_if_due(run)
            if run.step >= run.total_steps or _stopped_early(run) or run.resolution.is_boundary(run.step):
                break  # (a new phase restarts the data iterator at this step with its own transforms)


def _stopped_early(run: Run) -> bool:
    """train.stop_at reached: also when a run resumed at (or past) that step, which then trains none."""
    return run.cfg.train.stop_at is not None and run.step >= run.cfg.train.stop_at


def _enter_phase(run: Run) -> None:
    """At a RECLIP phase boundary: the new phase resized parameters (their AdamW state is reset), so wrap again."""
    if run.resolution.enter(run.step, run.model, run.optimizer):
        del run.train_model  # the old wrapper goes before the new one is made
        run.train_model = _wrap(run.model, run.cfg, run.dist)
        if run.is_main:
            print(f"step {run.step}: {run.resolution.describe()}")


def _train_step(run: Run, batch: dict[str, torch.Tensor], epoch: int) -> StepOutput:
    """One optimizer step on `batch` (plain or accumulated, amorlip.step): schedules, gradients, clip, update."""
    cfg, device, optimizer, scaler = run.cfg, run.device, run.optimizer, run.scaler
    images = batch["image"].to(device, non_blocking=True)
    texts = batch["text"].to(device, non_blocking=True)
    indices = batch["index"].to(device, non_blocking=True)

    # Schedules are pure functions of the step (step_thresh: of the temperature the last step left).
    for group in optimizer.param_groups:
        group["lr"] = param_group_lr(group, run.step, cfg.optim, run.total_steps, run.temp_thresh_hit)
    rho = rho_at(run.step, run.total_steps, cfg.temperature.rho, cfg.temperature.rho_final,
                 cfg.temperature.rho_final_fraction)

    optimizer.zero_grad(set_to_none=True)
    loss, result = forward_backward(
        run.train_model, run.objective, images, texts, indices, step=run.step, epoch=epoch,
        scheme=cfg.temperature.scheme, rho=rho, autocast=lambda: autocast_context(cfg, device),
        backward=lambda total: scaler.scale(total).backward(), accum_steps=cfg.train.accum_steps,
    )
    # Checked once forward and backward are queued, so the wait for the value does not leave the GPU idle
    # while the host launches the backward pass; still before any parameter changes.
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {run.step}; lower --optim.lr or check the data; "
            f"{_last_good_text(run)}"
        )
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
    else:
        grad_norm = torch.tensor(float("nan"))
    if run.unconfirmed is not None and (cfg.optim.grad_clip <= 0 or bool(torch.isfinite(grad_norm))):
        run.last_good, run.unconfirmed = run.unconfirmed, None  # its next step was finite: a checkpoint to name
    scaler.step(optimizer)
    scaler.update()
    clamp_logit_scale(run.model)
    run.step += 1
    return StepOutput(loss=loss, result=result, grad_norm=grad_norm, rho=rho,
                      samples=images.shape[0] * run.dist.world_size)


def _log_step(run: Run, out: StepOutput, epoch: int, meter: _Throughput) -> None:
    """Every train.log_every steps and at the last: a metrics line and the progress line. Reads the temperature
    for them and, while step_thresh watches it, after every step."""
    cfg = run.cfg
    meter.samples += out.samples
    log_now = run.step % cfg.train.log_every == 0 or run.step == run.total_steps
    if log_now or watch_temperature(cfg.optim, run.temp_thresh_hit):
        # reading the temperature waits for the GPU: only when it is logged or the threshold is watched
        temperature = 1.0 / float(unwrap(run.model).logit_scale.detach().exp())
        run.temp_thresh_hit = step_thresh_hit(cfg.optim, temperature, run.temp_thresh_hit)
    if log_now:
        meter.skips = _report_skips(run.stream.stats, run.progress, meter.skips)
        rate = meter.rate()
        values = {
            "epoch": epoch,
            "loss": out.loss.detach(),
            "objective_loss": out.result.loss.detach(),
            "lr": run.optimizer.param_groups[0]["lr"],
            # the temperature's own rate (step_thresh divides it by 3 while the temperature is at most 0.03)
            **{"lr_temperature": g["lr"] for g in run.optimizer.param_groups if g.get("group") == "temperature"},
            "temp_thresh_hit": float(run.temp_thresh_hit),
            "temperature": temperature,
            "logit_scale": math.log(1.0 / temperature),
            "rho": out.rho,
            "grad_norm": out.grad_norm,
            "samples_per_s": rate,
            **run.resolution.log_values(),
            **{f"obj/{k}": _to_float(v) for k, v in out.result.metrics.items()},
        }
        run.logger.log(run.step, values)
    if run.progress is not None:
        run.progress.update(run.step, {**values, "loss": float(values["loss"])} if log_now else None)


def _checkpoint_if_due(run: Run, stop: StopRequest) -> None:
    """After a stop signal: save and exit. Otherwise a checkpoint every train.checkpoint_every steps and every
    train.checkpoint_minutes (the final step's is written by _finish)."""
    cfg = run.cfg
    checkpoint_seconds = 60.0 * cfg.train.checkpoint_minutes
    # pre-emption and the time-based checkpoint: every process decides the same (one tiny all-reduce
    # per step, only with several processes)
    signalled, time_due = distributed.any_ranks(
        [stop.signum is not None,
         checkpoint_seconds > 0 and time.monotonic() - run.last_save_time >= checkpoint_seconds], run.device)
    if signalled:
        path = _save(run) if run.last_saved != run.step else (run.unconfirmed or run.last_good)
        _exit_on_signal(stop, run.step, path, run.is_main)
    if (cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0 or time_due) \
            and run.step < run.total_steps:
        _save(run)


def _evaluate_if_due(run: Run) -> None:
    """Every train.eval_every steps (not the last: _finish evaluates it), at the current phase's resolution and
    context length."""
    cfg = run.cfg
    if cfg.train.eval_every and run.step % cfg.train.eval_every == 0 and run.step < run.total_steps:
        if run.is_main and run.has_eval_data:
            _evaluate(run, run.resolution.tokenizer, run.resolution.eval_transform)
            run.model.train()
        distributed.barrier()


def _evaluate(run: Run, tokenizer: Any, transform: Any) -> None:
    """Main rank: evaluate the model, log the results and keep them as the run's latest (run.last_eval)."""
    run.last_eval = run_evaluation(run.model, tokenizer, transform, run.eval_sets, run.cfg, run.device,
                                   objective=run.objective, diagnostic_sets=run.diagnostic_sets)
    run.logger.log(run.step, {f"eval/{k}": v for k, v in run.last_eval.items()})


# ----------------------------------------------------------------------------------------------------
# Checkpoint and finish
# ----------------------------------------------------------------------------------------------------


def _save(run: Run) -> Path | None:
    """Write a checkpoint of the current step; never one whose weights or optimizer state are not finite.
    Collective: every rank takes part; returns the path on the main rank (None elsewhere)."""
    state = run.state_dict()
    bad = ckpt.non_finite_tensors({k: state[k] for k in ("model", "optimizer", "objective")})
    if distributed.any_rank(bool(bad), run.device):
        raise FloatingPointError(
            f"the weights or optimizer state became non-finite by step {run.step} "
            f"({len(bad)} tensors{', e.g. ' + ', '.join(bad[:3]) if bad else ' on another process'}); "
            f"not saved. Lower --optim.lr (or check the data); {_last_good_text(run)}"
        )
    path = None
    if run.is_main:
        path = ckpt.save_checkpoint(run.run_dir, run.step, state, keep=run.cfg.train.keep_checkpoints,
                                    protect=run.last_good)  # kept until a newer one has proved itself
        run.unconfirmed = path
    run.last_saved, run.last_save_time = run.step, time.monotonic()
    distributed.barrier()
    return path


def _finish(run: Run) -> RunResult:
    """The final checkpoint; then, unless stopped early by train.stop_at, the final evaluation at the model's
    native size, summary.json, plot and table (finish_run)."""
    if run.progress is not None:
        run.progress.close()
    if run.last_saved != run.step:
        _save(run)
    if run.step < run.total_steps:  # stopped early by train.stop_at
        if run.is_main:
            print(f"stopped at step {run.step} of {run.total_steps}; continue with --train.resume latest")
        run.logger.close()
        return RunResult(run_dir=run.run_dir, step=run.step)
    if run.is_main and run.has_eval_data:
        _evaluate(run, run.tokenizer, run.eval_transform)
    distributed.barrier()
    result = RunResult(run_dir=run.run_dir, step=run.step, metrics=run.last_eval,
                       history=read_history(run.run_dir) if run.is_main else [])
    data_stats = _merged_stats(run.stream.stats)
    if run.is_main:
        run.logger.summary(finish_run(result, run.cfg, data_stats, run.device.type))
    run.logger.close()
    return result


def _last_good_text(run: Run) -> str:
    """The checkpoint to continue from after a divergence: the newest whose next step was finite (the checkpoint
    just before a non-finite step may hold finite weights that already give a NaN loss)."""
    path = run.last_good
    if path is None:
        if run.unconfirmed is not None:
            return (f"no checkpoint whose next step was finite is left (the newest, {run.unconfirmed}, was followed "
                    "by this one); start again")
        return "no checkpoint was saved before this (start again)"
    return (f"last good checkpoint: {path} (continue from it with --train.resume {path} and "
            f"--train.resume-allow-changes KEYS for the settings you change, e.g. optim.lr)")


def _exit_on_signal(stop: StopRequest, step: int, path: Path | None, is_main: bool) -> None:
    """After a stop signal: say what was saved and exit 128 + the signal's number (the shell's convention)."""
    if is_main:
        print(f"received {stop.name} at step {step}: checkpoint {path} saved; continue with --train.resume latest",
              file=sys.stderr, flush=True)
    distributed.teardown()
    raise Stopped(int(stop.signum or 0))


def _check_resume_settings(state: dict[str, Any], cfg: Config, world_size: int, path: Path, is_main: bool) -> None:
    """Refuse a resume whose checkpoint was made with settings that change results (see amorlip.resume)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return  # a checkpoint without its settings (not made by this trainer): nothing to compare
    try:
        accepted = resume_check.check_resume(saved, cfg.to_dict(), state.get("world_size"), world_size,
                                             cfg.train.resume_allow_changes, f"checkpoint {path}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if accepted and is_main:
        print("resuming with changed settings (accepted by --train.resume-allow-changes): " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(accepted.items())))


def _stats_dict(stats: Any) -> dict[str, Any]:
    """A stream's counters as a plain dict (DataStats, or a stand-in stream's simple counters)."""
    return stats.state_dict() if hasattr(stats, "state_dict") else dict(stats.__dict__)


def _restore_data_stats(stats: Any, saved: Any, rank: int) -> None:
    """This rank's counters from a checkpoint: a list (one per rank) or, from earlier versions, one dict."""
    if saved is None:
        return
    mine = saved[rank] if isinstance(saved, list) and rank < len(saved) else (
        saved if isinstance(saved, dict) else {})
    if hasattr(stats, "load_state_dict"):
        stats.load_state_dict(mine)
    else:
        stats.__dict__.update(mine)


def _skipped(stats: Any) -> int:
    return int(getattr(stats, "skipped_visits", 0) or 0) + int(getattr(stats, "unreadable_shards", 0) or 0)


def _report_skips(stats: Any, progress: Progress | None, last: int) -> int:
    """A line when this process skipped samples since the last report (with the first offending items)."""
    now = _skipped(stats)
    if now != last and progress is not None and hasattr(stats, "describe"):
        progress.write(f"data: {stats.describe()}")
    return now


def _merged_stats(stats: Any) -> dict[str, Any]:
    """The run's data counters over every process: distinct skipped samples counted once, visits summed."""
    states = distributed.gather_objects(_stats_dict(stats))
    if not hasattr(stats, "state_dict"):
        return {k: sum(s.get(k, 0) for s in states) for k in states[0] if isinstance(states[0][k], int)}
    merged = type(stats).merge(states)
    counts = {k: v for k, v in merged.state_dict().items() if isinstance(v, int)}
    return {**counts, **{k: v for k, v in merged.extra.items()}, "summary": merged.describe()}


def _resume_path(cfg: Config, run_dir: Path, is_main: bool) -> Path | None:
    """`--train.resume latest|auto|PATH` -> the checkpoint to load (None: start fresh). Only a whole file
    (ckpt.verify_checkpoint): latest / auto / a run folder pass over a truncated or damaged newest checkpoint to
    the one before it, with a line saying so; a damaged PATH is an error."""
    what = cfg.train.resume
    if not what:
        return None
    say = print if is_main else (lambda text: None)
    if what in ("latest", "auto") or Path(what).is_dir():
        folder = run_dir if what in ("latest", "auto") else Path(what)
        found = ckpt.latest_whole_checkpoint(folder, say)
        if found is None and what != "auto":
            raise ConfigError(f"--train.resume {what}: no checkpoint in {ckpt.checkpoint_dir(folder)}")
        return found
    path = ckpt.resolve_checkpoint(what)
    ckpt.verify_checkpoint(path)
    return path


def save_final(run_dir: Path, cfg: Config) -> dict[str, str]:
    """train.save_final / export_final, from the final checkpoint; returns what was written (for summary.json).

    save_final=weights: RUN/final_weights.pt holds the model only (open_clip's {'state_dict': ...}, at its native
    resolution; loadable by open_clip and by --model.pretrained), and the earlier checkpoints are deleted. The final
    checkpoint stays whole, so the finished run can still be resumed (e.g. extended with more steps).
    export_final: `amorlip export` of the final checkpoint into RUN/export/ (NAME.pt + NAME.json).
    """
    last = ckpt.latest_checkpoint(run_dir)
    out: dict[str, str] = {}
    if last is None:
        return out
    if cfg.train.save_final == "weights":
        state = ckpt.load_checkpoint(last)
        weights = {"epoch": state.get("epoch", 0), "step": state["step"], "name": cfg.model.name,
                   "state_dict": reclip.state_dict_at_image_size(state["model"], model_config(cfg.model.name))}
        del state
        ckpt.atomic_save(weights, run_dir / "final_weights.pt")
        for old in ckpt.checkpoint_dir(run_dir).glob("step_*.pt"):
            if old != last:
                old.unlink(missing_ok=True)
        out["final_weights"] = str(run_dir / "final_weights.pt")
    if cfg.train.export_final:
        weights_path, _ = ckpt.export_open_clip(last, run_dir / "export")
        out["export"] = str(weights_path)
    return out


def finish_run(result: RunResult, cfg: Config, stats, device_type: str = "cpu") -> dict[str, Any]:
    """Final weights / export (train.save_final, export_final), summary table, summary.json and a PNG of loss and
    evaluation metrics over steps; returns the summary."""
    from amorlip.report import plot_history, summary_table

    saved = save_final(result.run_dir, cfg)
    summary = {
        "run_dir": str(result.run_dir),
        "objective": cfg.objective,
        "model": cfg.model.name,
        "steps": result.step,
        "batch_size": cfg.train.batch_size,
        "precision": describe_precision(cfg.model.precision, device_type),
        "data_skipped": dict(stats),
        "metrics": result.metrics,
        **saved,
    }
    ckpt.atomic_write_text(json.dumps(summary, indent=2), result.run_dir / "summary.json")
    if stats.get("summary"):
        print(f"data: {stats['summary']}")
    try:
        plot_history(result.history, result.run_dir / "training.png", title=result.run_dir.name)
    except Exception as e:  # noqa: BLE001 - a plot failure must not lose a finished run
        print(f"warning: could not draw the training plot: {e}")
    print(summary_table(result.metrics, title=f"{cfg.objective} / {cfg.model.name} after {result.step} steps"))
    print(f"run folder: {result.run_dir}")
    return summary


def main_worker(cfg: Config) -> RunResult:
    try:
        return train(cfg)
    finally:
        distributed.teardown()

