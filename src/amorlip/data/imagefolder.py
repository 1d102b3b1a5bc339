"""Validation on the user's own data: image-caption pairs (`data.val_path`) and an ImageNet-style folder
(`eval.imagenet_root`).

* `data.val_path`: the training formats. A CSV file (columns `data.csv_img_key` / `data.csv_caption_key`,
  separator `data.csv_separator`, relative image paths resolved against the CSV's folder; read with
  `csvdata.CsvCaptions`), or webdataset shards (a brace pattern, patterns joined with `::`, a `.tar` file or a
  folder of `.tar`; `KEY.{jpg,jpeg,png,webp}` + `KEY.txt`), read sequentially in their listed order (no index
  needed). Every pair is used, in file order: retrieval split `val` (pair i <-> i).
* `eval.imagenet_root`: a folder with one sub-folder per class holding its images (torchvision's ImageFolder
  layout; classes in sorted sub-folder order, labels 0..C-1). When every sub-folder is an ImageNet-1k synset
  (`n01440764`, ...: the 1000 of them, or a subset), the class names are open_clip's `IMAGENET_CLASSNAMES`
  for those synsets and the task is called `imagenet`; otherwise the sub-folder names are the class names and
  the task takes the folder's name. The prompts are always open_clip's `OPENAI_IMAGENET_TEMPLATES` (80).

Everything is checked when the split / task is built (before any model): a missing path, a CSV without the
caption column or with an empty caption, a sample without caption or image, an image PIL cannot read (header
and checksums, `Image.verify`), a folder without class sub-folders or a class folder without images raise a
`DataError` naming the file and the fix. `check_paths`
is the cheap part of those checks (existence and layout), run by `config.check_machine`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from amorlip.data.types import DataError, RetrievalSplit, ZeroShotTask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Image files of a class folder (torchvision's ImageFolder extensions)."""

_PAIRS_HELP = ("validation pairs need captions: pass --data.val-path a CSV with image-path and caption columns, or "
               "webdataset shards with KEY.txt captions")


def imagenet_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompts as `{c}` format strings (what our zero-shot and clip_benchmark take)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted), from clip_benchmark."""
    from clip_benchmark.datasets.builder import all_imagenet_wordnet_ids

    return list(all_imagenet_wordnet_ids)


def val_format(path: str) -> str:
    """"csv" for a file that is not a `.tar`, "wds" for a folder, a `.tar`, a brace pattern or `::`-joined list."""
    p = Path(path).expanduser()
    if "::" in path or "{" in path or path.endswith(".tar") or p.is_dir():
        return "wds"
    return "csv"


# ----------------------------------------------------------------------------------------------------
# data.val_path: image-caption pairs
# ----------------------------------------------------------------------------------------------------


def _open_image(data: Any, name: str) -> Image.Image:
    try:
        with Image.open(data) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"validation image {name} cannot be read ({type(e).__name__}: {e}) "
                        "(re-create it, or drop it from data.val_path)") from None


def _check_image(data: Any, name: str, fix: str) -> None:
    """That `data` (a path or a file object) is an image PIL can read: its header and, for PNG, its checksums
    (`Image.verify`: no full decode, so checking every validation image before training is cheap)."""
    try:
        with Image.open(data) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"validation image {name} cannot be read ({type(e).__name__}: {e}) ({fix})") from None


class CsvPairs(Dataset):
    """`ds[i] -> (PIL image RGB, caption)` of every row of a validation CSV (checked when built)."""

    def __init__(self, path: str, img_key: str = "filepath", caption_key: str = "title", separator: str = ","):
        from amorlip.data.csvdata import CsvCaptions

        csv = CsvCaptions(path, img_key, caption_key, separator)
        for i, caption in enumerate(csv.captions):
            where = f"data.val_path {csv.path} line {i + 2}"
            if not caption:
                raise DataError(f"{where} has no caption in column {caption_key!r} (every validation row needs one: fill "
                                f"it in, drop the row, or choose the caption column with --data.csv-caption-key)")
            if not csv.image_paths[i]:
                raise DataError(f"{where} has no image path in column {img_key!r} (fill it in or drop the row)")
            image = csv.resolve(i)
            if not image.is_file():
                raise DataError(f"{where}: image {image} does not exist (relative paths are resolved against "
                                f"{csv.root}; correct the path or drop the row)")
            _check_image(image, f"{image} ({where})", "re-create it, or drop the row from data.val_path")
        self.csv = csv

    def __len__(self) -> int:
        return len(self.csv)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        path = self.csv.resolve(i)
        return _open_image(path, str(path)), self.csv.captions[i]


class WdsPairs(IterableDataset):
    """The (PIL image RGB, caption) pairs of webdataset shards, read sequentially in shard order.

    Building it reads every shard once: it counts the pairs (`len`) and checks that each sample has a
    caption and an image.
    """

    def __init__(self, path: str):
        from amorlip.data.wds_shards import IMAGE_EXTS, expand_shards

        try:
            self.urls = expand_shards(path)
        except DataError as e:
            text = str(e).replace("--data.train-path", "--data.val-path").replace("data.train_path", "data.val_path")
            if Path(path).expanduser().is_dir():
                text = f"data.val_path {path} is a folder without .tar shards ({_PAIRS_HELP})"
            raise DataError(text if text.startswith("data.val_path") else f"data.val_path: {text}") from None
        self.exts = IMAGE_EXTS
        n = 0
        for sample in self._raw():
            ref = f"{sample.get('__url__')}:{sample.get('__key__')}"
            caption = self._caption(sample)
            if not caption:
                raise DataError(f"data.val_path sample {ref} has no caption (every validation sample needs a non-empty "
                                f"KEY.txt next to its image; {_PAIRS_HELP})")
            data = self._image_bytes(sample)
            if data is None:
                raise DataError(f"data.val_path sample {ref} has no image (every sample needs KEY.{{{','.join(self.exts)}}})"
                                )
            _check_image(io.BytesIO(data), f"{ref} (data.val_path)", "re-write that shard without it")
            n += 1
        if n == 0:
            raise DataError(f"data.val_path {path} holds no samples (write shards with `amorlip data wds --out DIR`)")
        self.n = n

    def _raw(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        from amorlip.data.wds_shards import error_text

        for url in self.urls:
            try:
                yield from wds.tarfile_samples(iter([{"url": url}]))
            except Exception as e:  # a truncated or non-tar file
                raise DataError(f"data.val_path shard {url} cannot be read ({error_text(e)}) (re-create it)") from None

    @staticmethod
    def _caption(sample: dict[str, Any]) -> str:
        raw = sample.get("txt")
        try:
            return raw.decode("utf-8").strip() if raw is not None else ""
        except UnicodeDecodeError:
            return ""

    def _image_bytes(self, sample: dict[str, Any]) -> bytes | None:
        return next((sample[e] for e in self.exts if sample.get(e) is not None), None)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        for sample in self._raw():
            ref = f"{sample.get('__url__')}:{sample.get('__key__')}"
            yield _open_image(io.BytesIO(self._image_bytes(sample)), ref), self._caption(sample)


def val_pairs(path: str, img_key: str = "filepath", caption_key: str = "title", separator: str = ",",
              name: str = "val") -> RetrievalSplit:
    """The retrieval split of a validation CSV or webdataset shards (see the module docstring)."""
    p = Path(path).expanduser()
    if val_format(path) == "csv":
        if not p.exists():
            raise DataError(f"data.val_path {path} does not exist (pass a CSV file, webdataset shards or a shard folder)")
        dataset: Dataset = CsvPairs(path, img_key, caption_key, separator)
    else:
        dataset = WdsPairs(path)
    return RetrievalSplit(name, dataset)


# ----------------------------------------------------------------------------------------------------
# eval.imagenet_root: an ImageNet-style class folder
# ----------------------------------------------------------------------------------------------------


class FolderImages(Dataset):
    """`ds[i] -> (PIL image RGB, label)` over `samples` [(path, label)]; `classes` lists the class names."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str]):
        self.samples, self.classes = samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return _open_image(path, str(path)), label


