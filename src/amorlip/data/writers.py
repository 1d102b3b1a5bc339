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
