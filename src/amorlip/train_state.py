"""A training run's state, `Run`, and its checkpoint: what is saved, how a run continues from it, which file a
resume takes.

`Run` holds what set-up built (amorlip.train_setup) and the counters the loop advances (amorlip.train);
`Run.state_dict()` is the checkpoint, `resume` loads one after checking its settings (amorlip.resume).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amorlip import checkpoint as ckpt
from amorlip import distributed, reclip
from amorlip import resume as resume_check
from amorlip.config import Config, ConfigError
from amorlip.data.types import DataStats, TrainStream
from amorlip.metrics_log import MetricsLogger
from amorlip.models import unwrap
from amorlip.objectives.base import Objective
from amorlip.progress import Progress


@dataclass
class RunResult:
    """What `amorlip.train.train` returns: the run folder, the final step and (on the main rank, after a whole
    run) the final evaluation and the logged history."""

    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """One training run: what set-up built, the counters the loop advances, and (`state_dict`) the checkpoint."""

    cfg: Config
    dist: distributed.DistInfo
    run_dir: Path
    resume_path: Path | None  # the checkpoint this run continues (None: a fresh run)
    stream: TrainStream  # this rank's training data
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
        """Collective: every rank calls this together under DDP. The checkpoint: everything needed to continue
        exactly; it holds every process's RNG states and data counters, as each rank continues with its own."""
        rng = distributed.gather_objects(ckpt.rng_state())
        data_stats = distributed.gather_objects(self.stream.stats.state_dict())
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


def _restore_data_stats(stats: DataStats, saved: Any, rank: int) -> None:
    """This rank's counters from a checkpoint: a list (one per rank) or, from earlier versions, one dict."""
    if saved is None:
        return
    mine = saved[rank] if isinstance(saved, list) and rank < len(saved) else (
        saved if isinstance(saved, dict) else {})
    stats.load_state_dict(mine)


def find_resume_path(cfg: Config, run_dir: Path, is_main: bool) -> Path | None:
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


def resume(run: Run) -> None:
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
