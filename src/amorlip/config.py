"""Run configuration: plain dataclasses, YAML presets, dotted command-line overrides, validation.

A preset YAML mirrors the dataclasses (`train: {batch_size: 64}`); the command line overrides any key
with `--section.key value` (dashes or underscores). Unknown keys are an error listing the valid ones.
Objective options live in a section named by the objective (e.g. `amor:` for AmorLIP), declared by the
objective's own `Config` dataclass (kept in `amorlip.objectives.options`), so adding an objective never touches
this file. Building and validating a config imports neither torch nor open_clip (model configs are read from
their JSON files, `amorlip.model_catalog`), except for the checks that need them: model.pretrained, a CUDA
device or fp16, and the validation data paths.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Callable, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from amorlip.errors import ConfigError  # noqa: F401 - re-exported (amorlip.config.ConfigError)
from amorlip.data.sources import DEFAULT_SOURCE, SOURCES, SourceName
from amorlip.objectives.registry import DEFAULT_OBJECTIVE

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    """The model: an open_clip config, its precision, compilation."""

    name: str = "tiny-vit"
    """Any open_clip model config name (RN50, ViT-B-32, ...) or a registered tiny config."""
    precision: Literal["fp32", "bf16", "fp16", "amp_bf16", "pure_bf16"] = "fp32"
    """fp32 | bf16 = amp_bf16 (bf16 autocast, fp32 weights; CUDA or CPU) | fp16 (autocast + grad scaler, CUDA only) | pure_bf16 (bf16 weights and optimizer state, no autocast)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    pretrained: str | None = None
    """Initial weights: an open_clip checkpoint or state dict (.pt), an `amorlip export` folder or .pt, or an open_clip pretrained tag already in the local cache (never downloaded); not re-loaded on resume."""
    lock_image: bool = False
    """LiT: freeze the image tower (open_clip's lock_image_tower); frozen parameters get no optimizer state."""
    lock_image_unlocked_groups: int = 0
    """lock_image: leave this many last layer groups of the image tower trainable (0 = all frozen)."""
    lock_image_freeze_bn_stats: bool = False
    """lock_image: also freeze batch-norm statistics (ResNet and timm towers)."""
    lock_text: bool = False
    """Freeze the text tower (open_clip's lock_text_tower); frozen parameters get no optimizer state."""
    lock_text_unlocked_layers: int = 0
    """lock_text: leave this many last layer groups of the text tower trainable (0 = all frozen)."""
    lock_text_freeze_layer_norm: bool = True
    """lock_text: freeze the layer norms too (false only for Hugging Face text towers)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (open_clip's set_grad_checkpointing): less memory, more time."""


