"""The trainer's metric sinks: `metrics.jsonl` (always, main rank; amorlip.history), TensorBoard and W&B.

`MetricsLogger` is what the training loop logs through; the file format, its writer and its reader live in
`amorlip.history`, the W&B run in `amorlip.logging_wandb`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from amorlip import history
from amorlip.config import Config
from amorlip.models import describe_precision


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
