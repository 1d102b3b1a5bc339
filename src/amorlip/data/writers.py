"""Write the synthetic scenes as a CSV dataset or as webdataset shards (to try those paths, and for tests).

Sample `i` of the written data is `SyntheticScenes(n, seed)[i]` and carries index `i` (the CSV row number;
the shards' json `"index"` and numeric key), so a stream over the files can be checked against the source.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import webdataset as wds

from amorlip.data.synthetic import SyntheticScenes
from amorlip.data.types import DataError


def write_synthetic_csv(out_dir: str | Path, n: int, seed: int = 0, render_size: int = 64) -> Path:
    """PNG files under `out_dir/images/` and `out_dir/train.csv` (columns `filepath`, `title`; relative paths)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = SyntheticScenes(n, seed=seed, split="train", render_size=render_size)
    csv_path = out / "train.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(n):
            image, caption = ds[i]
            rel = f"images/{i:08d}.png"
            image.save(out / rel)
            writer.writerow([rel, caption])
    return csv_path


def write_synthetic_wds(out_dir: str | Path, n: int, seed: int = 0, shard_size: int = 1000,
                        render_size: int = 64, image_format: str = "jpg") -> list[Path]:
    """Tar shards `out_dir/shard-%05d.tar` of `shard_size` samples (image + txt + json {"index"}) and a sizes.json.

    `image_format` is "jpg" (quality 95) or "png" (lossless).
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = SyntheticScenes(n, seed=seed, split="train", render_size=render_size)
    pattern = str(out / "shard-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i in range(n):
            image, caption = ds[i]
            buf = io.BytesIO()
            if image_format == "jpg":
                image.save(buf, format="JPEG", quality=95)
            else:
                image.save(buf, format="PNG")
            sink.write({"__key__": f"{i:08d}", image_format: buf.getvalue(), "txt": caption,
                        "json": {"index": i, "caption": caption}})
    shards = sorted(out.glob("shard-*.tar"))
    sizes = {p.name: min(shard_size, n - k * shard_size) for k, p in enumerate(shards)}
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return shards


# ----------------------------------------------------------------------------------------------------
# `amorlip data csv|wds`: checked before any work, written beside the target, published by renames

DATASET_FILES = {"csv": ("train.csv", "images"), "wds": ("shard-*.tar", "sizes.json")}
"""What each format writes into --out (what `--overwrite` replaces; nothing else in the folder is touched)."""


def check_dataset_out(fmt: str, out: Path, n: int, shard_size: int, overwrite: bool) -> None:
    """ConfigError naming the fix for arguments that cannot give a dataset: no pairs, no shard size, an --out that
    is (or lies under) a file, or one that already holds a dataset of this format and no --overwrite."""
    from amorlip.errors import ConfigError

    if n < 1:
        raise ConfigError(f"--n must be at least 1 (the number of pairs to write), got {n}")
    if fmt == "wds" and shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1 (pairs per shard), got {shard_size}")
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out}: {folder} is a file, not a folder; pass a new or empty folder")
        if folder.exists():
            break
    existing = [p.name for pattern in DATASET_FILES[fmt] for p in sorted(out.glob(pattern))] if out.is_dir() else []
    if existing and not overwrite:
        raise ConfigError(f"--out {out} already holds a {fmt} dataset ({', '.join(existing[:3])}); pass --overwrite "
                          "to replace it, or another --out")


def write_dataset(fmt: str, out: str | Path, n: int, seed: int = 0, shard_size: int = 1000,
                  overwrite: bool = False) -> list[Path]:
    """`amorlip data`: the synthetic data as CSV+PNG (returns [train.csv]) or shards (returns the shards).

    Written into a temporary folder beside `out` first, then moved in by renames (replacing an earlier dataset's
    files with `overwrite`), so a failed write (full disk, read-only folder) leaves `out` as it was and no
    temporary behind; the failure is a DataError naming the folder."""
    import os
    import shutil

    out = Path(out)
    check_dataset_out(fmt, out, n, shard_size, overwrite)
    created = not out.exists()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            write_synthetic_csv(tmp, n, seed)
        else:
            write_synthetic_wds(tmp, n, seed, shard_size)
        for pattern in DATASET_FILES[fmt]:  # the earlier dataset's files (only with overwrite: checked above)
            for old in out.glob(pattern):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        for new in sorted(tmp.iterdir()):
            os.replace(new, out / new.name)
        tmp.rmdir()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise DataError(f"could not write the dataset to {out}: {e.strerror or e}; free disk space or pass a "
                        "writable --out") from None
    return [out / "train.csv"] if fmt == "csv" else sorted(out.glob("shard-*.tar"))