@dataclass
class DataConfig:
    """Training and evaluation data."""

    source: SourceName = DEFAULT_SOURCE
    """synthetic | csv | wds | fashion-mnist."""
    train_path: str | None = None
    """CSV file, or webdataset shard pattern (brace notation, `::` joins several), or a shard directory."""
    dataset_size: int | None = None
    """Number of training samples (needed for webdataset when the shards carry no size file)."""
    synthetic_size: int = 20000
    """Train-stream size of the embedded synthetic data (one epoch)."""
    val_size: int = 500
    """Held-out retrieval pairs."""
    eval_size: int = 400
    """Images per zero-shot task."""
    csv_img_key: str = "filepath"
    """csv: column holding the image paths."""
    csv_caption_key: str = "title"
    """csv: column holding the captions."""
    csv_separator: str = ","
    """csv: field separator."""
    fmnist_root: str | None = None
    """Folder with Fashion-MNIST IDX files (default: where Debian's dataset-fashion-mnist puts them)."""
    workers: int = 0
    """DataLoader worker processes per training process (0 = load in the training process)."""
    resampled: bool = False
    """webdataset: sample shards with replacement (infinite stream)."""
    train_num_samples: int | None = None
    """webdataset: samples per epoch (open_clip's --train-num-samples); None = dataset_size."""
    max_empty_batches: int = 20
    """Stop with an error after this many batches in a row without one usable sample."""
    max_skip_fraction: float = 0.5
    """Stop with an error once more than this fraction of the samples read is unusable (1 = never)."""
    val_path: str | None = None
    """Validation image-caption pairs for retrieval R@1/5/10: a CSV like train_path's, or webdataset shards."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (warm-up, then cosine, const or const-cooldown)."""

    lr: float = 1e-3
    """Peak AdamW learning rate (after the linear warm-up; then as optim.lr_scheduler says)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices (gains, biases and embeddings get none, as in open_clip)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up from 0."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    fused: bool | None = None
    """AdamW's fused kernel (one pass over each parameter instead of one per operation: on a tiny model on the
    CPU the optimizer step is about 10x faster); None = fused on the CPU and CUDA, false = torch's default
    implementation (open_clip's). The same update up to floating-point rounding."""
    lr_temperature: float | None = None
    """Learning rate of logit_scale (and logit_bias); None = same as lr."""
    temperature_step_thresh: bool = False
    """Divide the temperature lr by 3 while the temperature 1/s is 0.03 or below (re-checked every step)."""
    temperature_step_thresh_latch: bool = False
    """step_thresh: once 1/s has reached 0.03, keep the lower rate for the rest of the run (no re-check)."""
    lr_temperature_schedule: Literal["const", "same-as-lr"] | None = None
    """const | same-as-lr (optim.lr_scheduler's shape); None: const when lr_temperature is set (releases), else
    same-as-lr."""
    lr_scheduler: Literal["cosine", "const", "const-cooldown"] = "cosine"
    """After the warm-up (open_clip's --lr-scheduler): cosine decay to min_lr at the last step; const; or
    const-cooldown: const, then a decay to lr_cooldown_end over the last lr_cooldown_steps."""
    min_lr: float = 0.0
    """cosine: the rate at the last step (the floor; absolute, at most lr)."""
    lr_cooldown_steps: int | None = None
    """const-cooldown: length of the cooldown, the last N steps of the run (required there; open_clip counts
    epochs: --epochs-cooldown E is E * steps per epoch here)."""
    lr_cooldown_power: float = 1.0
    """const-cooldown: decay (1 - t) ** power over the cooldown, t from 0 to 1 (1 = linear)."""
    lr_cooldown_end: float = 0.0
    """const-cooldown: the rate at the last step (absolute, at most lr)."""


@dataclass
class TemperatureConfig:
    """How the learnt temperature 1/s enters the loss."""

    scheme: Literal["auto", "plain", "rescaled"] = "auto"
    """plain: optimise L. rescaled: L / sg(s) + rho / s (FastCLIP; AmorLIP App. D). auto: what the objective
    needs (rescaled for FastCLIP-v3, whose temperature update is written for it; plain otherwise)."""
    rho: float = 6.5
    """rho of the rescaled scheme (its term rho / s)."""
    rho_final: float | None = None
    """rho for the last `rho_final_fraction` of training (None keeps rho throughout)."""
    rho_final_fraction: float = 0.25
    """Fraction of the training steps, at the end, that use rho_final."""


@dataclass
class TrainConfig:
    """The training run: length, device, run folder, checkpoints, logging."""

    batch_size: int = 64
    """Global batch size (split evenly across processes)."""
    accum_steps: int = 1
    """Cached-feature accumulation (GradCache): each process's batch runs as this many micro-batches (features
    first without autograd, the objective once on the whole batch, then each micro-batch's backward), so the
    memory is that of one micro-batch and the result that of the whole batch. Must divide the per-process
    batch. Exact for models without BatchNorm (ViTs); ResNets see micro-batch statistics."""
    steps: int | None = 600
    """Total optimizer steps; None = epochs * steps per epoch."""
    epochs: int | None = None
    """Used when steps is None."""
    seed: int = 0
    """Seed of the model initialisation, data order and objective state."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when a GPU is visible, else cpu."""
    output_dir: str = "runs"
    """Folder holding the run folders."""
    name: str | None = None
    """Run folder name under output_dir (default: objective-model-seed)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = by time only, see checkpoint_minutes, and at the end)."""
    checkpoint_minutes: float = 30.0
    """Also save a checkpoint when this many minutes have passed since the last one (0 = off). SIGTERM and
    SIGUSR1 (pre-emption) always save one before the run exits."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0 = all)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    log_every: int = 10
    """Log (metrics.jsonl, progress line) every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files in the run folder."""
    resume: str | None = None
    """`latest` (the run folder's newest checkpoint), `auto` (latest if there is one, else start fresh) or a
    checkpoint path. Refused when the checkpoint was made with settings that change results."""
    resume_allow_changes: str | None = None
    """Comma-separated keys a resume may change (e.g. optim.lr,train.steps; `all` for any; world_size for
    another process count); others that differ from the checkpoint's settings are an error."""
    stop_at: int | None = None
    """Stop after this global step (checkpoint saved; schedules still span the whole run): for time-limited jobs."""
    progress: bool = True
    """Show a progress bar on a terminal (a plain line every log_every steps otherwise)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    tf32: bool = True
    """CUDA: fp32 matmuls and convolutions may use TF32 tensor cores (as open_clip's trainer sets)."""
    cudnn_benchmark: bool = True
    """CUDA: let cuDNN time and pick its fastest convolution algorithms (as open_clip's trainer sets)."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'amorlip[wandb]'; WANDB_MODE=offline works without network)."""
    wandb_project: str = "amorlip"
    """W&B project."""
    wandb_name: str | None = None
    """W&B run name (default: the run folder's name)."""
    wandb_tags: str | None = None
    """Comma-separated W&B tags."""
    save_final: Literal["full", "weights"] = "full"
    """full: keep checkpoints as keep_checkpoints says. weights: also write RUN/final_weights.pt (the model only) and keep only the final full checkpoint."""
    export_final: bool = False
    """At the end, export the final model as an open_clip checkpoint into RUN/export/ (as `amorlip export` does)."""


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    batch_size: int = 256
    """Evaluation batch size."""
    zeroshot: bool = True
    """Run the zero-shot classification tasks."""
    retrieval: bool = True
    """Run image-text retrieval on the held-out pairs."""
    imagenet_root: str | None = None
    """ImageNet-style folder (one sub-folder of images per class, e.g. n01440764/) for zero-shot classification."""
    normalizers: bool = False
    """Normalizer diagnostics at every evaluation: MSE and bias of the in-batch and of the objective's own log
    partition estimates against the reference, per modality, on eval.normalizer_size training pairs (a fixed
    subset) and held-out pairs; logged as eval/normalizer/... (docs/evaluation.md)."""
    normalizer_size: int = 512
    """Pairs per split of eval.normalizers (the reference costs n^2 similarities; the in-batch B is capped at n)."""


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "temperature": TemperatureConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def objective_sections() -> dict[str, type]:
    """Config sections declared by the registered objectives (section name -> dataclass), in registry order."""
    from amorlip.objectives.registry import REGISTRY

    out: dict[str, type] = {}
    for entry in REGISTRY.values():
        out.setdefault(entry.section, entry.options)
    return out


def extra_sections() -> dict[str, type]:
    """Sections contributed by optional features (e.g. the RECLIP resolution schedule)."""
    from amorlip.reclip_options import ResolutionConfig

    return {"resolution": ResolutionConfig}


@dataclass
class Config:
    objective: str = DEFAULT_OBJECTIVE
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sections: dict[str, Any] = field(default_factory=dict)
    """Objective and feature sections, by name (filled with defaults by `default_config`)."""

    def section(self, name: str) -> Any:
        return self.sections[name]

    @property
    def run_dir(self) -> Path:
        """The run's folder: train.output_dir / (train.name, or objective-model-bBATCH-sSEED)."""
        t = self.train
        return Path(t.output_dir) / (t.name or f"{self.objective}-{self.model.name}-b{t.batch_size}-s{t.seed}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objective": self.objective}
        for name in CORE_SECTIONS:
            out[name] = asdict(getattr(self, name))
        for name, value in self.sections.items():
            out[name] = asdict(value)
        return out


def all_section_types() -> dict[str, type]:
    return {**CORE_SECTIONS, **objective_sections(), **extra_sections()}


def default_config() -> Config:
    cfg = Config()
    for name, typ in {**objective_sections(), **extra_sections()}.items():
        cfg.sections[name] = typ()
    return cfg


def _section_obj(cfg: Config, name: str) -> Any:
    if name in CORE_SECTIONS:
        return getattr(cfg, name)
    if name in cfg.sections:
        return cfg.sections[name]
    close = difflib.get_close_matches(name, ["objective", *CORE_SECTIONS, *cfg.sections], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        f"unknown config section {name!r}{hint}; valid sections: "
        f"{', '.join(['objective', *CORE_SECTIONS, *cfg.sections])}"
    )


def _valid_keys(obj: Any) -> list[str]:
    return [f.name for f in fields(obj)]


# ----------------------------------------------------------------------------------------------------
# The parser: jsonargparse reads the sections' type hints and attribute docstrings, so `--help` shows each
# key's meaning, type, default and choices, and every value (command line or YAML) is converted and checked
# by it. We keep three things of our own around it: the `--section.key` spelling with dashes, the open_clip
# aliases, and one-line error messages that name the fix.

OPEN_CLIP_FLAGS: dict[str, str] = {
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "epochs": "train.epochs",
    "model": "model.name",
    "train_data": "data.train_path",
    "dataset_type": "data.source",
    "resume": "train.resume",
    "precision": "model.precision",
    "workers": "data.workers",
    "seed": "train.seed",
    "wd": "optim.weight_decay",
    "warmup": "optim.warmup_steps",
    "beta1": "optim.beta1",
    "beta2": "optim.beta2",
    "eps": "optim.eps",
    "grad_clip_norm": "optim.grad_clip",
    "name": "train.name",
    "logs": "train.output_dir",
    "device": "train.device",
}
"""open_clip's training flags (`--batch-size 32`) that mean one of our keys: accepted as aliases on `train` and
`compare` (and listed under `amorlip train --help`)."""


def flag_of(key: str) -> str:
    """The command-line spelling of a dotted key: `train.batch_size` -> `--train.batch-size`."""
    return "--" + key.replace("_", "-")


def _section_key_types(sections: dict[str, type]) -> dict[str, Any]:
    out: dict[str, Any] = {"objective": str}
    for section, typ in sections.items():
        hints = get_type_hints(typ)
        for f in fields(typ):
            out[f"{section}.{f.name}"] = hints[f.name]
    return out


def _type_name(typ: Any) -> str:
    if typ is type(None):
        return "none"
    if get_origin(typ) is Literal:
        return " | ".join(str(a) for a in get_args(typ))
    if get_origin(typ) in (Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(typ))
    return getattr(typ, "__name__", str(typ)) if get_origin(typ) is None else str(typ).replace("typing.", "")


def _choices(typ: Any) -> tuple[Any, ...]:
    if get_origin(typ) is Literal:
        return get_args(typ)
    if get_origin(typ) in (Union, UnionType):
        return tuple(c for a in get_args(typ) for c in _choices(a))
    return ()


def _optional(typ: Any) -> bool:
    return get_origin(typ) in (Union, UnionType) and type(None) in get_args(typ)


def _formatter_class() -> type:
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        """jsonargparse's help, with keys spelled as users type them (`--train.batch-size`)."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            # keep the line breaks of descriptions and epilogs (each line is wrapped on its own)
            return "\n".join(indent + line if line.startswith("  ") else
                             super(HelpFormatter, self)._fill_text(line, width, indent) if line.strip() else ""
                             for line in text.splitlines())

        def _format_action_invocation(self, action: Any) -> str:
            text = super()._format_action_invocation(action)
            for opt in action.option_strings:
                if "." in opt:
                    text = text.replace(opt, opt.replace("_", "-"))
            return text

    return HelpFormatter


def _objective_names() -> list[str]:
    from amorlip.objectives.registry import REGISTRY

    return list(REGISTRY)


def _aliases_help() -> str:
    pairs = [f"  --{k.replace('_', '-'):<16} = {flag_of(v)}" for k, v in OPEN_CLIP_FLAGS.items()]
    return "open_clip's spellings are accepted as aliases:\n" + "\n".join(pairs)


def config_parser(prog: str = "amorlip train", description: str | None = None,
                  add_options: Callable[[Any], None] | None = None) -> Any:
    """A jsonargparse parser for `prog`: the command's own options (`add_options(parser)`), `--objective` and
    one group per config section (`--section.key VALUE`, help from the fields' docstrings)."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = jsonargparse.ArgumentParser(
        prog=prog, description=description, exit_on_error=False, formatter_class=_formatter_class(),
        usage=f"{prog} [options] [--SECTION.KEY VALUE ...]",
        epilog="Every key is also accepted with underscores (--train.batch_size) and as --key=value; `none` unsets "
               "a key whose type allows null. Setting one of train.steps / train.epochs derives the other.\n\n"
               + _aliases_help(),
    )
    if add_options is not None:
        add_options(parser)
    names = _objective_names()
    parser.add_argument("--objective", choices=names, metavar="{" + ",".join(names) + "}", default=DEFAULT_OBJECTIVE,
                        help="the training objective; its options are the section of the same name below")
    for section, typ in all_section_types().items():
        parser.add_class_arguments(typ, nested_key=section, fail_untyped=False, instantiate=False)
        group = parser.groups[section]
        doc = "" if not typ.__doc__ or typ.__doc__.startswith(typ.__name__ + "(") else typ.__doc__
        doc = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0].rstrip(".")
        group.title = f"[{section}]" + (f" {doc}" if doc else "")
        # jsonargparse adds `--section FILE` (load one section from a file): our YAML presets do that job
        loader = parser._option_string_actions.pop("--" + section, None)
        if loader is not None:
            parser._actions.remove(loader)
            group._group_actions.remove(loader)
    return parser


@functools.lru_cache(maxsize=1)
def _value_parser(key_set: tuple[str, ...]) -> Any:
    return config_parser("amorlip")


def _key_types() -> dict[str, Any]:
    return _cached_key_types(tuple(all_section_types().items()))


@functools.lru_cache(maxsize=4)
def _cached_key_types(sections: tuple[tuple[str, type], ...]) -> dict[str, Any]:
    return _section_key_types(dict(sections))


def _value_error(key: str, value: Any, typ: Any) -> ConfigError:
    choices = _choices(typ)
    if choices:
        return ConfigError(
            f"{key}={value!r} is not one of: {', '.join(map(str, choices))} "
            f"(pass {flag_of(key)} {nearest_choice(value, choices)}, or another of them)"
        )
    if isinstance(value, str):  # show what was typed as YAML reads it: `16`, not `'16'`
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    return ConfigError(f"{key}: cannot read {value!r} as {_type_name(typ)} (see `amorlip train --help`)")


def _as_text(value: Any, typ: Any) -> str:
    """A value as the command line would spell it (YAML values arrive typed; the parser reads text)."""
    if isinstance(value, str):
        if _optional(typ) and value.strip().lower() in ("none", "null", "~"):
            return "null"
        if value.strip().lower() in ("inf", "+inf", "-inf", "nan") and float in (typ, *get_args(typ)):
            return value.strip().lower().replace("inf", ".inf").replace("nan", ".nan").lstrip("+")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return json.dumps(value)


def convert(key: str, value: Any) -> Any:
    """`value` (text or a YAML value) converted to the type of the dotted `key` by the parser (ConfigError if not)."""
    types = _key_types()
    typ = types[key]
    if value is None and not _optional(typ):
        raise ConfigError(f"{key} cannot be null (pass a value, see `amorlip train --help`)")
    parser = _value_parser(tuple(types))
    try:
        ns = parser.parse_args([f"--{key}={_as_text(value, typ)}"], defaults=False)
    except (argparse.ArgumentError, TypeError, ValueError):
        raise _value_error(key, value, typ) from None
    return ns[key]


def _set(cfg: Config, dotted: str, value: Any) -> str:
    """Set `section.key` (dashes allowed); returns the canonical dotted key."""
    dotted = dotted.replace("-", "_")
    if dotted == "objective":
        names = _objective_names()
        if str(value) not in names:
            raise ConfigError(f"unknown objective {value!r}; choose one of: {', '.join(names)}")
        cfg.objective = str(value)
        return dotted
    if "." not in dotted:
        target = OPEN_CLIP_FLAGS.get(dotted)
        hint = f"our key is {target}, " if target else ""
        raise ConfigError(f"unknown key {dotted!r}: {hint}keys look like section.key, e.g. train.batch_size")
    section, key = dotted.split(".", 1)
    obj = _section_obj(cfg, section)
    if key not in _valid_keys(obj):
        close = difflib.get_close_matches(key, _valid_keys(obj), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown key {section}.{key}{hint}; valid keys in [{section}]: {', '.join(_valid_keys(obj))}"
        )
    setattr(obj, key, convert(dotted, value))
    return dotted


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` (dashes allowed) to `value`, converted to the declared type by the parser."""
    _set(cfg, dotted, value)


def _apply_pairs(cfg: Config, pairs: list[tuple[str, Any]], origin: str, derive: bool = True) -> None:
    """Apply one layer of settings (a YAML file, or the command line). With `derive`, a layer that sets one of
    train.steps / train.epochs unsets the other (it is derived from it); setting both is an error."""
    given: dict[str, Any] = {}
    for key, value in pairs:
        canonical = _set(cfg, key, value)
        given[canonical] = getattr(cfg.train, canonical.split(".", 1)[1]) if canonical in (
            "train.steps", "train.epochs") else None
    if not derive:
        return
    steps, epochs = given.get("train.steps"), given.get("train.epochs")
    if steps is not None and epochs is not None:
        raise ConfigError(
            f"{origin}: train.steps={steps} and train.epochs={epochs} are both set, but one is derived from the "
            "other (set only one: --train.steps N, or --train.epochs N)"
        )
    if epochs is not None:
        cfg.train.steps = None
    elif steps is not None:
        cfg.train.epochs = None


def _dict_pairs(data: dict[str, Any], origin: str) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    for section, values in data.items():
        if section in ("base", "description"):
            continue
        if section == "objective":
            pairs.append(("objective", values))
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys to values")
        pairs.extend((f"{section}.{key}", value) for key, value in values.items())
    return pairs


def apply_dict(cfg: Config, data: dict[str, Any], origin: str = "config") -> None:
    """Apply a nested dict (as read from YAML, or saved by `Config.to_dict`) onto `cfg`, as it is."""
    _apply_pairs(cfg, _dict_pairs(data, origin), origin, derive=False)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_description(name_or_path: str) -> str:
    """One line about a preset: its `description:` key, or the first sentence of its leading comment."""
    text = resolve_preset_path(name_or_path).read_text()
    comment: list[str] = []
    for line in text.splitlines():
        if line.startswith("description:"):
            return str(yaml.safe_load(line)["description"]).strip()
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    joined = " ".join(comment)
    match = re.search(r"(?<!Sec)(?<!App)(?<!e\.g)(?<!i\.e)[.;]\s+(?=[A-Z(`])", joined)
    first = joined[:match.start()] if match else joined.rstrip(".")
    return first if len(first) <= 120 else first[:117].rsplit(" ", 1)[0] + " ..."


