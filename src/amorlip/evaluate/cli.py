"""`amorlip eval`: evaluate a run folder, a training checkpoint or an exported open_clip checkpoint."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from amorlip import checkpoint as ckpt
from amorlip.config import Config, ConfigError, config_from_dict
from amorlip.data.sources import DEFAULT_SOURCE, HELD_OUT, SOURCES
from amorlip.distributed import pick_device

if TYPE_CHECKING:  # imported where used: the gradients module is only needed by --gradient-fidelity
    from amorlip.evaluate.gradients import TrainedState


@dataclass
class LoadedModel:
    model: torch.nn.Module
    train_transform: Any
    eval_transform: Any
    tokenizer: Any
    config: Config | None
    state: dict[str, Any]
    source: Path


def read_checkpoint(path: str) -> tuple[Path, dict[str, Any], Config | None]:
    """(checkpoint file, its contents on the CPU, its run config or None for an export) of `path`."""
    source = ckpt.resolve_checkpoint(path)
    state = ckpt.load_checkpoint(source, map_location="cpu")
    return source, state, config_from_dict(state["config"]) if "config" in state else None


def load_for_eval(path: str, model_name: str | None, device: torch.device,
                  preloaded: tuple[Path, dict[str, Any], Config | None] | None = None) -> LoadedModel:
    """Build the model of a run folder / training checkpoint / exported checkpoint and load its weights.

    A checkpoint saved in a low-resolution RECLIP phase is evaluated at the model's native resolution
    (positional embeddings interpolated), like its export. `preloaded`: `read_checkpoint(path)`'s result.
    """
    from amorlip.model_options import effective_model_config, model_kwargs
    from amorlip.models import create_model, model_config
    from amorlip.reclip import state_dict_at_image_size

    source, state, config = preloaded or read_checkpoint(path)
    weights = state.get("model") or state.get("state_dict")
    if weights is None:
        raise ConfigError(f"{source} holds no model weights (expected an amorlip or open_clip checkpoint)")
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    name = model_name or (config.model.name if config else state.get("name"))
    if not name:
        raise ConfigError(f"{source} does not name its model; pass --model NAME (an open_clip config name)")
    own = config is not None and name == config.model.name  # the run's forcing and preprocessing options
    overrides = model_kwargs(config.model) if own else {}
    if "logit_bias" in weights:
        overrides["init_logit_bias"] = float(weights["logit_bias"].reshape(-1)[0])
    model, train_tf, eval_tf, tokenizer = create_model(name, device=device, **overrides)
    model_cfg = effective_model_config(config.model) if own else model_config(name)
    model.load_state_dict(state_dict_at_image_size(weights, model_cfg))
    model.eval()
    return LoadedModel(model, train_tf, eval_tf, tokenizer, config, state, source)


def _is_class_folder(path: Path) -> bool:
    """A folder without .tar shards: read as an ImageNet-style folder (class sub-folders)."""
    return path.is_dir() and not any(path.glob("*.tar"))


def eval_data(config: Config | None, data: str | None, seed: int, source: Path | None = None,
              other_work: bool = False):
    """(zero-shot tasks, retrieval split) for `amorlip eval`; read and checked before any model.

    `data`: the name of a source with held-out sets of its own (`amorlip.data.sources.HELD_OUT`), or a path: a CSV
    or webdataset shards (retrieval), or an ImageNet-style folder of class sub-folders (zero-shot). None: what the
    run was evaluated on in training, its source's held-out sets plus its data.val_path / eval.imagenet_root. A
    run on a source without held-out sets (csv, wds) and without validation data is an error unless `other_work`
    (--datacomp / --normalizers): then there is nothing else to evaluate (a note says so)."""
    from amorlip.config import DataConfig
    from amorlip.data.loader import build_eval_data
    from amorlip.data.types import DataError

    data_cfg = config.data if config else DataConfig()
    if data in HELD_OUT:
        return build_eval_data(data_cfg, seed, source=data)
    if data is not None:
        from amorlip.data.imagefolder import imagenet_folder_task, val_pairs

        try:
            if _is_class_folder(Path(data).expanduser()):
                return [imagenet_folder_task(data, key="--data")], None
            return [], val_pairs(data, data_cfg.csv_img_key, data_cfg.csv_caption_key, data_cfg.csv_separator)
        except DataError as e:
            raise DataError(str(e).replace("--data.val-path", "--data").replace("data.val_path", "--data")) from None
    if config is None:
        print(f"note: {source} is an export without a run config: evaluating on the embedded synthetic data "
              "(pass --data PATH for your own: a CSV, webdataset shards or an ImageNet-style folder)")
        return build_eval_data(data_cfg, seed, source=DEFAULT_SOURCE)
    if SOURCES[data_cfg.source].held_out is None and not data_cfg.val_path and not config.eval.imagenet_root:
        if other_work:
            print(f"note: {source} was trained on data.source={data_cfg.source} without validation data "
                  "(data.val_path, eval.imagenet_root): no zero-shot or retrieval metrics (pass --data PATH for them)")
            return [], None
        raise ConfigError(
            f"{source} was trained on data.source={data_cfg.source} without validation data (data.val_path and "
            "eval.imagenet_root are unset), so there is nothing of its own to evaluate on (pass --data PATH: a CSV "
            "or webdataset shards of image-caption pairs, or an ImageNet-style folder; or --data synthetic)"
        )
    return build_eval_data(data_cfg, seed, imagenet_root=config.eval.imagenet_root)


def load_objective(loaded: LoadedModel, stream: Any, device: torch.device) -> torch.nn.Module:
    """The run's objective with its saved state (u buffers, lambda nets, prototypes), on `device`."""
    from amorlip import objectives
    from amorlip.models import model_config
    from amorlip.objectives.base import ObjectiveContext

    cfg = loaded.config
    if cfg is None:
        raise ConfigError(f"{loaded.source} is an export: it has no objective state (pass the run folder it came from)")
    objective_cls = objectives.get(cfg.objective)
    ctx = ObjectiveContext(dataset_size=stream.dataset_size, steps_per_epoch=stream.steps_per_epoch,
                           total_steps=max(1, int(loaded.state.get("step") or 1)), total_epochs=1,
                           embed_dim=int(model_config(cfg.model.name)["embed_dim"]),
                           local_batch_size=cfg.train.batch_size, device=device)
    objective = objective_cls(cfg.sections.get(objective_cls.section) if objective_cls.section else None, ctx).to(device)
    objective.load_state_dict(loaded.state["objective"])
    return objective


