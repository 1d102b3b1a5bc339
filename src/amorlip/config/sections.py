"""The sections of a run config: the core ones (`amorlip.config.schema`), one per registered objective (its
registry entry's options dataclass, `amorlip.objectives.registry`) and the features' (`resolution`, RECLIP; `aug`, augmentation), and
`Config`, which holds them all."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from amorlip.config.schema import (
    CORE_SECTIONS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TemperatureConfig,
    TrainConfig,
)
from amorlip.errors import ConfigError
from amorlip.hf_cache import safe_name
from amorlip.model_options import AugConfig
from amorlip.objectives.registry import DEFAULT_OBJECTIVE, REGISTRY
from amorlip.reclip_options import ResolutionConfig


def objective_sections() -> dict[str, type]:
    """Config sections declared by the registered objectives (section name -> dataclass), in registry order."""
    out: dict[str, type] = {}
    for entry in REGISTRY.values():
        out.setdefault(entry.section, entry.options)
    return out


def extra_sections() -> dict[str, type]:
    """Sections contributed by optional features: the RECLIP resolution schedule, training-image augmentation."""
    return {"resolution": ResolutionConfig, "aug": AugConfig}


@dataclass
class Config:
    """A run's whole configuration: the objective's name, the core sections, and the objective and feature
    sections by name."""

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
        """The objective or feature section `name` (KeyError if there is none)."""
        return self.sections[name]

    @property
    def run_dir(self) -> Path:
        """The run's folder: train.output_dir / (train.name, or objective-model-bBATCH-sSEED; an hf-hub:ORG/REPO
        model is spelt hf-hub-ORG--REPO there)."""
        t = self.train
        model = safe_name(self.model.name)
        return Path(t.output_dir) / (t.name or f"{self.objective}-{model}-b{t.batch_size}-s{t.seed}")

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain values (what `describe` prints and run folders and checkpoints keep)."""
        out: dict[str, Any] = {"objective": self.objective}
        for name in CORE_SECTIONS:
            out[name] = asdict(getattr(self, name))
        for name, value in self.sections.items():
            out[name] = asdict(value)
        return out


def all_section_types() -> dict[str, type]:
    """Every section's dataclass by name: the core ones, then the objectives', then the features'."""
    return {**CORE_SECTIONS, **objective_sections(), **extra_sections()}


def default_config() -> Config:
    """The defaults, with every objective and feature section present."""
    cfg = Config()
    for name, typ in {**objective_sections(), **extra_sections()}.items():
        cfg.sections[name] = typ()
    return cfg


def section_of(cfg: Config, name: str) -> Any:
    """The section `name` of `cfg` (ConfigError naming the valid ones for an unknown name)."""
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


def valid_keys(obj: Any) -> list[str]:
    """The keys of a section (its dataclass fields)."""
    return [f.name for f in fields(obj)]