def resolve_preset_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A YAML file: `name_or_path` as a path (relative to `relative_to`, the folder of the file that names it as
    its `base:`, else to the current folder), or a built-in preset name."""
    path = Path(name_or_path).expanduser()
    candidates = [relative_to / path] if relative_to is not None and not path.is_absolute() else [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    candidate = PRESET_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    where = f" (looked in {relative_to})" if relative_to is not None else ""
    raise ConfigError(
        f"config {name_or_path!r} is neither a file{where} nor a built-in preset; presets: {', '.join(preset_names())}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data


def yaml_chain(name_or_path: str) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML files of a preset, base first: `base: other` is a preset name or a path relative to the file."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    path = resolve_preset_path(name_or_path)
    while True:
        if any(path.resolve() == p.resolve() for p, _ in chain):
            loop = " -> ".join(str(p) for p, _ in chain) + f" -> {path}"
            raise ConfigError(f"`base:` loop: {loop} (remove one of these `base:` lines)")
        data = _read_yaml(path)
        chain.append((path, data))
        if "base" not in data:
            break
        path = resolve_preset_path(str(data["base"]), relative_to=path.parent)
    return chain[::-1]


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Read a preset, following `base:` chains (the base's values are overridden). A file that sets one of
    train.steps / train.epochs unsets the other that a base set."""
    merged: dict[str, Any] = {}
    for _, data in yaml_chain(name_or_path):
        train = data.get("train")
        if isinstance(train, dict) and isinstance(merged.get("train"), dict):
            derived = {k: None for k, other in (("steps", "epochs"), ("epochs", "steps"))
                       if train.get(other) is not None and k not in train}
            merged["train"] = {**merged["train"], **derived}
        for section, values in data.items():  # `base` too: the top file's names the preset it extends
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
    return merged


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Split command-line words into `(key, text)` pairs: `--a.b 1 --c.d=2` -> [("a.b", "1"), ("c.d", "2")].
    The keys and values are checked (and converted) by the parser when they are applied."""
    out: list[tuple[str, str]] = []
    words = iter(args)
    for arg in words:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = next(words, None)
            if value is None:
                raise ConfigError(f"override {arg} has no value (pass {arg} VALUE)")
        out.append((key, value))
    return out


def build_config(preset: str | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults <- preset YAML <- overrides, then validated."""
    cfg = default_config()
    if preset:
        _apply_pairs(cfg, _dict_pairs(load_yaml(preset), preset), preset)
    _apply_pairs(cfg, list(overrides or []), "the command line")
    resolve_auto(cfg)
    validate(cfg)
    return cfg


