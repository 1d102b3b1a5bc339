"""The objective registry: one entry per `--objective NAME`, the only place that names an objective outside its own
modules. Torch-free: the config layer (`--help`, presets, validation) and the benchmarks' option parsing read it
without importing torch; the class is imported on first use (`ObjectiveEntry.load`).

An entry carries the objective's class ("module:Class"), the config section holding its options (`--SECTION.KEY`),
the options dataclass (torch-free, in `options.py`) and the hooks other parts ask about:

* `temperature(options)`: what `temperature.scheme auto` means for it (`plain` unless it says otherwise);
* `check(options, cfg)`: a rule across config sections (ConfigError naming the fix), run by config validation;
* `periods`: option keys holding the step periods of its periodic work (the benchmarks' block lengths);
* `amortised`: option keys sizing its amortised work (reported by `bench overhead`);
* `sweeps`: option key -> label prefix of the bench sweeps over it (`bench --t-online 1,8` -> `T=1`, `T=8`);
* `tile_key` (derived): `SECTION.tile_size` when its options have a tile size.

The class's `name`, `section` and `Config` attributes are set from its entry (`Objective.__init_subclass__`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from amorlip.objectives.options import (
    AmorConfig,
    ClipConfig,
    FastCLIPConfig,
    NeuCLIPConfig,
    SigLipConfig,
    SogCLRConfig,
    check_fastclip_temperature,
    fastclip_temperature,
)


def _plain(options: Any) -> str:
    """`temperature.scheme auto` of most objectives: the plain loss."""
    return "plain"


@dataclass(frozen=True)
class ObjectiveEntry:
    """One registered objective (see the module docstring for the hooks)."""

    name: str
    """`--objective NAME`."""
    cls: str
    """"module:Class", imported lazily (a broken optional objective never breaks the others)."""
    section: str
    """The config section of its options (`--SECTION.KEY`)."""
    options: type
    """Its options dataclass (torch-free, with `validate()`); an instance is passed to the class as `cfg`."""
    temperature: Callable[[Any], str] = _plain
    """options -> what `temperature.scheme auto` means (`plain` or `rescaled`)."""
    check: Callable[[Any, Any], None] | None = None
    """(options, run config) -> None, or ConfigError naming the fix: a rule across sections."""
    periods: tuple[str, ...] = ()
    """Option keys holding step periods of periodic work (benchmark blocks hold whole periods)."""
    amortised: tuple[str, ...] = ()
    """Option keys that size its amortised work (reported by `bench overhead`)."""
    sweeps: dict[str, str] = field(default_factory=dict)
    """Option key -> label prefix of the benchmarks' sweep over it, given by the bench option of the same name
    (`bench.common.add_variant_options`: `--t-online 1,8` -> rows `T=1`, `T=8`)."""

    def load(self) -> type:
        """The objective class, an `amorlip.objectives.base.Objective` (imports its module, and torch)."""
        module_name, cls_name = self.cls.split(":")
        return getattr(importlib.import_module(module_name), cls_name)

    @property
    def tile_key(self) -> str | None:
        """The dotted key of its tile size (`clip.tile_size`), or None when its losses are never tiled."""
        return f"{self.section}.tile_size" if "tile_size" in {f.name for f in fields(self.options)} else None

    def options_of(self, cfg: Any) -> Any:
        """Its options in the run config `cfg` (the section's dataclass), or None when `cfg` has no such section."""
        return cfg.sections.get(self.section)

    def auto_temperature(self, options: Any) -> str:
        """What `temperature.scheme auto` means with `options` (None: the defaults)."""
        return self.temperature(self.options() if options is None else options)

    def period_steps(self, cfg: Any) -> list[int]:
        """The step periods of its periodic work under the run config `cfg`."""
        options = self.options_of(cfg)
        return [] if options is None else [int(getattr(options, key)) for key in self.periods]


def _entries(*entries: ObjectiveEntry) -> dict[str, ObjectiveEntry]:
    return {e.name: e for e in entries}


REGISTRY: dict[str, ObjectiveEntry] = _entries(
    ObjectiveEntry("clip", "amorlip.objectives.clip:ClipObjective", "clip", ClipConfig),
    ObjectiveEntry("siglip", "amorlip.objectives.siglip:SigLipObjective", "siglip", SigLipConfig),
    ObjectiveEntry("sogclr", "amorlip.objectives.sogclr:SogCLRObjective", "sogclr", SogCLRConfig),
    ObjectiveEntry("fastclip", "amorlip.objectives.sogclr:FastCLIPObjective", "fastclip", FastCLIPConfig,
                   temperature=fastclip_temperature, check=check_fastclip_temperature),
    ObjectiveEntry("amorlip", "amorlip.objectives.amorlip:AmorLIPObjective", "amor", AmorConfig,
                   periods=("t_online", "t_target"), amortised=("t_online", "dim_factor", "t_lambda", "t_target"),
                   sweeps={"t_online": "T", "dim_factor": "fd"}),
    ObjectiveEntry("neuclip", "amorlip.objectives.neuclip:NeuCLIPObjective", "neuclip", NeuCLIPConfig,
                   periods=("restart_every",)),
)
"""Objective name -> entry, in the order `--objective` lists them."""

DEFAULT_OBJECTIVE = next(iter(REGISTRY))
"""The first entry, CLIP (open_clip's own loss): the default `--objective`, and the baseline the benchmarks measure
the others (and open_clip's trainer) against."""


def entry_of(cfg: Any) -> ObjectiveEntry | None:
    """The entry of the run config's objective (None for a name that is not registered)."""
    return REGISTRY.get(cfg.objective)


def options_of(cfg: Any) -> Any:
    """The options section of the run config's objective, or None."""
    entry = entry_of(cfg)
    return None if entry is None else entry.options_of(cfg)


def period_steps(cfg: Any) -> list[int]:
    """Step periods of the run config's objective's periodic work (AmorLIP's Stage I and target EMA, NeuCLIP's
    prototype restarts); empty for the others."""
    entry = entry_of(cfg)
    return [] if entry is None else entry.period_steps(cfg)


def entry_for_class(path: str) -> ObjectiveEntry | None:
    """The entry registering the class at `path` ("module:Class"), or None."""
    return next((e for e in REGISTRY.values() if e.cls == path), None)

