"""The training loop, readable top to bottom.

    config -> data stream -> open_clip model -> objective -> AdamW step -> log / checkpoint / evaluate

The loop knows nothing about any particular objective: it hands each batch's features, the
temperature, the samples' indices and the step/epoch to `objective(...)`, applies the shared
temperature scheme, and back-propagates. Runs unchanged under torchrun (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

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
from amorlip import distributed, objectives, reclip
from amorlip import resume as resume_check
from amorlip.progress import Progress
from amorlip.signals import StopRequest
from amorlip.step import forward_backward, has_batch_norm
from amorlip.config import Config, ConfigError, describe
from amorlip.models import build_model, clamp_logit_scale, describe_precision, model_config, param_groups, unwrap
from amorlip.models import autocast as precision_autocast
from amorlip.objectives.base import ObjectiveContext
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
    return cfg.train.name or f"{cfg.objective}-{cfg.model.name}-b{cfg.train.batch_size}-s{cfg.train.seed}"


def autocast_context(cfg: Config, device: torch.device):
    """model.precision's autocast: bf16 / amp_bf16 on CUDA or the CPU, fp16 on CUDA; none for fp32, pure_bf16."""
    return precision_autocast(cfg.model.precision, device)


class MetricsLogger:
    """JSONL always (main rank), TensorBoard and W&B (`wandb`: the run's config, see amorlip.logging_wandb) when
    asked."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, fresh: bool = False,
                 wandb: Config | None = None, device_type: str = "cpu") -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
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
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
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
        """On resume, drop lines logged after the checkpoint (they will be logged again); with
        `drop_eval_at_step` also the evaluation at the checkpoint's step (a finished run evaluates again)."""
        if not self.enabled or not self.path.exists():
            return

        def keep(row: dict[str, Any]) -> bool:
            if row["step"] == step and drop_eval_at_step:
                return not any(k.startswith("eval/") for k in row)
            return row["step"] <= step

        kept = [line for line in self.path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        ckpt.atomic_write_text("".join(line + "\n" for line in kept), self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _to_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def build_eval_sets(cfg: Config):
    from amorlip.data.loader import build_eval_data
    from amorlip.data.samples import preserved_rng

    with preserved_rng():  # built before the model: must not change its initialisation
        return build_eval_data(cfg.data, cfg.train.seed, imagenet_root=cfg.eval.imagenet_root)


def run_evaluation(model, tokenizer, transform, eval_sets, cfg: Config, device: torch.device) -> dict[str, float]:
    from amorlip.evaluate import evaluate_model

    tasks, retrieval = eval_sets
    return evaluate_model(
        unwrap(model),
        tokenizer,
        transform,
        tasks if cfg.eval.zeroshot else [],
        retrieval if cfg.eval.retrieval else None,
        device,
        cfg.eval.batch_size,
    )


def train(cfg: Config, stream: Any | None = None) -> RunResult:
    """Train according to `cfg`; returns the run folder, final step and final metrics.

    `stream` (a `TrainStream` for this rank) replaces the one built from `cfg.data`: `amorlip bench` passes
    pre-made batches to time the real training step. SIGTERM / SIGUSR1 during the run save a checkpoint and
    exit 128 + signal (amorlip.signals).
    """
    with StopRequest() as stop:
        return _train(cfg, stream, stop)


def _train(cfg: Config, stream: Any | None, stop: StopRequest) -> RunResult:
    from amorlip.data.loader import build_train_stream

    dist_info = distributed.init_distributed(cfg.train.device)
    device, is_main = dist_info.device, dist_info.is_main
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.train.batch_size % dist_info.world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {dist_info.world_size} processes"
        )
    local_batch = cfg.train.batch_size // dist_info.world_size
    if local_batch % cfg.train.accum_steps:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps} does not divide the per-process batch of {local_batch} "
            f"(train.batch_size {cfg.train.batch_size} over {dist_info.world_size} processes); pick a divisor"
        )
    seed_everything(cfg.train.seed)

    objective_cls = objectives.get(cfg.objective)
    # Data first: a missing path or empty shard list fails before any model is built.
    if stream is None:
        stream = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed, dist_info.rank, dist_info.world_size,
                                    pin_memory=device.type == "cuda",
                                    needs_indices=objective_cls.needs_indices)
    if stream.steps_per_epoch < 1:
        raise ConfigError(
            f"the dataset has {stream.dataset_size} samples, fewer than one batch of {cfg.train.batch_size}; "
            "lower --train.batch-size or add data"
        )
    steps_per_epoch = stream.steps_per_epoch
    total_steps = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * steps_per_epoch
    total_epochs = math.ceil(total_steps / steps_per_epoch)

    # evaluation data too (the user's val_path / imagenet_root are read and checked here)
    eval_sets = build_eval_sets(cfg) if is_main and (cfg.eval.zeroshot or cfg.eval.retrieval) else ([], None)

    # initial weights (model.pretrained) only for a new run: a resumed one takes them from its checkpoint
    fresh_run = _resume_path(cfg, Path(cfg.train.output_dir) / run_name(cfg)) is None
    model, train_transform, eval_transform, tokenizer = build_model(
        cfg.model, device=device, load_pretrained_weights=fresh_run, output_dict=True, **objective_cls.model_overrides
    )
    ctx = ObjectiveContext(
        dataset_size=stream.dataset_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        total_epochs=total_epochs,
        embed_dim=int(model_config(cfg.model.name)["embed_dim"]),
        local_batch_size=cfg.train.batch_size // dist_info.world_size,
        world_size=dist_info.world_size,
        rank=dist_info.rank,
        device=device,
    )
    objective = objective_cls(cfg.sections.get(objective_cls.section) if objective_cls.section else None, ctx).to(device)
    # RECLIP phases (docs/reclip.md): small images / short captions first, the model's native size last.
    resolution = reclip.ResolutionRun(cfg.sections.get("resolution"), model, total_steps,
                                      train_transform, eval_transform, tokenizer)

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_temperature)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.model.precision == "fp16")

    run_dir = Path(cfg.train.output_dir) / run_name(cfg)
    step, temp_thresh_hit = 0, False
    resume_path = _resume_path(cfg, run_dir)
    if resume_path is None and is_main and ckpt.latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"run folder {run_dir} already holds checkpoints; continue it with --train.resume latest, "
            "or start a new one with --train.name NEW_NAME"
        )
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, map_location=device)
        _check_resume_settings(state, cfg, dist_info.world_size, resume_path, is_main)
        reclip.load_model_state(model, state["model"], optimizer)  # at the resolution it was saved at
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        objective.load_state_dict(state["objective"])
        rng = state["rng"]
        ckpt.set_rng_state(rng[dist_info.rank % len(rng)] if isinstance(rng, list) else rng)
        step = int(state["step"])
        temp_thresh_hit = bool(state.get("temp_thresh_hit", False))
        _restore_data_stats(stream.stats, state.get("data_stats"), dist_info.rank)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        """torch.compile / DDP around the model (again after a phase change resizes parameters)."""
        if cfg.model.compile:
            model = torch.compile(model)
        if dist_info.distributed:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model

    if cfg.train.accum_steps > 1 and is_main and has_batch_norm(model):
        print(f"note: {cfg.model.name} normalises with batch statistics (BatchNorm): with train.accum_steps "
              f"{cfg.train.accum_steps} they are micro-batch statistics, so the step is not exactly the full batch's")
    resolution.enter(step, model, optimizer)
    train_model = wrap(model)
    if is_main and resolution.enabled:
        print(f"step {step}: {resolution.describe()}")

    logger = MetricsLogger(run_dir, is_main, cfg.train.tensorboard, fresh=resume_path is None,
                           wandb=cfg if cfg.train.wandb else None, device_type=device.type)
    if is_main:
        print(f"run folder: {run_dir}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in ckpt.remove_stale_temporaries(ckpt.checkpoint_dir(run_dir)):
            print(f"removed {tmp.name}, left by an interrupted checkpoint write")
        ckpt.atomic_write_text(describe(cfg), run_dir / "config.yaml")
        if resume_path is not None:
            logger.truncate_after(step, drop_eval_at_step=step >= total_steps)
            print(f"resumed from {resume_path} at step {step}")

    def checkpoint_state() -> dict[str, Any]:
        # every process's RNG states and data counters (each rank continues with its own)
        rng, data_stats = distributed.gather_objects(ckpt.rng_state()), distributed.gather_objects(_stats_dict(stream.stats))
        return {
            "step": step,
            "epoch": step // steps_per_epoch,
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "objective": objective.state_dict(),
            "rng": rng,
            "temp_thresh_hit": temp_thresh_hit,
            "data_stats": data_stats,
            "config": cfg.to_dict(),
            "world_size": dist_info.world_size,
        }

    last_saved = step if resume_path is not None else -1
    last_good = resume_path  # the newest checkpoint known to hold finite weights
    last_save_time = time.monotonic()

    def save() -> Path | None:
        """Write a checkpoint of the current step; never one whose weights or optimizer state are not finite."""
        nonlocal last_saved, last_good, last_save_time
        state = checkpoint_state()  # collective under DDP: every rank takes part
        bad = ckpt.non_finite_tensors({k: state[k] for k in ("model", "optimizer", "objective")})
        if distributed.any_rank(bool(bad), device):
            raise FloatingPointError(
                f"the weights or optimizer state became non-finite by step {step} "
                f"({len(bad)} tensors{', e.g. ' + ', '.join(bad[:3]) if bad else ' on another process'}); "
                f"not saved. Lower --optim.lr (or check the data); {_last_good_text(last_good)}"
            )
        path = None
        if is_main:
            path = ckpt.save_checkpoint(run_dir, step, state, keep=cfg.train.keep_checkpoints)
            last_good = path
        last_saved, last_save_time = step, time.monotonic()
        distributed.barrier()
        return path

    progress = Progress(total_steps, step, cfg.objective, bar=None if cfg.train.progress else False) if is_main else None
    checkpoint_seconds = 60.0 * cfg.train.checkpoint_minutes

    # Sources that can drop unreadable samples (csv, wds) may give ranks batches of different sizes, which
    # the feature gathers cannot take: trim every rank's batch to the smallest (one scalar all-reduce per step,
    # only for those sources and only with several processes).
    trim_batches = dist_info.distributed and cfg.data.source in ("csv", "wds")
    last_eval: dict[str, float] = {}
    t_last, samples_since = time.perf_counter(), 0
    skips = _skipped(stream.stats)
    model.train()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        if skip == 0:
            objective.on_epoch_start(epoch)
        if resolution.enter(step, model, optimizer):  # a new phase resized parameters (their AdamW state is reset)
            del train_model
            train_model = wrap(model)
            if is_main:
                print(f"step {step}: {resolution.describe()}")
        for batch in stream.iterate(epoch, skip, resolution.train_transform, resolution.tokenizer):
            if trim_batches:
                batch = distributed.trim_to_common_size(batch, device)
            images = batch["image"].to(device, non_blocking=True)
            texts = batch["text"].to(device, non_blocking=True)
            indices = batch["index"].to(device, non_blocking=True)

            # Schedules are pure functions of the step (step_thresh: of the temperature the last step left).
            for group in optimizer.param_groups:
                group["lr"] = param_group_lr(group, step, cfg.optim, total_steps, temp_thresh_hit)
            rho = rho_at(step, total_steps, cfg.temperature.rho, cfg.temperature.rho_final, cfg.temperature.rho_final_fraction)

            optimizer.zero_grad(set_to_none=True)
            loss, result = forward_backward(
                train_model, objective, images, texts, indices, step=step, epoch=epoch,
                scheme=cfg.temperature.scheme, rho=rho, autocast=lambda: autocast_context(cfg, device),
                backward=lambda total: scaler.scale(total).backward(), accum_steps=cfg.train.accum_steps,
            )
            # Checked once forward and backward are queued, so the wait for the value does not leave the GPU idle
            # while the host launches the backward pass; still before any parameter changes.
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; lower --optim.lr or check the data; "
                    f"{_last_good_text(last_good)}"
                )
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            else:
                grad_norm = torch.tensor(float("nan"))
            scaler.step(optimizer)
            scaler.update()
            clamp_logit_scale(model)
            step += 1
            samples_since += images.shape[0] * dist_info.world_size
            log_now = step % cfg.train.log_every == 0 or step == total_steps
            if log_now or watch_temperature(cfg.optim, temp_thresh_hit):
                # reading the temperature waits for the GPU: only when it is logged or the threshold is watched
                temperature = 1.0 / float(unwrap(model).logit_scale.detach().exp())
                temp_thresh_hit = step_thresh_hit(cfg.optim, temperature, temp_thresh_hit)

            if log_now:
                skips = _report_skips(stream.stats, progress, skips)
                now = time.perf_counter()
                rate = samples_since / max(now - t_last, 1e-9)
                t_last, samples_since = now, 0
                values = {
                    "epoch": epoch,
                    "loss": loss.detach(),
                    "objective_loss": result.loss.detach(),
                    "lr": optimizer.param_groups[0]["lr"],
                    "temperature": temperature,
                    "logit_scale": math.log(1.0 / temperature),
                    "rho": rho,
                    "grad_norm": grad_norm,
                    "samples_per_s": rate,
                    **resolution.log_values(),
                    **{f"obj/{k}": _to_float(v) for k, v in result.metrics.items()},
                }
                logger.log(step, values)
            if progress is not None:
                progress.update(step, {**values, "loss": float(values["loss"])} if log_now else None)
            # pre-emption and the time-based checkpoint: every process decides the same (one tiny all-reduce
            # per step, only with several processes)
            signalled, time_due = distributed.any_ranks(
                [stop.signum is not None,
                 checkpoint_seconds > 0 and time.monotonic() - last_save_time >= checkpoint_seconds], device)
            if signalled:
                path = save() if last_saved != step else last_good
                _exit_on_signal(stop, step, path, is_main)
            if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 or time_due) and step < total_steps:
                save()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                if is_main and (eval_sets[0] or eval_sets[1] is not None):
                    # at the current phase's resolution and context length
                    last_eval = run_evaluation(model, resolution.tokenizer, resolution.eval_transform, eval_sets, cfg,
                                               device)
                    logger.log(step, {f"eval/{k}": v for k, v in last_eval.items()})
                    model.train()
                distributed.barrier()
            if step >= total_steps or step == cfg.train.stop_at or resolution.is_boundary(step):
                break  # (a new phase restarts the data iterator at this step with its own transforms)
        if step == cfg.train.stop_at:
            break

    if progress is not None:
        progress.close()
    if last_saved != step:
        save()
    if step < total_steps:  # stopped early by train.stop_at
        if is_main:
            print(f"stopped at step {step} of {total_steps}; continue with --train.resume latest")
        logger.close()
        return RunResult(run_dir=run_dir, step=step)
    if is_main and (eval_sets[0] or eval_sets[1] is not None):
        last_eval = run_evaluation(model, tokenizer, eval_transform, eval_sets, cfg, device)
        logger.log(step, {f"eval/{k}": v for k, v in last_eval.items()})
    distributed.barrier()
    result = RunResult(run_dir=run_dir, step=step, metrics=last_eval, history=read_history(run_dir) if is_main else [])
    data_stats = _merged_stats(stream.stats)
    if is_main:
        logger.summary(finish_run(result, cfg, data_stats, device.type))
    logger.close()
    return result


