"""webdataset shards, below the training stream: which shards `data.train_path` names, how many samples they
hold (sizes.json), and each raw tar sample read and decoded into (image, caption, index).

`amorlip.data.wds.WdsStream` builds its epochs on these; the held-out webdataset pairs (data/imagefolder.py) and
the normalizer diagnostics read shards with them too. The sample layout and the index rules are in the docstring
of `amorlip.data.wds`.
"""
from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import braceexpand
import webdataset as wds
from PIL import Image

from amorlip.data.types import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(train_path: str) -> list[str]:
    """Shard URLs of `train_path`: brace patterns or shell globs (`*`, `?`, `[...]`) joined with `::`, or
    directories (their *.tar).

    Local shards must exist; an empty result is an error.
    """
    if not train_path:
        raise DataError("data.source=wds needs --data.train-path: a shard pattern like 'shards/{00000..00009}.tar' or a folder")
    urls: list[str] = []
    for part in train_path.split("::"):
        part = part.strip()
        if not part:
            continue
        if not _is_remote(part) and Path(part).expanduser().is_dir():
            found = sorted(str(p) for p in Path(part).expanduser().glob("*.tar"))
            if not found:
                raise DataError(f"folder {part!r} has no .tar shards; write some with `amorlip data wds --out DIR` or point elsewhere")
            urls.extend(found)
        else:
            for url in braceexpand.braceexpand(part):
                if not _is_remote(url) and glob.has_magic(url):  # a shell-style glob: the files it matches, sorted
                    matched = sorted(glob.glob(os.path.expanduser(url)))
                    if not matched:
                        raise DataError(f"data.train_path pattern {url!r} matches no files; check the folder and "
                                        "the pattern (e.g. 'shards/shard-*.tar')")
                    urls.extend(matched)
                else:
                    urls.append(url)
    if not urls:
        raise DataError(f"data.train_path={train_path!r} names no shards; give a pattern like 'shards/{{00000..00009}}.tar'")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).expanduser().is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(
            f"{len(missing)} of {len(urls)} shards do not exist: {', '.join(missing[:3])}{more}; "
            f"check --data.train-path (brace ranges like {{00000..00009}} must match the files)"
        )
    return [str(Path(u).expanduser()) if not _is_remote(u) else u for u in urls]