def _class_dirs(root: str, key: str) -> tuple[Path, list[Path]]:
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"{key} {root} does not exist (pass a folder with one sub-folder of images per class)")
    if not p.is_dir():
        raise DataError(f"{key} {root} is not a folder (pass a folder with one sub-folder of images per class)")
    dirs = sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not dirs:
        raise DataError(f"{key} {root} has no class sub-folders (put each class's images in a sub-folder named after "
                        "the class or its ImageNet synset, e.g. n01440764/)")
    return p, dirs


def _images(folder: Path) -> list[Path]:
    return sorted((f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                  key=lambda f: str(f))


def folder_classnames(dir_names: list[str]) -> tuple[list[str], bool]:
    """Class names for sorted sub-folder names, and whether they are ImageNet synsets."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    synsets = {s: i for i, s in enumerate(imagenet_synsets())}
    if all(d in synsets for d in dir_names):
        return [IMAGENET_CLASSNAMES[synsets[d]] for d in dir_names], True
    return list(dir_names), False


def imagenet_folder_task(root: str, key: str = "eval.imagenet_root") -> ZeroShotTask:
    """The zero-shot task of an ImageNet-style folder (see the module docstring)."""
    p, dirs = _class_dirs(root, key)
    samples: list[tuple[Path, int]] = []
    for label, d in enumerate(dirs):
        files = _images(d)
        if not files:
            raise DataError(f"{key} {root}: class folder {d.name}/ holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                            "(add its images or remove the folder)")
        for f in files:
            _check_image(f, f"{f} ({key})", f"re-create it, or remove it from {root}")
        samples.extend((f, label) for f in files)
    classnames, is_imagenet = folder_classnames([d.name for d in dirs])
    name = "imagenet" if is_imagenet else (p.resolve().name or "folder")
    return ZeroShotTask(name, classnames, imagenet_templates(), FolderImages(samples, classnames))


# ----------------------------------------------------------------------------------------------------
# cheap checks (config.check_machine)
# ----------------------------------------------------------------------------------------------------


def check_paths(val_path: str | None, imagenet_root: str | None, img_key: str = "filepath",
                caption_key: str = "title", separator: str = ",") -> None:
    """The layout checks of `val_pairs` / `imagenet_folder_task` without reading every image: the CSV's columns
    and captions, the shards' existence, the class folders and that each holds an image."""
    if val_path:
        if val_format(val_path) == "csv":
            val_pairs(val_path, img_key, caption_key, separator)  # reads the CSV and stats its images
        else:
            from amorlip.data.wds_shards import expand_shards

            if Path(val_path).expanduser().is_dir() and not any(Path(val_path).expanduser().glob("*.tar")):
                raise DataError(f"data.val_path {val_path} is a folder without .tar shards ({_PAIRS_HELP})")
            try:
                expand_shards(val_path)
            except DataError as e:
                raise DataError(f"data.val_path: {e}".replace("--data.train-path", "--data.val-path")) from None
    if imagenet_root:
        _, dirs = _class_dirs(imagenet_root, "eval.imagenet_root")
        for d in dirs:
            if next((f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES), None) is None:
                raise DataError(f"eval.imagenet_root {imagenet_root}: class folder {d.name}/ holds no images "
                                "(add its images or remove the folder)")
