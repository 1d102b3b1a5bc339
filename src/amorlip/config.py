"""Run configuration: plain dataclasses, YAML presets, dotted command-line overrides, validation.

A preset YAML mirrors the dataclasses (`train: {batch_size: 64}`); the command line overrides any key
with `--section.key value` (dashes or underscores). Unknown keys are an error listing the valid ones.
Objective options live in a section named by the objective (e.g. `amor:` for AmorLIP), declared by the
objective's own `Config` dataclass, so adding an objective never touches this file.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the problem and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny-vit"
    """Any open_clip model config name (RN50, ViT-B-32, ...) or a registered tiny config."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16: autocast precision (bf16/fp16 only on CUDA; the CPU runs fp32)."""
    compile: bool = False
    """Wrap the model in torch.compile."""


@dataclass
class DataConfig:
    source: str = "synthetic"
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
    csv_caption_key: str = "title"
    csv_separator: str = ","
    fmnist_root: str | None = None
    """Folder with Fashion-MNIST IDX files (default: where Debian's dataset-fashion-mnist puts them)."""
    workers: int = 0
    resampled: bool = False
    """webdataset: sample shards with replacement (infinite stream)."""
    train_num_samples: int | None = None
    """webdataset: samples per epoch (open_clip's --train-num-samples); None = dataset_size."""
    max_empty_batches: int = 20
    """Stop with an error after this many batches in a row without one usable sample."""
    max_skip_fraction: float = 0.5
    """Stop with an error once more than this fraction of the samples read is unusable (1 = never)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    lr_temperature: float | None = None
    """Learning rate of logit_scale (and logit_bias); None = same as lr."""
    temperature_step_thresh: bool = False
    """Divide the temperature lr by 3 while the temperature 1/s is 0.03 or below (re-checked every step)."""
    temperature_step_thresh_latch: bool = False
    """step_thresh: once 1/s has reached 0.03, keep the lower rate for the rest of the run (no re-check)."""
    lr_temperature_schedule: str | None = None
    """const | same-as-lr (warm-up + cosine); None: const when lr_temperature is set (releases), else same-as-lr."""


@dataclass
class TemperatureConfig:
    scheme: str = "plain"
    """plain: optimise L. rescaled: L / sg(s) + rho / s (FastCLIP; AmorLIP App. D)."""
    rho: float = 6.5
    rho_final: float | None = None
    """rho for the last `rho_final_fraction` of training (None keeps rho throughout)."""
    rho_final_fraction: float = 0.25


@dataclass
class TrainConfig:
    batch_size: int = 64
    """Global batch size (split evenly across processes)."""
    steps: int | None = 600
    """Total optimizer steps; None = epochs * steps per epoch."""
    epochs: int | None = None
    """Used when steps is None."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda."""
    output_dir: str = "runs"
    name: str | None = None
    """Run folder name under output_dir (default: objective-model-seed)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = by time only, see checkpoint_minutes, and at the end)."""
    checkpoint_minutes: float = 30.0
    """Also save a checkpoint when this many minutes have passed since the last one (0 = off). SIGTERM and
    SIGUSR1 (pre-emption) always save one before the run exits."""
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    log_every: int = 10
    tensorboard: bool = False
    resume: str | None = None
    """`latest` (the run folder's newest checkpoint), `auto` (latest if there is one, else start fresh) or a
    checkpoint path. Refused when the checkpoint was made with settings that change results."""
    resume_allow_changes: str | None = None
    """Comma-separated keys a resume may change (e.g. optim.lr,train.steps; `all` for any; world_size for
    another process count); others that differ from the checkpoint's settings are an error."""
    stop_at: int | None = None
    """Stop after this global step (checkpoint saved; schedules still span the whole run): for time-limited jobs."""
    progress: bool = True
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    tf32: bool = True
    """CUDA: fp32 matmuls and convolutions may use TF32 tensor cores (as open_clip's trainer sets)."""
    cudnn_benchmark: bool = True
    """CUDA: let cuDNN time and pick its fastest convolution algorithms (as open_clip's trainer sets)."""


@dataclass
class EvalConfig:
    batch_size: int = 256
    zeroshot: bool = True
    retrieval: bool = True


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "temperature": TemperatureConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def objective_sections() -> dict[str, type]:
    """Config sections declared by the registered objectives (section name -> dataclass)."""
    from amorlip import objectives

    out: dict[str, type] = {}
    for name in objectives.REGISTRY:
        try:
            cls = objectives.get(name)
        except (ImportError, AttributeError):
            continue
        if cls.section and cls.Config is not None:
            out.setdefault(cls.section, cls.Config)
    return out


