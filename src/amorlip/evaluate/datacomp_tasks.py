"""DataComp's 38 scored tasks (key, display name, main metric, how each is evaluated) and where their data lies.

The catalogue `amorlip.evaluate.datacomp` evaluates and `amorlip.evaluate.datacomp_scores` averages; torch-free.
Data layout: one folder per task under the DataComp root, in clip_benchmark's wds layout (see
`amorlip.evaluate.datacomp`); `find_task_dir` checks a folder is complete before it is evaluated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

KINDS = ("classification", "retrieval", "iwildcam", "fmow", "dollar_street", "geode", "winogavil")
"""How a task is evaluated (`DataCompTask.kind`; `amorlip.evaluate.datacomp` has one evaluator per kind)."""


@dataclass(frozen=True)
class DataCompTask:
    """One scored DataComp task.

    `key` is DataComp's tasklist key, `name` its display name, `main_metric` the metric DataComp
    averages, `kind` how we evaluate it, `wds_name` the dataset name after clip_benchmark's `wds/`
    prefix (and DataComp's folder name stem), `size` the number of test samples DataComp uses.
    """

    key: str
    name: str
    main_metric: str
    kind: str = "classification"
    size: int = 0
    num_classes: int | None = None
    wds_name: str = ""
    hf_name: str = ""
    """clip-benchmark's name for the dataset where it differs from `wds_name` (its HF repo `wds_<name>`)."""

    @property
    def clip_benchmark_name(self) -> str:
        """The dataset name given to clip_benchmark's `build_dataset` (e.g. `wds/vtab/caltech101`, `wds/flickr30k`).

        Empty for WinoGAViL, which clip_benchmark does not have.
        """
        if self.kind == "winogavil":
            return ""
        return f"wds/{self.hf_name or self.wds_name or self.key}"

    @property
    def folder_names(self) -> list[str]:
        """Accepted folder names under the DataComp root, in the order they are looked for."""
        stem = (self.wds_name or self.key).replace("/", "-")
        names = [f"wds_{stem}_test", f"wds_{stem}", stem]
        if self.hf_name:
            h = self.hf_name.replace("/", "-")
            names += [f"wds_{h}", h]
        key_stem = self.key.replace("/", "-")
        names += [f"wds_{key_stem}_test", key_stem]
        return list(dict.fromkeys(names))


def _c(key: str, name: str, size: int, num_classes: int, metric: str = "acc1", kind: str = "classification",
       wds_name: str = "") -> DataCompTask:
    return DataCompTask(key, name, metric, kind, size, num_classes, wds_name or key)

MPCR = "mean_per_class_recall"

DATACOMP_TASKS: tuple[DataCompTask, ...] = (
    _c("vtab/caltech101", "Caltech-101", 6085, 102, MPCR),
    _c("cifar10", "CIFAR-10", 10000, 10),
    _c("vtab/cifar100", "CIFAR-100", 10000, 100),
    _c("vtab/clevr_count_all", "CLEVR Counts", 15000, 8),
    _c("vtab/clevr_closest_object_distance", "CLEVR Distance", 15000, 6),
    _c("country211", "Country211", 21100, 211),
    _c("vtab/dtd", "Describable Textures", 1880, 47),
    _c("vtab/eurosat", "EuroSAT", 5400, 10),
    _c("fgvc_aircraft", "FGVC Aircraft", 3333, 100, MPCR),
    _c("food101", "Food-101", 25250, 101),
    _c("gtsrb", "GTSRB", 12630, 43),
    _c("imagenet1k", "ImageNet 1k", 50000, 1000),
    _c("imagenet_sketch", "ImageNet Sketch", 50889, 1000),
    _c("imagenetv2", "ImageNet v2", 10000, 1000),
    _c("imagenet-a", "ImageNet-A", 7500, 200),
    _c("imagenet-o", "ImageNet-O", 2000, 200),
    _c("imagenet-r", "ImageNet-R", 30000, 200),
    _c("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", 711, 4),
    _c("mnist", "MNIST", 10000, 10),
    _c("objectnet", "ObjectNet", 18574, 113),
    _c("vtab/flowers", "Oxford Flowers-102", 6149, 102, MPCR),
    _c("vtab/pets", "Oxford-IIIT Pet", 3669, 37, MPCR),
    _c("voc2007", "Pascal VOC 2007", 14976, 20),
    _c("vtab/pcam", "PatchCamelyon", 32768, 2),
    _c("renderedsst2", "Rendered SST2", 1821, 2),
    _c("vtab/resisc45", "RESISC45", 6300, 45),
    _c("cars", "Stanford Cars", 8041, 196),
    _c("stl10", "STL-10", 8000, 10),
    _c("sun397", "SUN397", 108754, 397),
    _c("vtab/svhn", "SVHN", 26032, 10),
    DataCompTask("retrieval/flickr30k", "Flickr", "mean_recall@1", "retrieval", 31014, None,
                 "retrieval/flickr30k", "flickr30k"),
    DataCompTask("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1", "retrieval", 5000,
                 None, "retrieval/mscoco_2014_5k_test_image_text_retrieval", "mscoco_captions"),
    DataCompTask("misc/winogavil", "WinoGAViL", "jaccard_score_10-12", "winogavil", 3563, None, "misc/winogavil"),
    _c("wilds/iwildcam", "iWildCam", 42791, 182, "F1-macro_all", "iwildcam"),
    _c("wilds/camelyon17", "Camelyon17", 85054, 2),
    _c("wilds/fmow", "FMoW", 22108, 62, "acc_worst_region", "fmow"),
    _c("fairness/dollar_street", "Dollar Street", 3503, 58, "acc_top5_wg", "dollar_street", "dollar_street"),
    _c("fairness/geode", "GeoDE", 12488, 40, "acc_wg", "geode", "geode"),
)
"""The 38 tasks DataComp averages, in its tasklist order (FairFace and UTKFace have no main metric)."""

TASKS_BY_KEY: dict[str, DataCompTask] = {t.key: t for t in DATACOMP_TASKS}
_TASKS_BY_NAME: dict[str, DataCompTask] = {t.name: t for t in DATACOMP_TASKS}


def get_task(key_or_name: str) -> DataCompTask:
    """A task by DataComp key (`vtab/caltech101`), display name (`Caltech-101`) or wds name."""
    if key_or_name in TASKS_BY_KEY:
        return TASKS_BY_KEY[key_or_name]
    if key_or_name in _TASKS_BY_NAME:
        return _TASKS_BY_NAME[key_or_name]
    for t in DATACOMP_TASKS:
        if key_or_name in (t.wds_name, t.hf_name) or key_or_name in t.folder_names:
            return t
    raise KeyError(f"unknown DataComp task {key_or_name!r}; known keys: {sorted(TASKS_BY_KEY)}")


def select_tasks(tasks: Sequence[str | DataCompTask] | None) -> list[DataCompTask]:
    """`tasks` as DataCompTask (keys and names looked up by `get_task`); None: all 38."""
    if tasks is None:
        return list(DATACOMP_TASKS)
    return [t if isinstance(t, DataCompTask) else get_task(t) for t in tasks]

# ----------------------------------------------------------------------------------------------------
# Locating data
# ----------------------------------------------------------------------------------------------------
def find_task_dir(root: str | os.PathLike, task: DataCompTask) -> tuple[Path | None, str]:
    """(folder, "") for the first of `task.folder_names` under `root` holding complete data, else (None, reason)."""
    root = Path(root)
    problems = []
    for name in task.folder_names:
        folder = root / name
        if not (folder / "test" / "nshards.txt").is_file():
            continue
        problem = _check_layout(folder, task)
        if not problem:
            return folder, ""
        problems.append(f"{folder}: {problem}")
    if problems:
        return None, "incomplete data: " + "; ".join(problems)
    return None, f"no data: none of {', '.join(task.folder_names)} under {root} has test/nshards.txt"


def shard_count(folder: Path) -> int:
    """The shard count a task folder's `test/nshards.txt` gives."""
    return int((folder / "test" / "nshards.txt").read_text().strip())


def _check_layout(folder: Path, task: DataCompTask) -> str:
    """What is wrong with `folder` as `task`'s data ("" when nothing)."""
    try:
        n = shard_count(folder)
    except ValueError:
        return "test/nshards.txt does not hold an integer"
    absent = [f"test/{i}.tar" for i in range(n) if not (folder / "test" / f"{i}.tar").is_file()]
    if absent:
        return f"shards listed in test/nshards.txt are absent: {absent[:3]}{'...' if len(absent) > 3 else ''}"
    dtype_file = folder / "dataset_type.txt"
    dataset_type = dtype_file.read_text().strip().lower() if dtype_file.is_file() else "classification"
    if task.kind == "retrieval":
        if dataset_type != "retrieval":
            return "retrieval data needs dataset_type.txt containing 'retrieval' (clip_benchmark's wds layout)"
    elif task.kind == "winogavil":
        if dataset_type != "winogavil":
            return "WinoGAViL data needs dataset_type.txt containing 'winogavil' (written by export_winogavil)"
    else:
        for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
            if not (folder / f).is_file():
                return f"classification data needs {f}"
    return ""