def run_normalizer_diagnostics(loaded: LoadedModel, device: torch.device, batch_size: int) -> dict[str, Any]:
    """The run's normalizer diagnostics (`amorlip.evaluate.normalizers.run_diagnostics`) for this checkpoint: its
    objective's estimates and the in-batch one against the reference, on eval.normalizer_size training pairs (the
    fixed subset the trainer uses) and held-out pairs; keys `normalizer/{train,heldout}/...`."""
    from amorlip import objectives
    from amorlip.data.loader import build_train_stream
    from amorlip.evaluate.normalizers import build_diagnostic_sets, run_diagnostics

    if loaded.config is None:
        raise ConfigError("--normalizers needs a training checkpoint or run folder (an export has no objective state)")
    cfg = loaded.config
    stream = build_train_stream(cfg.data, cfg.train.batch_size, cfg.train.seed,
                                needs_indices=objectives.get(cfg.objective).needs_indices)
    sets = build_diagnostic_sets(cfg, stream)
    objective = load_objective(loaded, stream, device)
    return run_diagnostics(loaded.model, objective, sets, loaded.eval_transform, loaded.tokenizer, device, batch_size)


def load_run_features(path: str, n_train: int | None = None, n_heldout: int = 2000, device: str = "auto",
                      batch_size: int = 512, progress: bool = False, preloaded: tuple | None = None):
    """`evaluate.features.encode_run` of the checkpoint or run folder `path` (`preloaded`: `read_checkpoint(path)`'s
    result, when the caller has read it already)."""
    from amorlip.evaluate.features import encode_run

    preloaded = preloaded or read_checkpoint(path)
    if preloaded[2] is None:
        raise ConfigError(f"{preloaded[0]} is an export without a run config: pass the run folder (its training "
                          "data defines the partition functions)")
    torch_device = pick_device(device)
    loaded = load_for_eval(path, None, torch_device, preloaded)
    return encode_run(loaded, torch_device, n_train, n_heldout, batch_size, progress)


