"""Fashion-MNIST as real image-caption data (the IDX files of Debian's `dataset-fashion-mnist` package).

* Training pairs (`FashionMNISTPairs`): each TRAIN item is either composed onto a 64 px black canvas
  with a random colour, size and grid position and a caption that says so ("a small red sneaker in the
  top left"), or -- a fraction `p_plain` of the time (default 30%) -- shown plainly, grey and filling
  the canvas, with a caption like "a photo of a sneaker". The plain looks match the unmodified test
  images, so zero-shot accuracy measures the model rather than a train/test shift. Pair `i` uses train
  item `i` and is a pure function of (seed, i), i in [0, 60000).
* Zero-shot (`fashion_mnist_zeroshot_task`): the unmodified TEST split, 10 classes, several templates.
* Retrieval (`fashion_mnist_retrieval_split`): composed TEST items only, with their captions.

The files are read with numpy (gzip or plain). Default folder: /usr/share/datasets/fashion-mnist
(`apt-get install dataset-fashion-mnist`); `--data.fmnist-root` points elsewhere.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from amorlip.data.types import DataError, RetrievalSplit, ZeroShotTask

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

CLASSNAMES: list[str] = [
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
"""Readable names of the 10 labels (the dataset's T-shirt/top, Trouser, ..., Ankle boot)."""
_CLASS_WORDS: list[list[str]] = [
    ["t-shirt", "tee", "top"], ["pair of trousers", "pair of pants"], ["pullover", "sweater", "jumper"],
    ["dress"], ["coat", "jacket"], ["sandal"], ["shirt", "blouse"], ["sneaker", "trainer", "running shoe"],
    ["bag", "handbag", "purse"], ["ankle boot", "boot"],
]
TEMPLATES: list[str] = [
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a black and white photo of a {}.",
    "a {}.", "a product photo of a {}.",
]
_PLAIN_CAPTIONS: list[str] = [
    "a photo of {}", "a picture of {}", "an image of {}", "a black and white photo of {}",
    "{}", "a product photo of {}", "{} in grey on a black background", "{} filling the picture",
]
"""Filled with the class word and its article ("an ankle boot")."""

_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (50, 200, 60), "blue": (60, 100, 240), "yellow": (245, 230, 50),
    "purple": (160, 60, 215), "orange": (250, 145, 20), "pink": (250, 120, 190), "white": (250, 250, 250),
}
_SIZES: dict[str, int] = {"small": 20, "medium": 30, "large": 42}
"""Item side length in pixels on the 64 px canvas."""
_SIZE_WORDS: dict[str, list[str]] = {
    "small": ["small", "little", "tiny"], "medium": ["medium", "medium-sized"], "large": ["large", "big"],
}
_POSITIONS: list[str] = [
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
]
_POS_PHRASES: dict[str, list[str]] = {
    "top left": ["in the top left", "in the upper left corner"], "top": ["at the top", "in the top middle"],
    "top right": ["in the top right", "in the upper right corner"], "left": ["on the left", "at the left side"],
    "center": ["in the center", "in the middle"], "right": ["on the right", "at the right side"],
    "bottom left": ["in the bottom left", "in the lower left corner"], "bottom": ["at the bottom", "in the bottom middle"],
    "bottom right": ["in the bottom right", "in the lower right corner"],
}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_IDS = {"train": 10, "test": 11}
N_TRAIN = 60000
N_TEST = 10000


def resolve_root(root: str | Path | None) -> Path:
    return Path(root) if root else DEFAULT_ROOT


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install it with "
        f"`apt-get install dataset-fashion-mnist` (files land in {DEFAULT_ROOT}) "
        f"or pass --data.fmnist-root FOLDER with the four IDX files"
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array (big-endian header, ubyte data)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); re-install dataset-fashion-mnist")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX data type {dtype_code:#x} is not unsigned byte, which Fashion-MNIST uses")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int).tolist()
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values from the header, found {data.size} (truncated?)")
    return data.reshape(dims)