def resolve_auto(cfg: Config) -> None:
    """Replace `auto` values by what they mean for this configuration (the saved config holds the result)."""
    from amorlip.objectives.registry import entry_of

    entry = entry_of(cfg)
    if cfg.temperature.scheme == "auto" and entry is not None:
        cfg.temperature.scheme = entry.auto_temperature(entry.options_of(cfg))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as saved in run folders and checkpoints)."""
    cfg = default_config()
    apply_dict(cfg, data, origin="saved config")
    return cfg


def _canonical_words(words: list[str], key_types: dict[str, Any], own: set[str]) -> list[str]:
    """Command-line words with config keys in the parser's spelling: dashes -> underscores, open_clip aliases ->
    our keys, `none` -> null for keys that may be unset."""
    out: list[str] = []
    pending: Any = None
    for word in words:
        if pending is not None:
            out.append("null" if _optional(pending) and word.lower() == "none" else word)
            pending = None
            continue
        if word.startswith("--") and len(word) > 2:
            name, eq, value = word[2:].partition("=")
            if name not in own:
                canonical = name.replace("-", "_")
                canonical = OPEN_CLIP_FLAGS.get(canonical, canonical)
                if canonical in key_types:
                    typ = key_types[canonical]
                    if eq:
                        value = "null" if _optional(typ) and value.lower() == "none" else value
                        word = f"--{canonical}={value}"
                    else:
                        word, pending = f"--{canonical}", typ
        out.append(word)
    return out


def _unknown_option_error(message: str, key_types: dict[str, Any], own: list[str]) -> ConfigError:
    words = message.split(":", 1)[1].split() if ":" in message else []
    flags = [w for w in words if w.startswith("-")] or words
    known = {flag_of(k): flag_of(k) for k in key_types}
    known.update({o: o for o in own})
    known.update({flag_of(alias): flag_of(key) for alias, key in OPEN_CLIP_FLAGS.items()})
    parts = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        tail = name.lstrip("-").replace("-", "_")  # `--steps` -> `--train.steps`: the key's last part, any section
        close = [flag_of(k) for k in key_types if "." not in tail and k.split(".")[-1] == tail][:1]
        if not close:
            matches = difflib.get_close_matches(name.replace("_", "-"), list(known), n=1, cutoff=0.6)
            close = [known[c] for c in matches]
        key = name.lstrip("-").replace("-", "_")
        parts.append(f"option {name}" + (f": unknown key {key}" if "." in key else "") + (f" (did you mean {close[0]}?)" if close else ""))
    return ConfigError(f"unknown {', '.join(parts)} (see --help for the keys)")


def parse_config_args(words: list[str], prog: str, description: str | None = None,
                      add_options: Callable[[Any], None] | None = None) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Parse a command's words with the config parser: returns (the command's own options, as a dict with their
    defaults, and the config overrides given, as (dotted key, value) pairs). `--help` prints and exits 0."""
    parser = config_parser(prog, description, add_options)
    key_types = _key_types()
    own_actions = [a for a in parser._actions if a.dest not in key_types and a.dest != "help"]
    own_names = {o[2:] for a in own_actions for o in a.option_strings}
    try:
        ns = parser.parse_args(_canonical_words(list(words), key_types, own_names), defaults=False)
    except argparse.ArgumentError as e:
        message = " ".join(str(e).split())
        if message.lower().startswith("unrecognized arguments"):
            raise _unknown_option_error(message, key_types, [o for a in own_actions for o in a.option_strings])
        match = re.search(r'Parser key "([^"]+)"', str(e))
        if match and match.group(1) in key_types:
            given = re.search(r"(?:Given|Got) value: (.*)", str(e))
            raise _value_error(match.group(1), given.group(1).strip() if given else "?", key_types[match.group(1)])
        raise ConfigError(message) from None
    given = ns.as_dict()
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix not in key_types:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat.append((prefix, value))

    walk("", given)
    own = {a.dest: a.default for a in own_actions}
    overrides = []
    for key, value in flat:
        if key in own:
            own[key] = value
        else:
            overrides.append((key, value))
    return own, overrides


