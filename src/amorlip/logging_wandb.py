"""Weights & Biases logging, an optional extra (`pip install 'amorlip[wandb]'`, then `--train.wandb true`).

The trainer's MetricsLogger (main rank only) sends W&B the same scalars it writes to metrics.jsonl and TensorBoard,
the resolved config at the start and the run's summary at the end. The W&B run id is kept in the run folder
(`wandb_id.txt`), so a resumed run continues the same W&B run (`wandb.init(id=..., resume="allow")`). Offline
(`WANDB_MODE=offline`) it writes its files under the run folder, or under `WANDB_DIR` when that is set; upload
them later with `wandb sync`.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import string
from pathlib import Path
from typing import Any

from amorlip.errors import ConfigError

ID_FILE = "wandb_id.txt"
INSTALL = "pip install 'amorlip[wandb]'"


def available() -> bool:
    """Whether the wandb package can be imported (without importing it: that takes a second)."""
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules['wandb'] is None (import blocked)
        return False


def require_wandb() -> None:
    """ConfigError naming the install command when train.wandb is asked for and wandb is not installed."""
    if not available():
        raise ConfigError(f"train.wandb=true but the wandb package is not installed ({INSTALL}, or drop --train.wandb)")


def new_run_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, as W&B makes them)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with `a/b` keys (W&B's summary shows them as such)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


class WandbRun:
    """One W&B run for one amorlip run folder."""

    def __init__(self, run_dir: Path, project: str, name: str | None, tags: str | None, config: dict[str, Any],
                 resume: bool) -> None:
        require_wandb()
        import wandb

        run_dir = Path(run_dir)
        id_path = run_dir / ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.is_file() else ""
        run_id = run_id or new_run_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir)
        try:
            self.run = wandb.init(
                project=project, name=name or run_dir.name, config=config, id=run_id, resume="allow",
                tags=[t.strip() for t in (tags or "").split(",") if t.strip()] or None,
                reinit="finish_previous", **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - login, network or settings problems: one clear line
            raise ConfigError(f"W&B could not start: {' '.join(str(e).split())[:300]} (run `wandb login`, or set "
                              "WANDB_MODE=offline and upload later with `wandb sync`, or drop --train.wandb)") from None
        from amorlip.files import atomic_write_text

        atomic_write_text(run_id + "\n", id_path)
        # our step is a logged value, not W&B's own counter: a resumed run re-logs the steps after its checkpoint,
        # which W&B's monotonic step would drop
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.id = run_id

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.run.log({"step": step, **scalars})

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in _flat(values).items() if v is not None})

    def finish(self) -> None:
        self.run.finish()
