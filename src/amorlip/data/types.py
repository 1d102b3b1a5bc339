"""Shared data types: what a data source hands to the trainer and to evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch.utils.data import Dataset

class DataError(ValueError):
    """A data source that cannot be used as configured; the message names the problem and the fix."""


Batch = dict[str, torch.Tensor]
"""{'image': float (B,3,H,W), 'text': int64 (B,L) tokens, 'index': int64 (B,) stable sample ids}."""


@dataclass
class ZeroShotTask:
    """A zero-shot classification task: class names, prompt templates and labelled images.

    `dataset[i]` returns `(PIL.Image, int label)`. Templates are format strings with one `{}` or
    callables `classname -> prompt` (open_clip's convention).
    """

    name: str
    classnames: list[str]
    templates: list[Any]
    dataset: Dataset


@dataclass
class RetrievalSplit:
    """Held-out image-caption pairs: `dataset[i]` returns `(PIL.Image, str caption)`."""

    name: str
    dataset: Dataset


MAX_TRACKED_IDS = 4096
"""Distinct bad samples remembered per stream (their ids dedupe repeat visits); past it, every visit of an
untracked sample counts as a new one (the distinct counts become upper bounds, `extra['untracked']` says so)."""
MAX_TRACKED_SHARDS = 256
MAX_EXAMPLES = 5
_KINDS = ("corrupt", "no_caption")


def _bump(d: dict[str, int], key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + int(n)


@dataclass
class DataStats:
    """Counters a training stream keeps (logged; part of the checkpoint).

    Distinct counts (each bad sample or shard once, however often it is read):
    * `skipped_corrupt`: samples whose image is missing or cannot be decoded;
    * `skipped_no_caption`: samples whose caption is missing or empty;
    * `skipped_unreadable`: samples lost in unreadable shards (truncated, zero-byte, not a tar), known from
      the shards' sizes.json counts (0 when there is none);
    * `unreadable_shards`: shards that raised a read error or held fewer samples than sizes.json lists.
    `seen` counts samples read (every visit, bad ones included). Per-visit counts sit in `extra`:
    `corrupt_visits`, `no_caption_visits`, `unreadable_visits` (samples lost, summed over reads of the
    shards), `shard_errors` (reads of a shard that failed), `empty_batches` (batches with no usable sample),
    `untracked` (see MAX_TRACKED_IDS). `bad_ids` / `shards` remember what was counted (bounded) and
    `examples` the first few bad items by name. `state_dict()` is plain JSON; `merge` sums ranks.
    """

    skipped_corrupt: int = 0
    skipped_no_caption: int = 0
    skipped_unreadable: int = 0
    unreadable_shards: int = 0
    seen: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    bad_ids: dict[str, set] = field(default_factory=lambda: {k: set() for k in _KINDS})
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ recording

    def _example(self, text: str) -> None:
        if len(self.examples) < MAX_EXAMPLES and text not in self.examples:
            self.examples.append(text)

    def note_bad(self, kind: str, sample_id: Any, name: str | Callable[[], str] | None = None) -> None:
        """One visit of a bad sample (`kind` corrupt | no_caption) with a stable id (row index, shard:key);
        `name` (or a function making it, called only when needed) is how `examples` shows it."""
        _bump(self.extra, f"{kind}_visits")
        ids = self.bad_ids.setdefault(kind, set())
        if sample_id in ids:
            return
        attr = f"skipped_{kind}"
        setattr(self, attr, getattr(self, attr) + 1)
        if sum(len(v) for v in self.bad_ids.values()) < MAX_TRACKED_IDS:
            ids.add(sample_id)
        else:
            _bump(self.extra, "untracked")
        if len(self.examples) < MAX_EXAMPLES:
            self._example(str(sample_id) if name is None else name() if callable(name) else name)

    def note_shard(self, url: str, error: str, lost: int = 0) -> None:
        """One read of a shard that failed (`error`) or came up short; `lost`: samples it should have held."""
        lost = max(0, int(lost))
        _bump(self.extra, "shard_errors")
        _bump(self.extra, "unreadable_visits", lost)
        entry = self.shards.get(url)
        if entry is not None:
            entry["visits"] += 1
            if lost > entry["lost"]:
                self.skipped_unreadable += lost - entry["lost"]
                entry["lost"] = lost
            return
        self.unreadable_shards += 1
        self.skipped_unreadable += lost
        if len(self.shards) < MAX_TRACKED_SHARDS:
            self.shards[url] = {"visits": 1, "lost": lost, "error": str(error)[:200]}
        else:
            _bump(self.extra, "untracked")
        self._example(f"{url} ({str(error)[:80]})")

    def note_empty_batch(self) -> None:
        _bump(self.extra, "empty_batches")

    def record(self, counts: dict[str, Any], name: Callable[[str, Any], str] | None = None) -> None:
        """Add what a collate returned: {'seen': n, 'corrupt': [ids], 'no_caption': [ids],
        'shards': [{'url', 'error', 'lost'}]} (all optional). `name(kind, id)` names a sample in `examples`."""
        self.seen += int(counts.get("seen", 0))
        for kind in _KINDS:
            for sample_id in counts.get(kind, ()):
                self.note_bad(kind, sample_id, None if name is None else (lambda: name(kind, sample_id)))
        for event in counts.get("shards", ()):
            self.note_shard(event["url"], event.get("error", ""), event.get("lost", 0))

    # ------------------------------------------------------------------------------------------ totals

    @property
    def skipped(self) -> int:
        """Distinct samples skipped (corrupt + without caption + lost in unreadable shards)."""
        return self.skipped_corrupt + self.skipped_no_caption + self.skipped_unreadable

    @property
    def skipped_visits(self) -> int:
        """Skips counting every visit."""
        e = self.extra
        return e.get("corrupt_visits", 0) + e.get("no_caption_visits", 0) + e.get("unreadable_visits", 0)

    @property
    def read(self) -> int:
        """Samples the stream tried to read (read + lost in unreadable shards), every visit."""
        return self.seen + self.extra.get("unreadable_visits", 0)

    @property
    def skip_fraction(self) -> float:
        """Fraction of the samples tried (every visit) that were unusable."""
        return self.skipped_visits / self.read if self.read else 0.0

    def describe(self) -> str:
        """One line, e.g. `skipped 12 of 3200 samples (8 corrupt, 4 without caption; 1 unreadable shard):
        first: a.png, b.png, shard-3.tar (...)`."""
        if not self.skipped and not self.unreadable_shards:
            return f"no samples skipped ({self.seen} read)"
        parts = []
        if self.skipped_corrupt:
            parts.append(f"{self.skipped_corrupt} corrupt")
        if self.skipped_no_caption:
            parts.append(f"{self.skipped_no_caption} without caption")
        text = ", ".join(parts)
        if self.unreadable_shards:
            shard = f"{self.unreadable_shards} unreadable shard{'s' if self.unreadable_shards != 1 else ''}"
            if self.skipped_unreadable:
                shard += f" losing {self.skipped_unreadable} samples"
            elif not self.skipped:
                shard += " (samples lost unknown: no sizes.json)"
            text = f"{text}; {shard}" if text else shard
        out = f"skipped {self.skipped} of {self.read} samples ({text})" if self.skipped else f"{self.read} samples read; {text}"
        if self.skipped_visits != self.skipped:
            out += f", {self.skipped_visits} skips counting repeat reads"
        if self.extra.get("untracked"):
            out += " (distinct counts are upper bounds)"
        if self.examples:
            out += ": first: " + ", ".join(self.examples)
        return out

    # ------------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able copy of every counter (ids as sorted lists)."""
        return {
            "skipped_corrupt": self.skipped_corrupt,
            "skipped_no_caption": self.skipped_no_caption,
            "skipped_unreadable": self.skipped_unreadable,
            "unreadable_shards": self.unreadable_shards,
            "seen": self.seen,
            "extra": dict(self.extra),
            "bad_ids": {k: sorted(v, key=str) for k, v in self.bad_ids.items()},
            "shards": {u: dict(e) for u, e in self.shards.items()},
            "examples": list(self.examples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (also an older checkpoint's plain counters; missing keys start at 0)."""
        fresh = DataStats()
        for key in ("skipped_corrupt", "skipped_no_caption", "skipped_unreadable", "unreadable_shards", "seen"):
            setattr(fresh, key, int(state.get(key, 0) or 0))
        fresh.extra = {str(k): int(v) for k, v in (state.get("extra") or {}).items()}
        for kind, ids in (state.get("bad_ids") or {}).items():
            fresh.bad_ids[kind] = set(ids)
        fresh.shards = {str(u): {"visits": int(e.get("visits", 1)), "lost": int(e.get("lost", 0)),
                                 "error": str(e.get("error", ""))}
                        for u, e in (state.get("shards") or {}).items()}
        fresh.examples = [str(x) for x in (state.get("examples") or [])][:MAX_EXAMPLES]
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "DataStats":
        stats = cls()
        stats.load_state_dict(state)
        return stats

    @classmethod
    def merge(cls, states: "Sequence[dict[str, Any] | DataStats]") -> "DataStats":
        """The run's totals from every rank's `state_dict()` (or DataStats): per-visit counts and `seen` add
        up; a sample or shard that several ranks read counts once (its ids are united), so the distinct
        counts are exact while each rank tracked its ids (MAX_TRACKED_IDS), upper bounds otherwise."""
        parts = [s if isinstance(s, DataStats) else cls.from_state_dict(s) for s in states]
        out = cls()
        for p in parts:
            out.seen += p.seen
            for k, v in p.extra.items():
                _bump(out.extra, k, v)
        for kind in _KINDS:
            union: set = set()
            untracked = 0
            for p in parts:
                ids = p.bad_ids.get(kind, set())
                union |= ids
                untracked += max(0, getattr(p, f"skipped_{kind}") - len(ids))
            out.bad_ids[kind] = union
            setattr(out, f"skipped_{kind}", len(union) + untracked)
        untracked_shards = untracked_lost = 0
        for p in parts:
            untracked_shards += max(0, p.unreadable_shards - len(p.shards))
            untracked_lost += max(0, p.skipped_unreadable - sum(e["lost"] for e in p.shards.values()))
            for url, e in p.shards.items():
                mine = out.shards.setdefault(url, {"visits": 0, "lost": 0, "error": e.get("error", "")})
                mine["visits"] += e["visits"]
                mine["lost"] = max(mine["lost"], e["lost"])
        out.unreadable_shards = len(out.shards) + untracked_shards
        out.skipped_unreadable = sum(e["lost"] for e in out.shards.values()) + untracked_lost
        for p in parts:
            for x in p.examples:
                out._example(x)
        return out


@runtime_checkable
class TrainStream(Protocol):
    """What the trainer needs from a training data source (`amorlip.train.train` and its set-up, checkpoint and
    logging use nothing else; every stream, `loader.MapStream`, `wds.WdsStream`, `bench.common.BenchStream`, has
    exactly these members).

    * `dataset_size`: number of distinct samples (indices are in [0, dataset_size)).
    * `steps_per_epoch`: optimizer steps in one epoch at the global batch size.
    * `iterate(epoch, skip_batches, transform, tokenizer)`: this rank's batches of `epoch`, starting after
      `skip_batches` batches (exact mid-epoch resume). Order and augmentation are a deterministic function
      of (seed, epoch, sample index), so a resumed run sees exactly what an uninterrupted run would. It
      yields exactly `steps_per_epoch - skip_batches` batches or raises `DataError` (unusable data), so a
      loop re-entering it at (step // steps_per_epoch, step % steps_per_epoch) always advances.
    * `stats`: skip counters, a `DataStats` (`state_dict()` / `load_state_dict()` go into the checkpoint,
      `DataStats.merge` sums the ranks', `describe()` and `skipped_visits` feed the log).
    """

    dataset_size: int
    steps_per_epoch: int
    stats: DataStats

    def iterate(
        self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable
    ) -> Iterator[Batch]: ...
