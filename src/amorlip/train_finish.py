"""The files a finished run leaves: final weights or export (train.save_final / export_final), `summary.json`,
the training plot `training.png`, and the summary table on the console. Main rank only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amorlip import checkpoint as ckpt
from amorlip import reclip
from amorlip.config import Config
from amorlip.models import describe_precision, model_config
from amorlip.train_state import RunResult


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
