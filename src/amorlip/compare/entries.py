"""The words of a comparison: the entries of `--objectives` (an objective or preset name with optional
`[key=value,...]` overrides; `amorlip bench` reads them too), `--seeds` and `--jobs`, each refused in one
line that names the fix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amorlip.config import ConfigError


@dataclass
class Entry:
    """One entry as typed (`label`), the objective or preset it names, and its own overrides."""

    label: str
    objective: str
    overrides: list[tuple[str, str]]


def split_entries(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ConfigError(f"unbalanced brackets in --objectives {text!r}")
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse_entry(text: str) -> Entry:
    """`amorlip[amor.divide_by=target,amor.t_online=8]` -> Entry."""
    if "[" in text:
        if not text.endswith("]"):
            raise ConfigError(f"bad entry {text!r}: write name[key=value,key=value]")
        name, body = text[:-1].split("[", 1)
        overrides = []
        for item in filter(None, (p.strip() for p in body.split(","))):
            if "=" not in item:
                raise ConfigError(f"bad override {item!r} in entry {text!r}: write section.key=value")
            k, v = item.split("=", 1)
            overrides.append((k.strip(), v.strip()))
    else:
        name, overrides = text, []
    return Entry(label=text, objective=name.strip(), overrides=overrides)


def safe_name(label: str) -> str:
    """`label` as a file name: characters other than letters, digits, `-`, `_` and `.` become `_`."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]; a one-line ConfigError for anything else."""
    seeds = []
    for s in text.split(","):
        if not s.strip():
            continue
        try:
            seeds.append(int(s))
        except ValueError:
            raise ConfigError(f"--seeds {text}: {s.strip()!r} is not an integer "
                              "(pass comma-separated integers, e.g. --seeds 0,1,2)") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} names no seed (pass comma-separated integers, e.g. --seeds 0,1,2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text} repeats a seed (pass each seed once, e.g. --seeds 0,1,2)")
    return seeds


def parse_jobs(text: Any) -> int:
    """`--jobs 4` -> 4: how many runs train at once (each in its own process when more than one)."""
    try:
        jobs = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"--jobs {text}: not an integer (pass how many runs train at once, e.g. --jobs 2)") from None
    if jobs < 1:
        raise ConfigError(f"--jobs {text}: at least one run must train at a time (pass --jobs 1 or more)")
    return jobs