def _last_good_text(path: Path | None) -> str:
    if path is None:
        return "no checkpoint was saved before this (start again)"
    return (f"last good checkpoint: {path} (continue from it with --train.resume {path} and "
            f"--train.resume-allow-changes KEYS for the settings you change, e.g. optim.lr)")


def _exit_on_signal(stop: StopRequest, step: int, path: Path | None, is_main: bool) -> None:
    """After a stop signal: say what was saved and exit 128 + the signal's number (the shell's convention)."""
    if is_main:
        print(f"received {stop.name} at step {step}: checkpoint {path} saved; continue with --train.resume latest",
              file=sys.stderr, flush=True)
    distributed.teardown()
    raise SystemExit(128 + int(stop.signum or 0))


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


def _resume_path(cfg: Config, run_dir: Path) -> Path | None:
    """`--train.resume latest|auto|PATH` -> the checkpoint to load (None: start fresh)."""
    what = cfg.train.resume
    if not what:
        return None
    if what in ("latest", "auto"):
        found = ckpt.latest_checkpoint(run_dir)
        if found is None and what == "latest":
            raise ConfigError(f"--train.resume latest: no checkpoint in {ckpt.checkpoint_dir(run_dir)}")
        return found
    return ckpt.resolve_checkpoint(what)


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