def override_words(pairs: list[tuple[str, Any]]) -> list[str]:
    """(dotted key, value) pairs as command-line words `--key=text`, which `parse_overrides` reads back."""
    types = _key_types()
    return [f"--{key}={_as_text(value, types.get(key, Any))}" for key, value in pairs]


def nearest_choice(value: Any, choices: Sequence[Any]) -> Any:
    """The choice closest to what was typed (`tagret` -> `target`), for the error's suggestion; the first
    choice when none is close."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return close[0] if close else choices[0]


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}={value!r} is not one of: {', '.join(choices)} (pass --{key.replace('_', '-')} "
            f"{nearest_choice(value, choices)}, or another of them)"
        )


NAME_MAX = 255
"""The longest file or folder name (bytes) of common file systems (ext4, XFS, APFS, NTFS)."""


def validate(cfg: Config) -> None:
    """Reject inconsistent values up front, before anything is built or written.

    Every message names the key, the rule and, in parentheses, the fix: the CLI prints it as one line
    (`amorlip train: error: ...`) and exits 2.
    """
    import os

    from amorlip import objectives

    def flag(key: str) -> str:
        return "--" + key.replace("_", "-")

    def at_least(key: str, value: Any, low: float, meaning: str = "") -> None:
        """`value` (None = unset, allowed) must be a finite number >= low."""
        if value is None:
            return
        if not (math.isfinite(value) and value >= low):
            raise ConfigError(f"{key}={value} must be at least {low} (pass {flag(key)} {low} or more{meaning})")

    def positive(key: str, value: Any, example: str) -> None:
        """`value` (None = unset, allowed) must be a finite number > 0."""
        if value is None:
            return
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}={value} must be a positive, finite number (pass e.g. {flag(key)} {example})")

    if cfg.objective not in objectives.REGISTRY:
        raise ConfigError(f"unknown objective {cfg.objective!r}; choose one of: {', '.join(objectives.REGISTRY)}")
    _check_choice(cfg.data.source, tuple(SOURCES), "data.source")
    _check_choice(cfg.model.precision, ("fp32", "bf16", "fp16", "amp_bf16", "pure_bf16"), "model.precision")
    _check_choice(cfg.temperature.scheme, ("plain", "rescaled"), "temperature.scheme")
    _check_choice(cfg.train.device, ("auto", "cpu", "cuda"), "train.device")

    # train
    if cfg.train.batch_size < 2:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be at least 2 (contrastive losses need negatives; "
            "pass --train.batch-size 2 or more)"
        )
    if cfg.train.steps is None and cfg.train.epochs is None:
        raise ConfigError("train.steps and train.epochs are both unset (pass --train.steps N or --train.epochs N)")
    at_least("train.steps", cfg.train.steps, 1)
    at_least("train.epochs", cfg.train.epochs, 1)
    at_least("train.log_every", cfg.train.log_every, 1)
    at_least("train.checkpoint_every", cfg.train.checkpoint_every, 0, "; 0 = by time and at the end only")
    at_least("train.checkpoint_minutes", cfg.train.checkpoint_minutes, 0, "; 0 = off")
    at_least("train.keep_checkpoints", cfg.train.keep_checkpoints, 0, "; 0 = keep all")
    at_least("train.eval_every", cfg.train.eval_every, 0, "; 0 = only at the end")
    at_least("train.threads", cfg.train.threads, 0, "; 0 = torch's default")
    at_least("train.accum_steps", cfg.train.accum_steps, 1, "; 1 = no accumulation")
    if cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps} does not divide train.batch_size={cfg.train.batch_size} "
            "(pass a divisor of the batch, per process, as --train.accum-steps)"
        )
    if cfg.train.stop_at is not None:
        if cfg.train.stop_at < 1:
            raise ConfigError(
                f"train.stop_at={cfg.train.stop_at} must be a step of at least 1 (pass --train.stop-at 1 or more, "
                "or --train.stop-at none)"
            )
        if cfg.train.steps is not None and cfg.train.stop_at > cfg.train.steps:
            raise ConfigError(
                f"train.stop_at={cfg.train.stop_at} is past the last step, train.steps={cfg.train.steps} "
                "(lower --train.stop-at, raise --train.steps, or pass --train.stop-at none)"
            )
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device=cuda but no CUDA device is visible (pass --train.device cpu, or --train.device auto "
                "to use a GPU only when there is one)"
            )
    out_dir = Path(cfg.train.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir={str(out_dir)!r} is a file, not a folder (pass another --train.output-dir)")
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(
            f"train.output_dir={str(out_dir)!r} lies under {str(existing)!r}, which is a file "
            "(pass another --train.output-dir)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"train.output_dir={str(out_dir)!r}: cannot write in {str(existing)!r} (pass a writable --train.output-dir)"
        )
    name = cfg.train.name
    if name is not None and (len(os.fsencode(name)) > NAME_MAX or name in ("", ".", "..") or "/" in name):
        raise ConfigError(
            f"train.name={name[:40]!r}{'...' if len(name) > 40 else ''} ({len(os.fsencode(name))} bytes) must be one "
            f"folder name of 1 to {NAME_MAX} bytes without '/' (pass a shorter --train.name, or none for "
            "objective-model-seed)"
        )

    # model
    from amorlip.model_catalog import check_lock_options, model_names

    names = model_names()
    if cfg.model.name not in names:
        import difflib

        close = difflib.get_close_matches(cfg.model.name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"model.name={cfg.model.name!r} is not a known model config ({hint}`amorlip models` lists them, "
            "e.g. tiny-vit, RN50, ViT-B-32)"
        )

    # optim
    if not (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0):
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be a positive, finite number (pass e.g. --optim.lr 1e-3)")
    positive("optim.lr_temperature", cfg.optim.lr_temperature, "1e-4, or none for optim.lr")
    positive("optim.eps", cfg.optim.eps, "1e-6")
    at_least("optim.weight_decay", cfg.optim.weight_decay, 0)
    at_least("optim.warmup_steps", cfg.optim.warmup_steps, 0)
    at_least("optim.grad_clip", cfg.optim.grad_clip, 0, "; 0 = no clipping")
    for key, beta, example in (("optim.beta1", cfg.optim.beta1, "0.9"), ("optim.beta2", cfg.optim.beta2, "0.98")):
        if not 0 <= beta < 1:
            raise ConfigError(f"{key}={beta} must be in [0, 1) (pass e.g. {flag(key)} {example})")

    # temperature
    if not 0 < cfg.temperature.rho_final_fraction <= 1:
        raise ConfigError(
            f"temperature.rho_final_fraction={cfg.temperature.rho_final_fraction} must be in (0, 1] "
            "(pass e.g. --temperature.rho-final-fraction 0.25)"
        )
    # (rho may be negative: the released AmorLIP CC12M schedule ends at rho_final = -8.5)

    # data
    reads_path = [name for name, s in SOURCES.items() if s.reads_train_path]
    if SOURCES[cfg.data.source].reads_train_path and not cfg.data.train_path:
        raise ConfigError(f"data.source={cfg.data.source} needs --data.train-path (a CSV file or shard pattern)")
    if not SOURCES[cfg.data.source].reads_train_path and cfg.data.train_path:
        raise ConfigError(
            f"data.train_path={cfg.data.train_path!r} is set but data.source={cfg.data.source} does not read it "
            f"(pass {' or '.join(f'--data.source {name}' for name in reads_path)}, or drop --data.train-path)"
        )
    at_least("data.dataset_size", cfg.data.dataset_size, 1, ", or none")
    at_least("data.synthetic_size", cfg.data.synthetic_size, 1)
    at_least("data.val_size", cfg.data.val_size, 1)
    at_least("data.eval_size", cfg.data.eval_size, 1)
    at_least("data.workers", cfg.data.workers, 0, "; 0 = load in the training process")

    # eval
    at_least("eval.batch_size", cfg.eval.batch_size, 1)
    at_least("eval.normalizer_size", cfg.eval.normalizer_size, 2)

    for name, value in cfg.sections.items():
        check = getattr(value, "validate", None)
        if callable(check):
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"[{name}] {e}") from None

    # the objective's rules across sections (FastCLIP-v3 x temperature scheme)
    entry = objectives.REGISTRY[cfg.objective]
    if entry.check is not None and entry.options_of(cfg) is not None:
        entry.check(entry.options_of(cfg), cfg)

    # precision on the device, initial weights, tower locking, W&B, final outputs
    if cfg.model.precision == "fp16":
        import torch

        if cfg.train.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError(
                "model.precision=fp16 needs a CUDA device (fp16 autocast with a gradient scaler) and this run trains "
                "on the CPU (pass --model.precision bf16 for bf16 autocast on the CPU, or fp32)"
            )
    check_lock_options(cfg.model)
    resolution = cfg.sections.get("resolution")
    if (cfg.model.lock_image or cfg.model.lock_text) and getattr(resolution, "enabled", False):
        raise ConfigError(
            "model.lock_image / lock_text with a RECLIP resolution schedule: the phases resize the towers' positional "
            "embeddings, frozen ones included (drop --resolution.phases, or the lock)"
        )
    if cfg.model.pretrained and cfg.train.resume in (None, "auto"):  # a resumed run loads the checkpoint instead
        from amorlip.models import check_pretrained

        check_pretrained(cfg.model.name, cfg.model.pretrained, **objectives.get(cfg.objective).model_overrides)
    _check_choice(cfg.train.save_final, ("full", "weights"), "train.save_final")
    if cfg.train.wandb:
        from amorlip.logging_wandb import require_wandb

        require_wandb()

    # validation data (data.val_path, eval.imagenet_root): exists, and is laid out as it should be
    if cfg.data.val_path or cfg.eval.imagenet_root:
        from amorlip.data.imagefolder import check_paths
        from amorlip.data.types import DataError

        try:
            check_paths(cfg.data.val_path, cfg.eval.imagenet_root, cfg.data.csv_img_key, cfg.data.csv_caption_key,
                        cfg.data.csv_separator)
        except DataError as e:
            raise ConfigError(str(e)) from None

    # optim.lr_scheduler and its keys (after the rest, so that lr is known to be valid)
    _check_lr_scheduler(cfg.optim, cfg.train.steps)


def _check_lr_scheduler(optim: OptimConfig, steps: int | None) -> None:
    """optim.lr_scheduler's keys: in range, and set only for the scheduler that reads them."""
    scheduler = optim.lr_scheduler
    _check_choice(scheduler, ("cosine", "const", "const-cooldown"), "optim.lr_scheduler")
    for key, value, example in (("optim.min_lr", optim.min_lr, "1e-5"),
                                ("optim.lr_cooldown_end", optim.lr_cooldown_end, "0")):
        if not (math.isfinite(value) and 0 <= value <= optim.lr):
            raise ConfigError(f"{key}={value} must be between 0 and optim.lr={optim.lr} "
                              f"(pass e.g. {flag_of(key)} {example})")
    if not (math.isfinite(optim.lr_cooldown_power) and optim.lr_cooldown_power > 0):
        raise ConfigError(f"optim.lr_cooldown_power={optim.lr_cooldown_power} must be a positive, finite number "
                          "(pass e.g. --optim.lr-cooldown-power 1 for a linear cooldown)")
    unused = {"optim.min_lr": optim.min_lr != 0.0 and scheduler != "cosine"}
    for key, changed in (("optim.lr_cooldown_steps", optim.lr_cooldown_steps is not None),
                         ("optim.lr_cooldown_power", optim.lr_cooldown_power != 1.0),
                         ("optim.lr_cooldown_end", optim.lr_cooldown_end != 0.0)):
        unused[key] = changed and scheduler != "const-cooldown"
    for key, is_unused in unused.items():
        if is_unused:
            wants = "cosine" if key == "optim.min_lr" else "const-cooldown"
            raise ConfigError(f"{key} is set but optim.lr_scheduler={scheduler} does not read it (pass "
                              f"--optim.lr-scheduler {wants}, or drop {flag_of(key)})")
    if scheduler != "const-cooldown":
        return
    cooldown = optim.lr_cooldown_steps
    if cooldown is None:
        raise ConfigError("optim.lr_scheduler=const-cooldown needs optim.lr_cooldown_steps (pass e.g. "
                          "--optim.lr-cooldown-steps 1000: the last 1000 steps decay to optim.lr_cooldown_end)")
    if cooldown < 1:
        raise ConfigError(f"optim.lr_cooldown_steps={cooldown} must be at least 1 "
                          "(pass --optim.lr-cooldown-steps 1 or more)")
    if steps is not None and cooldown > steps - optim.warmup_steps:
        raise ConfigError(
            f"optim.lr_cooldown_steps={cooldown} is longer than the run after its warm-up (train.steps={steps} "
            f"less optim.warmup_steps={optim.warmup_steps}; pass --optim.lr-cooldown-steps "
            f"{max(1, steps - optim.warmup_steps)} or fewer)"
        )


def describe(cfg: Config) -> str:
    """YAML text of the resolved config (written to every run folder)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
