"""Which settings a resumed run may change, and the identity of a run's settings.

A checkpoint stores the configuration it was made with. Resuming it with settings that change what the
run computes (lr, batch, data, objective options, ...) would silently mix two runs, so `check_resume`
refuses such a resume and names the keys, unless the user accepts them with
`--train.resume-allow-changes KEY,...`. Keys that only change how a run is watched, saved or placed
(`NEUTRAL_KEYS`) may always change. `config_hash` identifies the settings that change results; `compare`
puts it in its run names so that an ablation never reuses another's runs.

Keys added after the first release are listed in `LATE_KEYS` with their default: at that default they are left
out of `result_keys` (so of `config_hash`, and a run folder made before the key existed keeps its name and its
finished results), and a saved config that lacks one is compared as if it held the default. A new result-changing
key goes there, with the default its dataclass field has (tests/test_late_keys.py checks both).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from amorlip.data.sources import SOURCES

# Keys that never change the trained weights: logging, checkpoint cadence, evaluation, placement, speed knobs.
NEUTRAL_KEYS = frozenset({
    "train.resume", "train.resume_allow_changes", "train.name", "train.output_dir", "train.progress",
    "train.log_every", "train.tensorboard", "train.checkpoint_every", "train.checkpoint_minutes",
    "train.keep_checkpoints", "train.eval_every", "train.stop_at", "train.threads", "train.device",
    "train.tf32", "train.cudnn_benchmark", "model.compile",
    "data.val_size", "data.eval_size", "data.val_path", "data.max_skip_fraction", "data.max_empty_batches",
    "train.wandb", "train.wandb_project", "train.wandb_name", "train.wandb_tags", "train.save_final",
    "train.export_final",
    # memory knobs: the same math (up to the order of floating-point sums)
    "train.accum_steps", "model.grad_checkpointing", "optim.fused",
    # read only by a fresh run: a resumed one takes its weights from the checkpoint
    "model.pretrained",
})
NEUTRAL_SECTIONS = frozenset({"eval"})
# Keys that cannot be accepted as changes: the saved state does not fit another objective or model.
STRUCTURAL_KEYS = ("objective", "model.name")
WORLD_SIZE = "world_size"
# Result-changing keys added after the first release -> their default (see the module docstring).
LATE_KEYS: dict[str, Any] = {
    "model.force_quick_gelu": False,
    "model.force_image_size": None,
    "model.force_patch_dropout": None,
    "model.image_mean": None,
    "model.image_std": None,
    "model.image_interpolation": None,
    "model.image_resize_mode": None,
    "aug.scale": None,
    "aug.ratio": None,
    "aug.color_jitter": None,
    "aug.color_jitter_prob": None,
    "aug.gray_scale_prob": None,
    "aug.re_prob": None,
    "aug.re_count": None,
    "aug.use_timm": False,
}


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """`{'train': {'lr': 1}}` -> `{'train.lr': 1}` (one level of sections, as `Config.to_dict()` writes)."""
    out: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        else:
            out[section] = values
    return out


def is_neutral(key: str, source: str | None) -> bool:
    """Whether changing `key` leaves the trained weights as they are (with the run's data `source`)."""
    if key in NEUTRAL_KEYS or key.split(".", 1)[0] in NEUTRAL_SECTIONS:
        return True
    # map-style sources seed every sample's augmentation by its index: the worker count does not matter
    # there; webdataset's split of shards over workers does depend on it.
    return key == "data.workers" and (source not in SOURCES or SOURCES[source].map_style)


def result_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened settings that change what a run computes."""
    flat = flatten(config)
    source = flat.get("data.source")
    return {k: v for k, v in flat.items()
            if not is_neutral(k, source) and not (k in LATE_KEYS and _same(v, LATE_KEYS[k]))}


def _same(value: Any, default: Any) -> bool:
    """`value == default`, a tuple equal to the list a YAML file reads back."""
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)  # noqa: E731
    return norm(value) == norm(default)


def config_hash(config: dict[str, Any], length: int = 8) -> str:
    """A short, stable hash of the settings that change results (`Config.to_dict()` input)."""
    text = json.dumps(result_keys(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def differences(saved: dict[str, Any], requested: dict[str, Any], saved_world: int | None,
                requested_world: int) -> dict[str, tuple[Any, Any]]:
    """Result-changing keys whose values differ: key -> (saved, requested).

    A key the saved config lacks (made by an earlier version, before the key existed) is not compared, but for
    the `LATE_KEYS`, which had their default then.
    """
    old, new = result_keys(saved), result_keys(requested)
    for key, default in LATE_KEYS.items():  # left out at their default (or absent: saved before they existed)
        if key in old or key in new:
            old.setdefault(key, default)
            new.setdefault(key, default)
    diff = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}
    if saved_world is not None and saved_world != requested_world:
        diff[WORLD_SIZE] = (saved_world, requested_world)
    return diff


def parse_allowed(text: str | None) -> set[str]:
    """`'optim.lr, train.batch-size'` -> {'optim.lr', 'train.batch_size'}."""
    return {k.strip().replace("-", "_") for k in (text or "").split(",") if k.strip()}


def check_resume(saved: dict[str, Any], requested: dict[str, Any], saved_world: int | None, requested_world: int,
                 allow: str | None, where: str) -> dict[str, tuple[Any, Any]]:
    """Raise ValueError (with the fix) when a resume would change results without the user's say-so.

    Returns the accepted differences (the caller reports them).
    """
    diff = differences(saved, requested, saved_world, requested_world)
    structural = [k for k in STRUCTURAL_KEYS if k in diff]
    if structural:
        shown = ", ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in structural)
        raise ValueError(f"{where} was made with another {' and '.join(structural)} ({shown}); its state cannot "
                         f"continue this run (start a new run with --train.name NEW_NAME)")
    allowed = parse_allowed(allow)
    refused = {k: v for k, v in diff.items() if k not in allowed and "all" not in allowed}
    if refused:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        keys = ",".join(sorted(refused))
        raise ValueError(f"{where} was made with other settings: {shown}; resuming would mix two runs (start a new "
                         f"run with --train.name NEW_NAME, or accept the change with "
                         f"--train.resume-allow-changes {keys})")
    return diff