def dataset_size_from_sizes_json(urls: list[str]) -> int:
    """Sum of the shards' sample counts from `sizes.json` files next to them (open_clip's convention)."""
    tables: dict[Path, dict[str, int]] = {}
    total = 0
    for url in urls:
        if _is_remote(url):
            raise DataError(f"cannot read sizes.json for remote shard {url}; pass --data.dataset-size N")
        folder = Path(url).parent
        if folder not in tables:
            f = folder / "sizes.json"
            if not f.is_file():
                raise DataError(
                    f"the number of samples is unknown: no {f}; pass --data.dataset-size N or write a sizes.json "
                    f"mapping each shard's file name to its sample count"
                )
            try:
                tables[folder] = {str(k): int(v) for k, v in json.loads(f.read_text()).items()}
            except (ValueError, AttributeError, TypeError) as e:
                raise DataError(f"{f} is not a JSON object of shard name -> count ({e}); fix it or pass --data.dataset-size N") from None
        name = Path(url).name
        if name not in tables[folder]:
            raise DataError(f"{folder / 'sizes.json'} has no entry for {name}; add it or pass --data.dataset-size N")
        total += tables[folder][name]
    return total


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Each local shard's sample count from the sizes.json next to it, where there is a readable one (used
    to count the samples an unreadable shard loses; never an error)."""
    out: dict[str, int] = {}
    tables: dict[Path, dict[str, Any]] = {}
    for url in urls:
        if _is_remote(url):
            continue
        folder = Path(url).parent
        if folder not in tables:
            try:
                table = json.loads((folder / "sizes.json").read_text())
                tables[folder] = table if isinstance(table, dict) else {}
            except (OSError, ValueError):
                tables[folder] = {}
        try:
            out[url] = int(tables[folder][Path(url).name])
        except (KeyError, TypeError, ValueError):
            pass
    return out


def sample_index(sample: dict[str, Any]) -> int | None:
    """The stable index of a raw sample: json "index", else a numeric key; None when neither exists."""
    raw = sample.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw)
            if isinstance(meta, dict) and "index" in meta:
                return int(meta["index"])
        except (ValueError, TypeError):
            pass
    key = str(sample.get("__key__", "")).rsplit("/", 1)[-1]
    return int(key) if key.isdigit() else None


_INDEX_HELP = (
    "each webdataset sample needs a stable integer index in [0, dataset_size): store it as "
    '"index" in the sample\'s .json (e.g. {"index": 17}) or name the sample with a number (key 00000017); '
    "amorlip.data.writers.write_synthetic_wds shows the layout"
)


def check_first_sample(url: str, needs_indices: bool = True) -> None:
    """Read the first sample of a local shard and (`needs_indices`) check that it carries an index (fails
    early and clearly)."""
    if _is_remote(url):
        return
    try:
        first = next(iter(wds.tarfile_samples(iter([{"url": url}]))), None)
    except Exception as e:  # a truncated or non-tar file
        raise DataError(f"cannot read shard {url} as a tar archive ({error_text(e)}); re-create it") from None
    if first is None:
        raise DataError(f"shard {url} holds no samples; remove it from --data.train-path")
    if needs_indices and sample_index(first) is None:
        raise DataError(f"shard {url}: sample {first.get('__key__')!r} has no index; {_INDEX_HELP}")


def error_text(e: BaseException) -> str:
    """`ReadError: unexpected end of data`, without the stream objects webdataset appends to the args."""
    msg = str(e.args[0]) if getattr(e, "args", None) else str(e)
    return f"{type(e).__name__}: {msg.split(' @ <', 1)[0]}"


def sample_ref(sample: dict[str, Any]) -> str:
    """A raw sample's name in counters and messages: `shard-url:key`."""
    return f"{sample.get('__url__')}:{sample.get('__key__')}"


def decode_sample(sample: dict[str, Any], dataset_size: int, needs_indices: bool = True,
                  running_id: int | None = None) -> tuple[Image.Image | None, str | None, int]:
    """(image or None if missing/undecodable, caption or None, index) of a raw tar sample.

    With `needs_indices` the index must exist and lie in [0, dataset_size); without, a sample that has
    none takes `running_id`.
    """
    index = sample_index(sample)
    if needs_indices:
        if index is None:
            raise DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has no index; {_INDEX_HELP}")
        if not 0 <= index < dataset_size:
            raise DataError(
                f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has index {index}, outside "
                f"[0, {dataset_size}); fix the indices or --data.dataset-size / sizes.json"
            )
    elif index is None:
        if running_id is None:
            raise ValueError("decode_sample: a sample without index needs a running_id")
        index = running_id
    caption = None
    if sample.get("txt") is not None:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            caption = None
    image = None
    for ext in IMAGE_EXTS:
        if sample.get(ext) is not None:
            try:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                image = None
            break
    return image, caption, index


class ShardReader:
    """Reads shards one at a time (webdataset's tar reader), keeping what went wrong with each: a shard read
    that raised, gave no sample, or fewer than its sizes.json count becomes an event
    {'url', 'error', 'lost'} in `events` (handed to the main process with the next batch)."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes, self.events = sizes, []

    def read(self, url: str) -> Iterator[dict[str, Any]]:
        errors: list[BaseException] = []

        def keep_going(exn: BaseException) -> bool:
            errors.append(exn)
            return True

        n = 0
        for sample in wds.tarfile_samples(iter([{"url": url}]), handler=keep_going):
            n += 1
            yield sample
        expected = self.sizes.get(url)
        lost = max(0, expected - n) if expected is not None else 0
        if errors or n == 0 or lost:
            if errors:
                error = error_text(errors[0])
            elif n == 0:
                error = "no samples"
            else:
                error = f"holds {n} of the {expected} samples its sizes.json lists"
            self.events.append({"url": url, "error": f"{error} after {n} samples" if errors and n else error,
                                "lost": lost})

    def read_all(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            yield from self.read(shard["url"])

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