def extra_sections() -> dict[str, type]:
    """Sections contributed by optional features (e.g. the RECLIP resolution schedule)."""
    out: dict[str, type] = {}
    try:
        from amorlip.reclip import ResolutionConfig

        out["resolution"] = ResolutionConfig
    except ImportError:
        pass
    return out


@dataclass
class Config:
    objective: str = "clip"
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
    raise ConfigError(
        f"unknown config section {name!r}; valid sections: {', '.join(['objective', *CORE_SECTIONS, *cfg.sections])}"
    )


def _valid_keys(obj: Any) -> list[str]:
    return [f.name for f in fields(obj)]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    typ_str = str(typ)
    optional = "None" in typ_str
    if isinstance(value, str) and optional and value.lower() in ("none", "null", "~"):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    try:
        if typ is bool or typ_str.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int or typ_str.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float or typ_str.startswith("float"):
            return float(value)
        if typ is str or typ_str.startswith("str"):
            return str(value)
        if typ_str.startswith("list"):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, list):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {typ_str}") from None
    return value


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` (dashes allowed) to `value`, converting it to the declared type."""
    dotted = dotted.replace("-", "_")
    if dotted == "objective":
        cfg.objective = str(value)
        return
    if "." not in dotted:
        raise ConfigError(f"unknown key {dotted!r}: keys look like section.key, e.g. train.batch_size")
    section, key = dotted.split(".", 1)
    obj = _section_obj(cfg, section)
    if key not in _valid_keys(obj):
        raise ConfigError(
            f"unknown key {section}.{key}; valid keys in [{section}]: {', '.join(_valid_keys(obj))}"
        )
    hints = get_type_hints(type(obj))
    setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def apply_dict(cfg: Config, data: dict[str, Any], origin: str = "config") -> None:
    """Apply a nested dict (as read from YAML) onto `cfg`."""
    for section, values in data.items():
        if section == "objective":
            cfg.objective = str(values)
            continue
        if section == "base":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys to values")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a built-in preset; presets: {', '.join(preset_names())}"
    )


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Read a preset, following `base: other-preset` chains (the base's values are overridden)."""
    path = resolve_preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    if "base" in data:
        merged = load_yaml(str(data["base"]))
        for section, values in data.items():
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
        data = merged
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--a.b 1 --c.d=2` -> [("a.b", "1"), ("c.d", "2")]."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            value = args[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


def build_config(preset: str | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults <- preset YAML <- overrides, then validated."""
    cfg = default_config()
    if preset:
        apply_dict(cfg, load_yaml(preset), origin=preset)
    for key, value in overrides or []:
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as saved in run folders and checkpoints)."""
    cfg = default_config()
    apply_dict(cfg, data, origin="saved config")
    return cfg


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}={value!r} is not one of: {', '.join(choices)} (pass --{key.replace('_', '-')} {choices[0]}, "
            f"or another of them)"
        )


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
    _check_choice(cfg.data.source, ("synthetic", "csv", "wds", "fashion-mnist"), "data.source")
    _check_choice(cfg.model.precision, ("fp32", "bf16", "fp16"), "model.precision")
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

    # model
    from amorlip.models import model_names

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
    if cfg.data.source in ("csv", "wds") and not cfg.data.train_path:
        raise ConfigError(f"data.source={cfg.data.source} needs --data.train-path (a CSV file or shard pattern)")
    if cfg.data.source in ("synthetic", "fashion-mnist") and cfg.data.train_path:
        raise ConfigError(
            f"data.train_path={cfg.data.train_path!r} is set but data.source={cfg.data.source} does not read it "
            "(pass --data.source csv or --data.source wds, or drop --data.train-path)"
        )
    at_least("data.dataset_size", cfg.data.dataset_size, 1, ", or none")
    at_least("data.synthetic_size", cfg.data.synthetic_size, 1)
    at_least("data.val_size", cfg.data.val_size, 1)
    at_least("data.eval_size", cfg.data.eval_size, 1)
    at_least("data.workers", cfg.data.workers, 0, "; 0 = load in the training process")

    # eval
    at_least("eval.batch_size", cfg.eval.batch_size, 1)

    for name, value in cfg.sections.items():
        check = getattr(value, "validate", None)
        if callable(check):
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"[{name}] {e}") from None

    # objective x temperature scheme
    fastclip = cfg.sections.get("fastclip")
    if cfg.objective == "fastclip" and fastclip is not None and fastclip.version == 3 \
            and cfg.temperature.scheme != "rescaled":
        raise ConfigError(
            f"fastclip.version=3 (RGCL-g) learns its temperature through the rescaled scheme, not "
            f"temperature.scheme={cfg.temperature.scheme} (pass --temperature.scheme rescaled, or --fastclip.version 0 "
            "for GCL with the plain gradient)"
        )


def describe(cfg: Config) -> str:
    """YAML text of the resolved config (written to every run folder)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
