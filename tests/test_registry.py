"""One source of truth per extension point: the objective registry (`amorlip.objectives.registry`) and the
data-source registry (`amorlip.data.sources`) are the only places outside an objective's or a source's own
modules that name it.

What counts: a string literal in `src/amorlip/**/*.py` whose whole value is a registered objective name, an
objective's config section name (`amor`) or a data-source name: `"fastclip"`, `cfg.sections["amor"]`,
`source in ("csv", "wds")`. Docstrings, comments and longer strings that merely mention a name (help texts,
messages, `"clip,amorlip"` defaults) do not count, nor do presets YAML and docs. A name may appear in its own
modules (an objective: its class's module and `objectives/options.py`; a source: the modules of its builders),
and in its registry module on one line only (its entry). `OTHER_MEANINGS` lists the literals that spell the same
word with another meaning, with the exact count per file, so that a new stray literal fails here.
"""
import ast
import collections
import importlib
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

import amorlip
from amorlip.data.sources import DEFAULT_SOURCE, HELD_OUT, SOURCES, SourceName
from amorlip.objectives.registry import DEFAULT_OBJECTIVE, REGISTRY

ROOT = Path(amorlip.__file__).parent

OTHER_MEANINGS = {
    # the program and the package, not the objective: prog names, the W&B project default, a warning's origin
    ("cli.py", "amorlip"): 3,
    ("config/parser.py", "amorlip"): 1,
    ("config/schema.py", "amorlip"): 1,
    # csv / wds as file formats: what `amorlip data` writes and how data.val_path / eval --data files are read
    ("cli.py", "csv"): 2,
    ("cli.py", "wds"): 1,
    ("data/writers.py", "csv"): 3,
    ("data/writers.py", "wds"): 2,
    ("data/imagefolder.py", "csv"): 3,
    ("data/imagefolder.py", "wds"): 1,
    ("evaluate/cli.py", "csv"): 1,
    # bench throughput races our trainer against open_clip's, whose --dataset-type has the same two names
    ("bench/throughput.py", "csv"): 6,
    ("bench/throughput.py", "synthetic"): 3,
    # a key of bench overhead's JSON results (the AmorLIP settings of each row), kept for existing results files
    ("bench/overhead.py", "amor"): 1,
}


def name_literals(source: str, names: set[str]) -> list[tuple[str, int]]:
    """(literal, line) of every string literal in `source` whose value is one of `names`, docstrings left out."""
    tree = ast.parse(source)
    bodies = [node.body for node in ast.walk(tree) if isinstance(getattr(node, "body", None), list)]
    docstrings = {id(stmt.value) for body in bodies for stmt in body
                  if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)}
    return [(n.value, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
            and id(n) not in docstrings]


def module_path(dotted: str) -> str:
    """`amorlip.objectives.sogclr:FastCLIPObjective` -> `objectives/sogclr.py` (relative to the package)."""
    parts = dotted.split(":")[0].split(".")[1:]
    return "/".join(parts) + ".py"


def homes() -> dict[str, set[str]]:
    """Name -> the files that may spell it: its own modules and its registry module."""
    out: dict[str, set[str]] = collections.defaultdict(set)
    for entry in REGISTRY.values():
        for name in {entry.name, entry.section}:
            out[name] |= {module_path(entry.cls), "objectives/options.py", "objectives/registry.py"}
    for source in SOURCES.values():
        out[source.name] |= {module_path(source.train), "data/sources.py"}
        if source.held_out:
            out[source.name].add(module_path(source.held_out))
    return out


def literals_by_file() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        for value, line in name_literals(path.read_text(), set(homes())):
            found[(path.relative_to(ROOT).as_posix(), value)].append(line)
    return found


def test_name_literals_finds_a_stray_literal_and_skips_docstrings():
    code = '"""Module on fastclip."""\ndef f(cfg):\n    """clip"""\n    return cfg.objective == "fastclip", "clip,amorlip"\n'
    assert name_literals(code, {"fastclip", "clip"}) == [("fastclip", 4)]


def test_each_name_is_spelt_only_in_its_own_modules_and_its_registry_line():
    found = literals_by_file()
    allowed = homes()
    stray = {key: lines for key, lines in found.items() if key[0] not in allowed[key[1]]}
    counts = {key: len(lines) for key, lines in stray.items()}
    assert counts == OTHER_MEANINGS, (
        "a name spelt outside its own modules and registry (read it from the registry instead), or a stale "
        f"OTHER_MEANINGS: {sorted(set(counts.items()) ^ set(OTHER_MEANINGS.items()))}")
    for name in allowed:
        registry = "data/sources.py" if name in SOURCES else "objectives/registry.py"
        lines = sorted(found[(registry, name)])
        assert len(set(lines)) == 1, f"{name!r} on lines {lines} of {registry}"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_objective_entry(name):
    entry = REGISTRY[name]
    cls = entry.load()
    assert (cls.name, cls.section, cls.Config) == (name, entry.section, entry.options)
    assert is_dataclass(entry.options) and callable(getattr(entry.options, "validate"))
    keys = {f.name for f in fields(entry.options)}
    assert set(entry.periods) <= keys and set(entry.amortised) <= keys and set(entry.sweeps) <= keys
    assert entry.auto_temperature(None) in ("plain", "rescaled")
    assert entry.tile_key is None or entry.tile_key == f"{entry.section}.tile_size"


def test_objective_sections_are_distinct_and_the_default_is_first():
    assert len({e.section for e in REGISTRY.values()}) == len(REGISTRY)
    assert DEFAULT_OBJECTIVE == next(iter(REGISTRY))


@pytest.mark.parametrize("name", list(SOURCES))
def test_data_source_entry(name):
    source = SOURCES[name]
    assert callable(source.train_builder())
    assert (source.held_out_builder() is None) == (name not in HELD_OUT)
    importlib.import_module(source.train.split(":")[0])


def test_source_names_feed_the_config_type_and_its_help():
    from typing import get_args

    from amorlip.config import DataConfig, config_parser

    assert get_args(SourceName) == tuple(SOURCES) and DataConfig().source == DEFAULT_SOURCE
    help_text = " ".join(config_parser()[0].format_help().split())
    assert " | ".join(SOURCES) + "." in help_text, "the data.source docstring (config/schema.py) lists the sources"