def gradient_fidelity_options(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """(objectives, batch sizes) of --gradient-fidelity, checked (one-line ConfigError naming the flag)."""
    from amorlip import objectives

    names = [t.strip() for t in (args.gf_objectives or "").split(",") if t.strip()]
    unknown = [n for n in names if n not in objectives.REGISTRY]
    if not names or unknown:
        raise ConfigError(f"--gf-objectives: unknown or missing objective(s) {unknown or names} "
                          f"(choose from: {', '.join(objectives.REGISTRY)})")
    try:
        sizes = [int(t) for t in (args.gf_batch_sizes or "").split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--gf-batch-sizes {args.gf_batch_sizes!r}: write comma-separated integers, e.g. 16,64") from None
    if not sizes or min(sizes) < 2:
        raise ConfigError("--gf-batch-sizes needs batch sizes >= 2, e.g. 16,64,256")
    if args.gf_epochs < 2 or args.gf_warmup < 0 or (args.gf_pairs is not None and args.gf_pairs < 2):
        raise ConfigError("--gf-epochs must be >= 2 (the variance needs two visits), --gf-warmup >= 0, --gf-pairs >= 2")
    return names, sizes


def trained_state(preloaded: tuple, names: list[str], pairs: int | None) -> TrainedState:
    """--gf-trained-state: the checkpoint's objective state (`gradients.TrainedState`; steps per epoch and length
    are filled in once the data's size is known), checked: a training checkpoint, whose objective is measured,
    with every training pair."""
    from amorlip.evaluate.gradients import TrainedState

    source, state, config = preloaded
    if config is None or not isinstance(state.get("objective"), dict) or "step" not in state:
        raise ConfigError(f"--gf-trained-state: {source} holds no objective state (pass a training checkpoint or "
                          "run folder, not an export)")
    if config.objective not in names:
        raise ConfigError(f"--gf-trained-state: the run's objective {config.objective} is not among --gf-objectives "
                          f"{','.join(names)} (add it)")
    if pairs is not None:
        raise ConfigError("--gf-trained-state needs every training pair (its state is indexed by the dataset): "
                          "drop --gf-pairs")
    step = int(state["step"])
    return TrainedState(config.objective, state["objective"], step, int(state.get("epoch", 0)), 1, step)


def run_gradient_fidelity(args: argparse.Namespace, out: Path, preloaded: tuple,
                          trained: TrainedState | None) -> list[dict[str, Any]]:
    """--gradient-fidelity: `amorlip.evaluate.gradients` on the run's frozen features; prints a table and writes
    gradient_fidelity.png beside `out`. `preloaded`: the checkpoint as `read_checkpoint` read it; `trained`: what
    `trained_state` made of it for --gf-trained-state (checked before any evaluation), else None."""
    import sys

    from amorlip.evaluate.gradients import gradient_fidelity, plot_fidelity, fidelity_table

    names, sizes = gradient_fidelity_options(args)
    feats = load_run_features(args.checkpoint, args.gf_pairs, 0, args.device, progress=sys.stderr.isatty(),
                              preloaded=preloaded)
    print(f"gradient fidelity on {feats.describe()}")
    if trained is not None:  # the run's epoch as its map-style stream makes it (the last partial batch dropped)
        per_epoch = max(1, feats.dataset_size // feats.config.train.batch_size)
        trained = replace(trained, steps_per_epoch=per_epoch,
                          total_steps=feats.config.train.steps or feats.config.train.epochs * per_epoch)
        print(f"{trained.objective} starts from the state saved at step {trained.step} (epoch {trained.epoch})")
    records = gradient_fidelity(feats, names, sizes, warmup=args.gf_warmup, epochs=args.gf_epochs,
                                seed=feats.config.train.seed, trained=trained)
    print(fidelity_table(records))
    print(f"wrote {plot_fidelity(records, out.parent / 'gradient_fidelity.png')}")
    return records


def _check_writable(path: Path, flag: str) -> None:
    """`path` (a file to write) can be created: its folder is, or can be made, a writable folder."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder (pass a file name, e.g. {path / 'eval.json'})")
    existing = next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path} lies under {existing}, which is a file (pass another {flag})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {existing} (pass a writable {flag})")


def _check_args(args: argparse.Namespace, extra: list[str]) -> None:
    """Reject bad options before any model is loaded or evaluated (each message names the fix)."""
    if extra:
        raise ConfigError(f"unexpected arguments for eval: {' '.join(extra)} (see `amorlip eval --help`)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1 (pass e.g. --batch-size 256)")
    if getattr(args, "gradient_fidelity", False):
        gradient_fidelity_options(args)
    elif getattr(args, "gf_trained_state", False):
        raise ConfigError("--gf-trained-state is an option of --gradient-fidelity (pass both)")
    device = args.device
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ConfigError(f"--device {device!r} is not a device (pass --device auto, cpu or cuda)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} but no CUDA device is visible (pass --device cpu, or --device auto to use a GPU "
                "only when there is one)"
            )
    if args.data is not None and args.data not in HELD_OUT:
        from amorlip.data.imagefolder import val_format

        if val_format(args.data) == "csv" and not Path(args.data).expanduser().exists():
            raise ConfigError(
                f"--data {args.data!r} is neither {' nor '.join(HELD_OUT)} nor an existing path (pass a CSV file, "
                "webdataset shards or an ImageNet-style folder, or e.g. --data synthetic)"
            )
    if args.model is not None:
        from amorlip.models import model_names

        if args.model not in model_names():
            raise ConfigError(f"--model {args.model!r} is not a known model config (`amorlip models` lists them)")
    _check_datacomp(args)
    if args.out:
        _check_writable(Path(args.out), "--out")


def _check_datacomp(args: argparse.Namespace) -> None:
    """--datacomp ROOT and --datacomp-tasks: clip_benchmark installed, ROOT a folder holding a selected task."""
    if args.datacomp_tasks and not args.datacomp:
        raise ConfigError("--datacomp-tasks needs --datacomp ROOT (the folder of the clip_benchmark wds datasets)")
    if args.datacomp:
        from amorlip.evaluate.datacomp import DATACOMP_TASKS, find_task_dir, get_task, require_clip_benchmark

        require_clip_benchmark()

        root = Path(args.datacomp)
        if not root.exists():
            raise ConfigError(f"--datacomp {root} does not exist (pass the folder holding the DataComp wds datasets)")
        if not root.is_dir():
            raise ConfigError(f"--datacomp {root} is not a folder (pass the folder holding the DataComp wds datasets)")
        selected = list(DATACOMP_TASKS)
        if args.datacomp_tasks:
            try:
                selected = [get_task(t.strip()) for t in args.datacomp_tasks.split(",") if t.strip()]
            except KeyError as e:
                raise ConfigError(f"--datacomp-tasks: {e.args[0]} (pass comma-separated DataComp keys)") from None
            if not selected:
                raise ConfigError("--datacomp-tasks names no task (pass comma-separated DataComp keys, e.g. vtab/cifar10)")
        if all(find_task_dir(root, t)[0] is None for t in selected):
            example = selected[0]
            raise ConfigError(
                f"--datacomp {root} holds none of the {len(selected)} selected DataComp tasks (pass the folder with "
                f"one wds folder per task, e.g. {root / example.folder_names[0] / 'test' / 'nshards.txt'})"
            )


def data_description(data: str | None) -> str:
    """What was evaluated on: a source name, the absolute path given by --data, or "the run's own"."""
    if data is None:
        return "the run's own evaluation data"
    return data if data in HELD_OUT else str(Path(data).expanduser().resolve())


def default_out(source: Path, is_run: bool, data: str | None) -> Path:
    """Where results go without --out: RUN/eval.json (MODEL.eval.json for an export); with --data, one file per
    data set, `eval-NAME-HASH.json` (NAME: its last path part; HASH: of its absolute path, so that two folders
    called `val` do not overwrite each other's results)."""
    folder, stem = (source.parent.parent, "eval") if is_run else (source.parent, f"{source.stem}.eval")
    if data is not None:
        if data in HELD_OUT:
            stem += f"-{data}"
        else:
            path = Path(data_description(data))
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name).strip("._") or "data"
            stem += f"-{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"
    return folder / f"{stem}.json"


def run_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.evaluate import evaluate_model
    from amorlip.evaluate.report import format_table, write_json

    _check_args(args, extra)
    device = pick_device(args.device)
    preloaded = read_checkpoint(args.checkpoint)
    config = preloaded[2]
    trained = None  # --gf-trained-state is read and checked here, before any evaluation
    if args.gradient_fidelity and args.gf_trained_state:
        trained = trained_state(preloaded, gradient_fidelity_options(args)[0], args.gf_pairs)
    tasks, retrieval = eval_data(config, args.data, config.train.seed if config else 0, preloaded[0],
                                 other_work=bool(args.datacomp or args.normalizers))
    described = [f"zero-shot {t.name} ({len(t.dataset)} images, {len(t.classnames)} classes)" for t in tasks]
    if retrieval is not None:
        described.append(f"retrieval {retrieval.name} ({len(retrieval.dataset)} pairs)")
    if described:
        print("evaluating on: " + "; ".join(described))
    loaded = load_for_eval(args.checkpoint, args.model, device, preloaded)
    if args.normalizers and loaded.config is None:
        raise ConfigError(f"--normalizers needs a training checkpoint or run folder; {loaded.source} is an export "
                          "(pass the run folder it came from)")
    out = Path(args.out) if args.out else default_out(loaded.source, loaded.config is not None, args.data)
    if not args.out:
        _check_writable(out, "--out")
    results: dict[str, Any] = {"checkpoint": str(loaded.source), "step": loaded.state.get("step"),
                               "data": data_description(args.data)}
    results["metrics"] = evaluate_model(loaded.model, loaded.tokenizer, loaded.eval_transform, tasks, retrieval,
                                        device, args.batch_size, progress=True)
    print(format_table(results["metrics"]))
    if args.datacomp:
        from amorlip.evaluate.datacomp import aggregate, run_datacomp

        subset = [t.strip() for t in args.datacomp_tasks.split(",") if t.strip()] if args.datacomp_tasks else None
        dc = run_datacomp(loaded.model, loaded.eval_transform, loaded.tokenizer, args.datacomp, device,
                          tasks=subset, batch_size=args.batch_size, progress=True)
        results["datacomp"] = dc
        results["datacomp_summary"] = aggregate(dc)
        summary = results["datacomp_summary"]
        if summary["average"] is None:
            print(f"DataComp: no task scored (missing or failed: {', '.join(summary['missing'])})")
        else:
            label = "partial average" if summary["partial"] else "average"
            print(f"DataComp {label} over {summary['n_tasks']} tasks: {100 * summary['average']:.2f}"
                  + (f" (missing: {', '.join(summary['missing'])})" if summary["missing"] else ""))
    if args.gradient_fidelity:
        results["gradient_fidelity"] = run_gradient_fidelity(args, out, preloaded, trained)
    if args.normalizers:
        diag = run_normalizer_diagnostics(loaded, device, args.batch_size)
        results["normalizers"] = diag
        print(json.dumps(diag, indent=2))
    write_json(out, results)
    print(f"wrote {out}")
    return 0
