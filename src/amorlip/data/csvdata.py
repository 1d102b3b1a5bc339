"""Image-caption pairs listed in a CSV file (open_clip's `--dataset-type csv` layout).

One row per pair: an image path column (`data.csv_img_key`, default `filepath`) and a caption column
(`data.csv_caption_key`, default `title`), separated by `data.csv_separator`. Relative image paths are
resolved against the CSV file's folder. The stable sample index is the row number (0 = first data row).

The file and its columns are checked when the dataset is built; an image that is missing or unreadable
when it is read only makes that sample "corrupt" (skipped and counted by the training stream).
"""
from __future__ import annotations

import csv
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from amorlip.data.types import DataError

_SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


class CsvCaptions(Dataset):
    """`ds[i] -> (PIL.Image RGB | None, caption)`: the image is None when it cannot be read.

    `limit` keeps only the first `limit` rows (data.dataset_size).
    """

    def __init__(self, path: str | Path, img_key: str = "filepath", caption_key: str = "title",
                 separator: str = ",", limit: int | None = None):
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(
                f"CSV file {str(path)!r} not found; pass --data.train-path pointing to an existing CSV with "
                f"image-path and caption columns (`amorlip data csv --out DIR` writes an example)"
            )
        separator = _SEPARATOR_NAMES.get(separator, separator)
        if len(separator) != 1:
            raise DataError(f"data.csv_separator must be one character (or 'tab'), got {separator!r}")
        try:
            rows = _read_rows(path, img_key, caption_key, separator)
        except UnicodeDecodeError as e:
            kind = "a tar archive (webdataset shards: --data.source wds)" if tarfile.is_tarfile(path) else "text in another encoding"
            raise DataError(
                f"{path} is not a UTF-8 CSV file (byte {e.start} cannot be decoded; it looks like {kind}); pass a "
                f"UTF-8 CSV with image-path and caption columns (re-encode it, e.g. `iconv -t utf-8`)"
            ) from None
        except (OSError, csv.Error) as e:
            raise DataError(f"{path}: cannot be read as a CSV file ({e}); pass a readable UTF-8 CSV") from None
        if not rows:
            raise DataError(f"{path}: the CSV has a header but no rows; add image-caption rows")
        if limit is not None:
            if not 0 < limit <= len(rows):
                raise DataError(f"{path} has {len(rows)} rows; data.dataset_size={limit} must be in [1, {len(rows)}]")
            rows = rows[:limit]
        self.path = path
        self.root = path.parent
        self.img_key, self.caption_key = img_key, caption_key
        self.image_paths = [p.strip() for p, _ in rows]
        self.captions = [c.strip() for _, c in rows]

    def __len__(self) -> int:
        return len(self.captions)

    def resolve(self, index: int) -> Path:
        p = Path(self.image_paths[index]).expanduser()
        return p if p.is_absolute() else self.root / p

    def __getitem__(self, index: int) -> tuple[Image.Image | None, str]:
        """The caption is always returned; the image is None when the file is missing or unreadable.

        An empty caption skips the (useless) image read.
        """
        index = int(index)
        caption = self.captions[index]
        if not caption or not self.image_paths[index]:
            return None, caption
        try:
            with Image.open(self.resolve(index)) as im:
                return im.convert("RGB"), caption
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, caption

    def describe(self, index: int, kind: str = "corrupt") -> str:
        """A bad sample's name in messages: its image file, or the CSV line of a row without caption/path."""
        line = f"{self.path.name} line {int(index) + 2}"  # the header is line 1
        if kind == "no_caption":
            return f"{line} (no caption)"
        return str(self.resolve(index)) if self.image_paths[index] else f"{line} (no image path)"

    def hint(self, corrupt: list[int], no_caption: list[int]) -> str:
        """The fix for the bad rows seen so far (looks at the first few image files again)."""
        fixes = []
        if corrupt:
            missing = [i for i in corrupt if self.image_paths[i] and not self.resolve(i).is_file()]
            if missing:
                fixes.append(
                    f"{len(missing)} of the {len(corrupt)} bad rows checked name image files that do not exist "
                    f"(e.g. {self.resolve(missing[0])}); relative paths in column {self.img_key!r} are resolved "
                    f"against the CSV's folder {self.root}: correct them (or use absolute paths), or choose the "
                    f"right column with --data.csv-img-key")
            if len(missing) < len(corrupt):
                fixes.append("the other bad images exist but are not readable images: re-create them or drop their rows")
        if no_caption:
            fixes.append(f"rows with an empty column {self.caption_key!r} have no caption: fill it in, or choose the "
                         f"caption column with --data.csv-caption-key")
        return "; ".join(fixes) or "check the CSV's image paths and captions"


def _read_rows(path: Path, img_key: str, caption_key: str, separator: str) -> list[tuple[str, str]]:
    """The (image path, caption) rows of a UTF-8 CSV; a clear DataError when the columns are missing."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        header = reader.fieldnames or []
        missing = [k for k in (img_key, caption_key) if k not in header]
        if missing:
            raise DataError(
                f"{path}: column(s) {missing} not found; the header has {header} (read with separator "
                f"{separator!r}). Set --data.csv-img-key / --data.csv-caption-key to the right column names "
                f"or --data.csv-separator to the file's separator"
            )
        return [(r.get(img_key) or "", r.get(caption_key) or "") for r in reader]


def train_stream(cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 needs_indices: bool = True) -> Any:
    """The training stream of `data.source csv` (`cfg` a `DataConfig`): the rows of `data.train_path` (its first
    `data.dataset_size`), indexed by row."""
    from amorlip.data.mapstyle import map_stream

    if not cfg.train_path:
        raise DataError("data.source=csv needs --data.train-path pointing to a CSV file")
    dataset = CsvCaptions(cfg.train_path, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator,
                          limit=cfg.dataset_size)
    return map_stream(dataset, cfg, batch_size, seed, rank, world_size, name=f"csv {cfg.train_path}",
                      pin_memory=pin_memory)
