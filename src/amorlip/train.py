"""The training loop, readable top to bottom.

    config -> data stream -> open_clip model -> objective -> AdamW step -> log / checkpoint / evaluate

`train()` is three calls: `set_up` (amorlip.train_setup) builds the `Run` (checks, data, evaluation sets, model,
objective, RECLIP phases, optimizer, resume, logger), `_loop` steps it (`_train_step` is one optimizer step;
logging, checkpoints and evaluation follow each step), and `_finish` writes the final checkpoint, evaluation and
summary (amorlip.train_finish). The `Run` holds the state; its `state_dict()` is the checkpoint
(amorlip.train_state).

The loop knows nothing about any particular objective: it hands each batch's features, the
temperature, the samples' indices and the step/epoch to `objective(...)`, applies the shared
temperature scheme, and back-propagates. Runs unchanged under torchrun (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amorlip import checkpoint as ckpt
from amorlip import distributed
from amorlip.config import Config
from amorlip.data.sources import SOURCES
from amorlip.data.types import DataStats, TrainStream
from amorlip.history import read_history
from amorlip.models import autocast as precision_autocast
from amorlip.models import clamp_logit_scale, unwrap
from amorlip.objectives.base import ObjectiveOutput
from amorlip.progress import Progress
from amorlip.schedules import param_group_lr, rho_at, step_thresh_hit, watch_temperature
from amorlip.signals import Stopped, StopRequest
from amorlip.step import forward_backward
from amorlip.train_eval import run_evaluation
from amorlip.train_finish import finish_run
from amorlip.train_setup import set_up, wrap
from amorlip.train_state import Run, RunResult


def train(cfg: Config, stream: TrainStream | None = None) -> RunResult:
    """Collective: every rank calls this together under torchrun. Train according to `cfg`; returns the run
    folder, final step and final metrics.

    `stream` (a `TrainStream` for this rank) replaces the one built from `cfg.data`: `amorlip bench` passes
    pre-made batches to time the real training step. SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) during the run save a
    checkpoint and exit 128 + signal (amorlip.signals.Stopped).
    """
    with StopRequest() as stop, contextlib.ExitStack() as held:  # held: the run folder's lock, until the end
        run = set_up(cfg, stream, held)
        _loop(run, stop)
        return _finish(run)


def autocast_context(cfg: Config, device: torch.device):
    """model.precision's autocast: bf16 / amp_bf16 on CUDA or the CPU, fp16 on CUDA; none for fp32, pure_bf16."""
    return precision_autocast(cfg.model.precision, device)


def _to_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What one optimizer step leaves for the log line."""

    loss: torch.Tensor  # the back-propagated loss (objective + temperature scheme)
    result: ObjectiveOutput  # the objective's own loss and metrics
    grad_norm: torch.Tensor  # before clipping; nan when optim.grad_clip is 0
    rho: float
    samples: int  # over every process


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
    """Collective: every rank calls this together (each step's DDP backward, objective, checkpoint decision).
    Train to train.steps (or train.stop_at), an epoch at a time; a RECLIP phase boundary restarts the data
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
    """Collective: every rank calls this together at each data-iterator start (`wrap` builds DDP again).
    At a RECLIP phase boundary: the new phase resized parameters (their AdamW state is reset), so wrap again."""
    if run.resolution.enter(run.step, run.model, run.optimizer):
        del run.train_model  # the old wrapper goes before the new one is made
        run.train_model = wrap(run.model, run.cfg, run.dist)
        if run.is_main:
            print(f"step {run.step}: {run.resolution.describe()}")


def _train_step(run: Run, batch: dict[str, torch.Tensor], epoch: int) -> StepOutput:
    """Collective: every rank calls this together (DDP backward, the objective's gathers; amorlip.step).
    One optimizer step on `batch` (plain or accumulated, amorlip.step): schedules, gradients, clip, update."""
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


def _skipped(stats: DataStats) -> int:
    """Samples skipped, counting every visit, plus unreadable shards: what `_report_skips` watches."""
    return stats.skipped_visits + stats.unreadable_shards


def _report_skips(stats: DataStats, progress: Progress | None, last: int) -> int:
    """A line when this process skipped samples since the last report (with the first offending items)."""
    now = _skipped(stats)
    if now != last and progress is not None:
        progress.write(f"data: {stats.describe()}")
    return now


def _checkpoint_if_due(run: Run, stop: StopRequest) -> None:
    """Collective: every rank calls this after every step (`any_ranks`, `_save`). After a stop signal: save
    and exit. Otherwise a checkpoint every train.checkpoint_every steps and every
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
    """Collective: every rank calls this after every step (`barrier`; the main rank evaluates alone).
    Every train.eval_every steps (not the last: _finish evaluates it), at the current phase's resolution and
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
    if run.step < run.total_steps:  # (the final results are printed as a table by finish_run)
        line = eval_line(run.step, run.last_eval)
        if run.progress is not None:
            run.progress.write(line)
        else:
            print(line, flush=True)


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """One console line of a mid-run evaluation: mean zero-shot top-1 and mean retrieval R@1 (in %)."""
    from amorlip.compare.results import headline_metrics

    head = headline_metrics(metrics)
    shown = [f"{k} {100 * head[k]:.2f}%" for k in ("zeroshot/mean_top1", "retrieval/mean_R@1") if k in head]
    return f"eval at step {step}: " + (" | ".join(shown) if shown else "no zero-shot or retrieval metrics")


# ----------------------------------------------------------------------------------------------------
# Checkpoint and finish
# ----------------------------------------------------------------------------------------------------


def _save(run: Run) -> Path | None:
    """Collective: every rank calls this together (`Run.state_dict`, `any_rank`, `barrier`). Write a checkpoint
    of the current step; never one whose weights or optimizer state are not finite. Returns the path on the main
    rank (None elsewhere)."""
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
    """Collective: every rank calls this together (`_save`, `barrier`, `_merged_stats`). The final checkpoint;
    then, unless stopped early by train.stop_at, the final evaluation at the model's native size, summary.json,
    plot and table (amorlip.train_finish.finish_run)."""
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
    """Collective: every rank calls this together (`teardown`). After a stop signal: say what was saved and
    exit 128 + the signal's number (the shell's convention)."""
    if is_main:
        print(f"received {stop.name} at step {step}: checkpoint {path} saved; continue with --train.resume latest",
              file=sys.stderr, flush=True)
    distributed.teardown()
    raise Stopped(int(stop.signum or 0))


def _merged_stats(stats: DataStats) -> dict[str, Any]:
    """Collective: every rank calls this together (`gather_objects`). The run's data counters over every
    process: distinct skipped samples counted once, visits summed."""
    states = distributed.gather_objects(stats.state_dict())
    merged = DataStats.merge(states)
    counts = {k: v for k, v in merged.state_dict().items() if isinstance(v, int)}
    return {**counts, **{k: v for k, v in merged.extra.items()}, "summary": merged.describe()}


def main_worker(cfg: Config) -> RunResult:
    """Collective: every rank calls this together. `train(cfg)`, then the process group's teardown (also after
    an error)."""
    try:
        return train(cfg)
    finally:
        distributed.teardown()