@lru_cache(maxsize=4)
def load_split(root: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels int64 (N,)) of "train" or "test"; cached per process."""
    root = resolve_root(root)
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def available(root: str | Path | None = None) -> bool:
    """True when the four IDX files are present."""
    r = resolve_root(root)
    try:
        for stems in _FILES.values():
            for stem in stems:
                _find(r, stem)
    except DataError:
        return False
    return True


def _pick(rng: np.random.Generator, words: list[str], p_canonical: float = 0.7) -> str:
    if len(words) == 1 or rng.random() < p_canonical:
        return words[0]
    return words[int(rng.integers(1, len(words)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def plain_image(item: np.ndarray, canvas: int = 64) -> Image.Image:
    """The grey item filling the canvas (what a resized test image looks like)."""
    return Image.fromarray(item, "L").resize((canvas, canvas), Image.BILINEAR).convert("RGB")


def compose(item: np.ndarray, label: int, rng: np.random.Generator, canvas: int = 64) -> tuple[Image.Image, str]:
    """Place the item, tinted with a random colour, at a random size and grid cell of a black canvas."""
    color = list(_COLORS)[int(rng.integers(len(_COLORS)))]
    size = list(_SIZES)[int(rng.integers(len(_SIZES)))]
    pos = int(rng.integers(len(_POSITIONS)))
    side = int(round(_SIZES[size] * canvas / 64 * rng.uniform(0.93, 1.07)))
    small = np.asarray(Image.fromarray(item, "L").resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    row, col = divmod(pos, 3)
    jitter = max(1, canvas // 32)

    def offset(cell: int) -> int:  # grid cell -> top-left coordinate; the item always fits the canvas
        base = (0, (canvas - side) // 2, canvas - side)[cell]
        return int(np.clip(base + rng.integers(-jitter, jitter + 1), 0, canvas - side))

    y0, x0 = offset(row), offset(col)
    out = np.zeros((canvas, canvas, 3), dtype=np.float32)
    out[y0:y0 + side, x0:x0 + side] = small[..., None] * np.asarray(_COLORS[color], dtype=np.float32)
    img = Image.fromarray(out.astype(np.uint8), "RGB")

    noun = _pick(rng, _CLASS_WORDS[label])
    size_w, pos_w = _pick(rng, _SIZE_WORDS[size]), _pick(rng, _POS_PHRASES[_POSITIONS[pos]])
    t = int(rng.integers(5))
    if t == 0:
        caption = f"{_article(f'{size_w} {color} {noun}')} {pos_w}"
    elif t == 1:
        caption = f"a photo of {_article(f'{size_w} {color} {noun}')} {pos_w}"
    elif t == 2:
        caption = f"{pos_w}, {_article(f'{color} {noun}')} of {size_w} size"
    elif t == 3:
        caption = f"{_article(f'{color} {noun}')} {pos_w}"
    else:
        caption = f"{_article(f'{size_w} {noun}')} in {color} {pos_w}"
    return img, caption


def _pair(item: np.ndarray, label: int, rng: np.random.Generator, p_plain: float, canvas: int) -> tuple[Image.Image, str]:
    if rng.random() < p_plain:
        template = _PLAIN_CAPTIONS[int(rng.integers(len(_PLAIN_CAPTIONS)))]
        return plain_image(item, canvas), template.format(_article(_pick(rng, _CLASS_WORDS[label])))
    return compose(item, label, rng, canvas)


class FashionMNISTPairs(Dataset):
    """Training image-caption pairs from the TRAIN split: `ds[i] -> (PIL RGB, caption)`, i < size <= 60000."""

    def __init__(self, root: str | Path | None = None, seed: int = 0, size: int | None = None,
                 p_plain: float = 0.3, canvas: int = 64):
        self.images, self.labels = load_split(str(resolve_root(root)), "train")
        n = len(self.images)
        if size is not None and not 0 < size <= n:
            raise DataError(f"Fashion-MNIST has {n} training items; data.dataset_size={size} must be in [1, {n}]")
        self.size = size or n
        self.seed, self.p_plain, self.canvas = seed, p_plain, canvas

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, _SPLIT_IDS["train"], index])
        return _pair(self.images[index], int(self.labels[index]), rng, self.p_plain, self.canvas)


class _TestItems(Dataset):
    """Unmodified TEST images `(PIL RGB 28x28, label)`."""

    def __init__(self, root: str | Path | None, n: int | None):
        self.images, self.labels = load_split(str(resolve_root(root)), "test")
        self.n = len(self.images) if n is None else min(n, len(self.images))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        return Image.fromarray(self.images[index], "L").convert("RGB"), int(self.labels[index])


class _ComposedTest(Dataset):
    """Composed TEST items with captions `(PIL RGB, caption)`: a seeded subset of the test split."""

    def __init__(self, root: str | Path | None, n: int, seed: int, canvas: int = 64):
        self.images, self.labels = load_split(str(resolve_root(root)), "test")
        n = min(n, len(self.images))
        self.order = np.random.default_rng([int(seed) & 0xFFFFFFFF, _SPLIT_IDS["test"]]).permutation(len(self.images))[:n]
        self.seed, self.canvas = seed, canvas

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        item = int(self.order[index])
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, _SPLIT_IDS["test"], item])
        return compose(self.images[item], int(self.labels[item]), rng, self.canvas)


def fashion_mnist_zeroshot_task(root: str | Path | None = None, n: int | None = None) -> ZeroShotTask:
    """Zero-shot classification over the unmodified TEST split (its first `n` items; all when None)."""
    return ZeroShotTask(name="fashion-mnist", classnames=list(CLASSNAMES), templates=list(TEMPLATES),
                        dataset=_TestItems(root, n))


def fashion_mnist_retrieval_split(root: str | Path | None = None, n: int = 500, seed: int = 0) -> RetrievalSplit:
    """`n` composed TEST items with their captions (never seen in training: the train split is separate)."""
    return RetrievalSplit(name="fashion-mnist-composed", dataset=_ComposedTest(root, n, seed))


# ----------------------------------------------------------------------------------------------------
# The `fashion-mnist` data source (`amorlip.data.sources`)


def train_stream(cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 needs_indices: bool = True) -> Any:
    """The training stream of `data.source fashion-mnist` (`cfg` a `DataConfig`): composed pairs of the train
    split under `data.fmnist_root` (its first `data.dataset_size`), indexed by row."""
    from amorlip.data.mapstyle import map_stream

    dataset = FashionMNISTPairs(cfg.fmnist_root, seed=seed, size=cfg.dataset_size)
    return map_stream(dataset, cfg, batch_size, seed, rank, world_size, name="fashion-mnist", pin_memory=pin_memory)


def fashion_mnist_eval_data(cfg: Any, seed: int) -> tuple[list[ZeroShotTask], RetrievalSplit]:
    """The test-split zero-shot task (`data.eval_size` items) and `data.val_size` composed test pairs."""
    return ([fashion_mnist_zeroshot_task(cfg.fmnist_root, cfg.eval_size)],
            fashion_mnist_retrieval_split(cfg.fmnist_root, cfg.val_size, seed))
