"""Run configuration, by layer: the schema (`schema`: one dataclass per core section, each with its own pure
`validate()`; `sections`: `Config` and the objective and feature sections from their registries), the command-line
parser (`parser`, jsonargparse; `keys`, `values`: keys, their types and setting them from text or YAML), presets
(`presets`: YAML files and `base:` chains), validation (`validation`: the pure rules, and apart the checks of the
machine) and `build`, which layers defaults <- preset <- command line.

A preset YAML mirrors the dataclasses (`train: {batch_size: 64}`); the command line overrides any key with
`--section.key value` (dashes or underscores). Unknown keys are an error listing the valid ones. Objective
options live in a section named by the objective's registry entry (e.g. `amor:` for AmorLIP,
`amorlip.objectives.registry`), so adding an objective never touches this package. Building and validating a
config imports neither torch nor open_clip (model configs are read from their JSON files,
`amorlip.model_catalog`), except for the checks of the machine that need them: model.pretrained, a CUDA device or
fp16, and the validation data paths.
"""
from __future__ import annotations

from amorlip.config.build import build_config, describe, resolve_auto
from amorlip.config.parser import OPEN_CLIP_FLAGS, config_parser, parse_config_args
from amorlip.config.presets import load_yaml, preset_description, preset_names, resolve_preset_path
from amorlip.config.schema import (
    CORE_SECTIONS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TemperatureConfig,
    TrainConfig,
)
from amorlip.config.sections import Config, all_section_types, default_config
from amorlip.config.validation import check_machine, validate
from amorlip.config.values import apply_dict, config_from_dict, convert, override_words, parse_overrides, set_key
from amorlip.errors import ConfigError

__all__ = [
    "CORE_SECTIONS", "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OPEN_CLIP_FLAGS",
    "OptimConfig", "TemperatureConfig", "TrainConfig", "all_section_types", "apply_dict", "build_config",
    "check_machine", "config_from_dict", "config_parser", "convert", "default_config", "describe", "load_yaml",
    "override_words", "parse_config_args", "parse_overrides", "preset_description", "preset_names",
    "resolve_auto", "resolve_preset_path", "set_key", "validate",
]
