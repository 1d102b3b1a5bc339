"""Step-level checkpoints (atomic), resume, and export to a plain open_clip checkpoint."""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amorlip.errors import CheckpointError
from amorlip.files import (TMP_SUFFIX, atomic_write, atomic_write_text,  # noqa: F401 - re-exported
                           remove_stale_temporaries)

LATEST = "latest.txt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (files.atomic_write):
    a crash or a full disk leaves either the old file or the new one, never a truncated file."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True,
                 is_write_failure=lambda e: isinstance(e, RuntimeError) and _is_write_failure(e))


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("unexpected pos", "file write failed", "no space", "file too large",
                                   "errno", "write failed"))


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested state (dicts, lists) holding NaN or inf."""
    bad: list[str] = []
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(state, dict):
        for k, v in state.items():
            bad.extend(non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            bad.extend(non_finite_tensors(v, f"{prefix}[{i}]"))
    return bad


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, keeping the settings the optimizer was built with.

    torch restores each saved group's settings (lr, weight decay, betas, eps, ...) along with the moments, and
    the lr schedules scale a group's saved `base_lr`: a change accepted on resume (`--train.resume-allow-changes
    optim.lr`) would be recorded but not applied. The checkpoint gives the moments and step counts; the run's
    settings give every group's hyperparameters (the same values when nothing changed)."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: CPU torch, numpy, Python and, when CUDA is in use, its current device's
    (only that one: asking for every visible GPU's state would open a context on each from every rank)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s states. The tensors go back to the CPU first: a checkpoint loaded with
    map_location=cuda carries them on the GPU, and the RNG setters take CPU byte tensors only."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # every device's states (checkpoints of earlier versions)
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda.cpu())


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2,
                    protect: Path | None = None) -> Path:
    """Write `step_XXXXXXXX.pt` atomically, then point `latest.txt` at it, then prune old ones (all but the newest
    `keep`, and never `protect`: the newest checkpoint known to be good, see amorlip.train)."""
    ckdir = checkpoint_dir(run_dir)
    path = ckdir / f"step_{step:08d}.pt"
    atomic_save(state, path)
    atomic_write_text(path.name + "\n", ckdir / LATEST)
    if keep > 0:
        for old in sorted(ckdir.glob("step_*.pt"))[:-keep]:
            if protect is None or old != Path(protect):
                old.unlink(missing_ok=True)
    return path


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` is a whole checkpoint. torch.save writes a zip archive with a CRC-32 of
    every member, which torch.load does not check: a truncated file or a bit flipped on disk would load (or fail
    deep inside unpickling). zipfile's testzip reads every member and checks its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or damaged ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {bad} does not match its CRC-32 (a changed byte)")


def check_finite(state: dict[str, Any], path: Path) -> None:
    """Raise CheckpointError when a checkpoint's weights, optimizer or objective state hold NaN or inf."""
    bad = non_finite_tensors({k: state[k] for k in ("model", "optimizer", "objective") if k in state})
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite values ({len(bad)} tensors, e.g. {', '.join(bad[:3])}); resume "
            f"from an earlier one in {Path(path).parent} with --train.resume PATH")


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The run's checkpoints, the one `latest.txt` names first, then the step files from the newest."""
    first = latest_checkpoint(run_dir)
    files = sorted(checkpoint_dir(run_dir).glob("step_*.pt"), reverse=True)
    return ([first] if first is not None else []) + [f for f in files if f != first]


def latest_whole_checkpoint(run_dir: Path, say: Any = print) -> Path | None:
    """The newest checkpoint that `verify_checkpoint` accepts; each damaged newer one is passed over with a line
    (`say`). CheckpointError when every one is damaged."""
    candidates = checkpoints_newest_first(run_dir)
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            say(f"warning: {e}; trying the one before it")
    if candidates:
        raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(run_dir)} (each is damaged); start a new "
                              "run with --train.name NEW_NAME")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest.txt` names (falling back to the newest complete step file)."""
    ckdir = checkpoint_dir(run_dir)
    pointer = ckdir / LATEST
    if pointer.is_file():
        candidate = ckdir / pointer.read_text().strip()
        if candidate.is_file():
            return candidate
    files = sorted(ckdir.glob("step_*.pt"))
    return files[-1] if files else None


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"checkpoint {path} could not be read ({e}); pick an earlier one in {path.parent}") from e


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run folder (its latest checkpoint)."""
    p = Path(path_or_run)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"run folder {p} has no checkpoint yet (looked in {checkpoint_dir(p)})")
        return found
    if p.is_file():
        return p
    raise CheckpointError(f"{p} is neither a checkpoint file nor a run folder")


def export_open_clip(checkpoint: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write a plain open_clip checkpoint (`{'epoch', 'state_dict'}`) and the model's config JSON beside it.

    Load with `open_clip.add_model_config(<json>)` (custom configs) then
    `open_clip.create_model_and_transforms(name, pretrained=<out>)`.
    """
    import json

    from amorlip.config import config_from_dict
    from amorlip.hf_cache import safe_name
    from amorlip.model_options import effective_model_config
    from amorlip.reclip import state_dict_at_image_size

    # Check the destination before reading anything: a path under a file or in a read-only folder fails here,
    # with nothing written, rather than after the checkpoint has been loaded and converted.
    out = Path(out)
    folder = out.parent if out.suffix == ".pt" else out
    if out.suffix == ".pt" and out.is_dir():
        raise CheckpointError(f"cannot export to {out}: it is a folder (pass a .pt file name or a folder as --out)")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot export to {out}: {folder} is a file (pass a .pt file name or a folder as --out)")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise CheckpointError(f"cannot export to {out}: {existing} is a file, not a folder (pass another --out)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot export to {out}: {existing} is not writable (pass a writable --out)")

    source = resolve_checkpoint(checkpoint)
    ck = load_checkpoint(source)
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise CheckpointError(
            f"{source} is not an amorlip training checkpoint (no config or model weights; "
            "export a run folder or one of its checkpoints/step_*.pt)"
        )
    name = ck["config"]["model"]["name"]
    if out.suffix != ".pt":
        out = out / f"{safe_name(name)}.pt"
    # the model as trained (model.force_image_size, force_quick_gelu, ...); a checkpoint saved in a
    # low-resolution RECLIP phase is exported at the model's native resolution
    config = effective_model_config(config_from_dict(ck["config"]).model)
    weights = state_dict_at_image_size(ck["model"], config)
    state = {"epoch": ck.get("epoch", 0), "step": ck["step"], "name": name, "state_dict": weights}
    atomic_save(state, out)
    if "logit_bias" in ck["model"]:  # SigLIP-style models carry a learnable bias
        config["init_logit_bias"] = float(ck["model"]["logit_bias"].reshape(-1)[0])
    config_path = out.parent / f"{safe_name(name)}.json"
    atomic_write_text(json.dumps(config, indent=2), config_path)
    return out, config_path
