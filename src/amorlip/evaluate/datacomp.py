"""The DataComp benchmark (38 scored tasks) on local data, through clip_benchmark's Python API.

DataComp (Gadre et al., 2023; github.com/mlfoundations/datacomp, `tasklist.yml`, `evaluate.py`,
`eval_utils/`) scores a CLIP model on 38 tasks; each has one main metric and the benchmark number is
their unweighted mean. What DataComp computes, and what we do:

* 31 zero-shot classification tasks (30 + Camelyon17): as DataComp's `wds_eval.py`, clip_benchmark's
  `build_dataset("wds/<task>")`, `zero_shot_classifier` and `run_classification` on the task's
  webdataset (wds), then acc1 / acc5 / scikit-learn's balanced accuracy. Main metric `acc1`, except
  `mean_per_class_recall` for Caltech-101, FGVC Aircraft, Oxford Flowers-102 and Oxford-IIIT Pet.
  (clip_benchmark's `zeroshot_classification.evaluate` would compute the same, but its `accuracy`
  fails under NumPy >= 2.4, so top-k accuracy is computed here.)
* Flickr30k and MSCOCO retrieval: clip_benchmark's `zeroshot_retrieval.evaluate` with K = 1, 5, 10;
  main metric `mean_recall@1` = (image R@1 + text R@1) / 2. DataComp reads these from the Hugging Face
  datasets `nlphuji/flickr30k` (all 31,014 images) and `nlphuji/mscoco_2014_5k_test_image_text_retrieval`;
  here they are read from clip_benchmark-format retrieval wds folders (docs/evaluation.md says how to
  convert them; clip-benchmark's own `wds_flickr30k` is the 1k-image Karpathy test split, not the same).
* iWildCam: `F1-macro_all` = macro F1 over the classes present in the labels (WILDS' F1 metric,
  scikit-learn `f1_score(average="macro", labels=unique(y_true))`) of the argmax predictions.
* FMoW: `acc_worst_region` = the lowest accuracy over the regions (metadata column 0) with samples.
  DataComp's code means to skip the region "Other", but its evaluator has no metadata map, so region
  names are never seen and no region is skipped; we reproduce the number its code produces.
* Dollar Street: `acc_top5_wg` = the lowest top-5 accuracy over the income groups (metadata column 0).
* GeoDE: `acc_wg` = the lowest top-1 accuracy over the regions (metadata column 0).
  (iWildCam, FMoW, Dollar Street and GeoDE: clip_benchmark builds the dataset, classifier and logits;
  the per-sample metadata comes from each sample's `npy` entry in the same wds, as DataComp reads it.)
* WinoGAViL: `jaccard_score_10-12`: for each instance (a cue word and 10 or 12 candidate images of which
  n are associated), the n images most similar to the prompt "A/An <cue>" are chosen and scored by the
  Jaccard index with the true set; the mean over instances with 10-12 candidates. DataComp reads
  `nlphuji/winogavil` from Hugging Face and clip_benchmark has no WinoGAViL; we read a wds folder of
  our own layout (`export_winogavil` writes it; docs/evaluation.md).

Data layout: one folder per task under `root`, in clip_benchmark's wds layout
(`<folder>/test/nshards.txt`, `<folder>/test/0.tar ...`, `<folder>/classnames.txt`,
`<folder>/zeroshot_classification_templates.txt`, and `<folder>/dataset_type.txt` = `retrieval` for
retrieval). The folder may be named as DataComp's `download_evalsets.py` names it
(`wds_vtab-caltech101_test`), as the clip-benchmark Hugging Face repositories are named
(`wds_vtab-caltech101`) or plainly (`vtab-caltech101`); see `DataCompTask.folder_names`.
A task without data is reported as missing and the average is labelled partial; it never crashes.

This module runs the evaluations (clip_benchmark access, one evaluator per task kind, `run_datacomp`); the task
catalogue and the data folders are `amorlip.evaluate.datacomp_tasks`, the metrics and the average
`amorlip.evaluate.datacomp_scores` (both re-exported here).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from amorlip.evaluate.datacomp_scores import (
    aggregate,
    datacomp_table,
    finite_or_none,
    jaccard,
    load_results,
    macro_f1_present,
    winogavil_metrics,
    winogavil_prompt,
    worst_group_accuracy,
)
from amorlip.evaluate.datacomp_tasks import (
    DATACOMP_TASKS,
    TASKS_BY_KEY,
    DataCompTask,
    find_task_dir,
    get_task,
    select_tasks,
    shard_count,
)
from amorlip.evaluate.report import write_json
from amorlip.evaluate.zeroshot import eval_mode, topk_accuracy

__all__ = [  # the DataComp API in one place: the evaluation here, the catalogue and the scores re-exported
    "run_datacomp", "export_winogavil", "require_clip_benchmark",
    "DATACOMP_TASKS", "TASKS_BY_KEY", "DataCompTask", "find_task_dir", "get_task",
    "aggregate", "datacomp_table", "load_results",
    "jaccard", "macro_f1_present", "winogavil_metrics", "winogavil_prompt", "worst_group_accuracy",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# clip_benchmark access
# ----------------------------------------------------------------------------------------------------


def require_clip_benchmark() -> None:
    """A one-line error naming the extra when clip_benchmark (only DataComp evaluation needs it) is not installed."""
    import importlib

    from amorlip.errors import ConfigError

    try:
        importlib.import_module("clip_benchmark")
    except ImportError:
        raise ConfigError("DataComp evaluation needs clip_benchmark, which is not installed: "
                          "pip install 'amorlip[datacomp]'") from None


def _clip_benchmark_builder():
    """clip_benchmark's dataset builder (imported lazily: it pulls in torchvision datasets and requests)."""
    require_clip_benchmark()
    from clip_benchmark.datasets import builder

    return builder


@contextlib.contextmanager
def _cb_device(device: torch.device | str) -> Iterator[str]:
    """clip_benchmark passes `device` to torch.autocast, which takes a device type ("cuda"), not "cuda:1"."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        with torch.cuda.device(dev.index):
            yield "cuda"
    else:
        yield dev.type


@contextlib.contextmanager
def _clip_benchmark_progress(enabled: bool) -> Iterator[None]:
    """clip_benchmark's metric loops always show tqdm bars; silence them unless progress is wanted."""
    require_clip_benchmark()
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    if enabled:
        yield
        return
    saved = zsc.tqdm, zsr.tqdm
    quiet = lambda it=None, *a, **k: tqdm(it, *a, **{**k, "disable": True})  # noqa: E731
    zsc.tqdm = zsr.tqdm = quiet
    try:
        yield
    finally:
        zsc.tqdm, zsr.tqdm = saved


def _build_wds(task: DataCompTask, folder: Path, transform: Callable, cb_task: str):
    builder = _clip_benchmark_builder()
    with warnings.catch_warnings():  # clip_benchmark builds its wds without shardshuffle (ordered): fine here
        warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=")
        return builder.build_dataset(
            dataset_name=task.clip_benchmark_name, root=str(folder), transform=transform, split="test",
            download=False, task=cb_task,
        )


def _wds_loader(dataset, folder: Path, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """clip_benchmark's and DataComp's way to batch a wds: batch inside the pipeline, no DataLoader batching.

    Workers are capped at the shard count: webdataset >= 0.2.90 raises in a worker that gets no shard.
    """
    return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                       num_workers=min(num_workers, shard_count(folder)))


# ----------------------------------------------------------------------------------------------------
# Per-kind evaluators
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """What every per-kind evaluator needs."""

    model: nn.Module
    transform: Callable
    tokenizer: Callable
    device: torch.device | str
    batch_size: int
    num_workers: int
    amp: bool
    progress: bool


def _standard_metrics(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, float]:
    """acc1, acc5 (NaN below 5 classes) and mean_per_class_recall, as DataComp's wds_eval.py defines them.

    DataComp calls clip_benchmark's `accuracy` for acc1/acc5; clip_benchmark 1.6.2's `accuracy` does
    `float()` on a 1-element array, which NumPy >= 2.4 rejects, so top-k is computed here (same
    definition: the fraction of samples whose label is among the k largest logits).
    """
    from sklearn.metrics import balanced_accuracy_score

    pred = logits.argmax(dim=1)
    return {
        "acc1": topk_accuracy(logits, target, 1),
        "acc5": topk_accuracy(logits, target, 5) if n_classes >= 5 else float("nan"),
        "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), pred.numpy())),
    }


def _wds_logits(task: DataCompTask, folder: Path, c: _Ctx, max_workers: int | None = None):
    """(logits, targets, classnames) of a classification wds with clip_benchmark's classifier and loop.

    As DataComp's wds_eval.py: `zero_shot_classifier` (prompt ensemble) then `run_classification`
    (cosine x 100 against the classifier).
    """
    from clip_benchmark.metrics import zeroshot_classification as zsc

    ds = _build_wds(task, folder, c.transform, "zeroshot_classification")
    workers = c.num_workers if max_workers is None else min(c.num_workers, max_workers)
    loader = _wds_loader(ds, folder, c.batch_size, workers)
    with _cb_device(c.device) as dev:
        classifier = zsc.zero_shot_classifier(c.model, c.tokenizer, ds.classes, ds.templates, dev, amp=c.amp)
        logits, target = zsc.run_classification(c.model, classifier, loader, dev, amp=c.amp)
    return logits, target.reshape(-1).long(), list(ds.classes)


def _eval_classification(task: DataCompTask, folder: Path, c: _Ctx) -> dict[str, Any]:
    logits, target, classes = _wds_logits(task, folder, c)
    return _standard_metrics(logits, target, len(classes))


def _eval_retrieval(task: DataCompTask, folder: Path, c: _Ctx) -> dict[str, Any]:
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    ds = _build_wds(task, folder, c.transform, "zeroshot_retrieval")
    with _cb_device(c.device) as dev:
        m = zsr.evaluate(c.model, _wds_loader(ds, folder, c.batch_size, c.num_workers), c.tokenizer, dev, amp=c.amp,
                         recall_k_list=[1, 5, 10])
    # DataComp's retr_eval.py: the mean of text (image->text) and image (text->image) retrieval R@1
    m["mean_recall@1"] = 0.5 * (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"])
    return m


def _read_metadata(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, metadata rows) of every sample, in shard order, without decoding images."""
    import webdataset as wds

    urls = [str(folder / "test" / f"{i}.tar") for i in range(shard_count(folder))]
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                         select_files=lambda f: f.endswith((".cls", ".npy")))
          .decode().to_tuple("cls", "npy"))
    labels, meta = [], []
    for y, m in ds:
        labels.append(int(y))
        meta.append(np.asarray(m).reshape(-1))
    if not labels:
        raise ValueError(f"{folder}: no samples with 'cls' and 'npy' (per-sample metadata) entries")
    return np.asarray(labels), np.stack(meta)


def _eval_with_metadata(task: DataCompTask, folder: Path, c: _Ctx) -> dict[str, Any]:
    # one worker at most: the metadata pass reads the shards in order, so must the logits pass
    logits, target, classes = _wds_logits(task, folder, c, max_workers=1)
    metrics: dict[str, Any] = _standard_metrics(logits, target, len(classes))
    labels, meta = _read_metadata(folder)
    if len(labels) != len(target) or not np.array_equal(labels, target.numpy()):
        raise RuntimeError(f"{folder}: labels read with the metadata do not line up with the evaluated samples "
                           f"({len(labels)} vs {len(target)}); the wds must hold 'cls' and 'npy' for every sample")
    y_true, y_pred = target.numpy(), logits.argmax(dim=1).numpy()
    if task.kind == "iwildcam":
        metrics["F1-macro_all"] = macro_f1_present(y_true, y_pred)
    elif task.kind == "fmow":  # metadata fields (region, year, y)
        metrics["acc_worst_region"] = worst_group_accuracy(y_pred == y_true, meta[:, 0])
        metrics["acc_worst_year"] = worst_group_accuracy(y_pred == y_true, meta[:, 1])
    elif task.kind == "dollar_street":  # metadata fields (income_ds, income_meta, region)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy()
        hit5 = (top5 == y_true[:, None]).any(axis=1)
        metrics["acc_top5_avg"] = float(hit5.mean())
        metrics["acc_top5_wg"] = worst_group_accuracy(hit5, meta[:, 0])
    elif task.kind == "geode":  # metadata fields (region, country)
        metrics["acc_avg"] = float((y_pred == y_true).mean())
        metrics["acc_wg"] = worst_group_accuracy(y_pred == y_true, meta[:, 0])
    else:
        raise ValueError(f"no metadata metric for kind {task.kind!r}")
    return metrics


_IMAGE_KEY = re.compile(r"^c(\d+)\.(png|jpg|jpeg|webp)$")


@torch.no_grad()
def _eval_winogavil(task: DataCompTask, folder: Path, c: _Ctx) -> dict[str, Any]:
    import webdataset as wds

    urls = [str(folder / "test" / f"{i}.tar") for i in range(shard_count(folder))]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None).decode("pil")

    def instances() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for sample in tqdm(ds, desc="WinoGAViL", disable=not c.progress, leave=False):
            meta = sample["json"]
            keys = sorted((int(m.group(1)), k) for k in sample if (m := _IMAGE_KEY.match(k)))
            if len(keys) != len(meta["candidates"]):
                raise ValueError(f"{folder}: sample {sample['__key__']} has {len(keys)} images for "
                                 f"{len(meta['candidates'])} candidates")
            images = torch.stack([c.transform(sample[k]) for _, k in keys]).to(c.device)
            tokens = c.tokenizer([winogavil_prompt(meta["cue"])]).to(c.device)
            img = c.model.encode_image(images, normalize=True).float()
            txt = c.model.encode_text(tokens, normalize=True).float()
            y_true = np.isin(np.asarray(meta["candidates"]), np.asarray(meta["associations"]))
            yield (txt @ img.T).reshape(-1).cpu().numpy(), y_true

    return winogavil_metrics(instances())


_EVALUATORS: dict[str, Callable[[DataCompTask, Path, _Ctx], dict[str, Any]]] = {
    "classification": _eval_classification,
    "retrieval": _eval_retrieval,
    "iwildcam": _eval_with_metadata,
    "fmow": _eval_with_metadata,
    "dollar_street": _eval_with_metadata,
    "geode": _eval_with_metadata,
    "winogavil": _eval_winogavil,
}


def export_winogavil(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, image_format: str = "webp",
                     max_count: int = 10_000) -> Path:
    """Write WinoGAViL instances as a local wds folder that `run_datacomp` reads.

    `rows` are the records of Hugging Face `nlphuji/winogavil` (split "test"): `candidate_images` (PIL
    images), `cue` (str), `candidates` and `associations` (lists of names). Layout: `out_dir/test/{i}.tar`,
    `out_dir/test/nshards.txt`, `out_dir/dataset_type.txt` = `winogavil`; each sample holds `json`
    ({cue, candidates, associations}) and images `c{k}.<image_format>` for candidate k.
    """
    import io

    import webdataset as wds

    fmt = {"webp": ("webp", {"format": "webp", "lossless": True}), "png": ("png", {"format": "png"}),
           "jpg": ("jpg", {"format": "jpeg", "quality": 95})}
    if image_format not in fmt:
        raise ValueError(f"image_format must be one of {sorted(fmt)}, got {image_format!r}")
    ext, save_kw = fmt[image_format]
    out = Path(out_dir)
    (out / "test").mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "test" / "%d.tar"), maxcount=max_count, verbose=0) as sink:
        for i, row in enumerate(rows):
            sample = {"__key__": f"s{i:07d}",
                      "json": {"cue": row["cue"], "candidates": list(row["candidates"]),
                               "associations": list(row["associations"])}}
            if len(row["candidate_images"]) != len(row["candidates"]):
                raise ValueError(f"row {i}: {len(row['candidate_images'])} images for {len(row['candidates'])} candidates")
            for k, img in enumerate(row["candidate_images"]):
                buf = io.BytesIO()
                img.save(buf, **save_kw)
                sample[f"c{k:02d}.{ext}"] = buf.getvalue()
            sink.write(sample)
        n_shards = sink.shard
    (out / "test" / "nshards.txt").write_text(f"{n_shards}\n")
    (out / "dataset_type.txt").write_text("winogavil\n")
    return out


# ----------------------------------------------------------------------------------------------------
# Running and aggregating
# ----------------------------------------------------------------------------------------------------


def run_datacomp(
    model: nn.Module,
    transform: Callable,
    tokenizer: Callable,
    root: str | os.PathLike,
    device: torch.device | str = "cpu",
    tasks: Sequence[str | DataCompTask] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int = 4,
    amp: bool = False,
    output: str | os.PathLike | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on the DataComp tasks found under `root` (all 38 by default, or `tasks`).

    Returns {"benchmark", "root", "tasks": {key: {"name", "main_metric", "status", "score", "metrics",
    "reason", "seconds"}}, "aggregate": aggregate(...)}; `status` is "ok", "missing" (no or incomplete
    data) or "failed" (evaluation raised; the error is logged and kept in "reason"; `strict=True`
    re-raises instead). With `output`, the results are written there (atomic JSON) after every task.
    With `progress`, bars are shown and the result table is printed at the end.
    `amp` runs clip_benchmark's encoders under autocast (DataComp runs image features in fp32).
    The model may be DDP-wrapped; it is put in eval mode and restored after. Call on one rank.
    """
    selected = select_tasks(tasks)
    results: dict[str, Any] = {"benchmark": "datacomp", "root": str(root), "tasks": {}}
    with eval_mode(model) as m, torch.no_grad(), _clip_benchmark_progress(progress):
        ctx = _Ctx(m, transform, tokenizer, device, batch_size, num_workers, amp, progress)
        for task in tqdm(selected, desc="DataComp", disable=not progress):
            entry: dict[str, Any] = {"name": task.name, "main_metric": task.main_metric, "status": "missing",
                                     "score": None, "metrics": {}, "reason": ""}
            folder, reason = find_task_dir(root, task)
            if folder is None:
                entry["reason"] = reason
                log.info("DataComp %s: missing (%s)", task.name, reason)
            else:
                t0 = time.time()
                try:
                    metrics = _EVALUATORS[task.kind](task, folder, ctx)
                    entry.update(status="ok", metrics=metrics, folder=str(folder),
                                 score=finite_or_none(metrics.get(task.main_metric)))
                except Exception as e:
                    if strict:
                        raise
                    entry.update(status="failed", reason=f"{type(e).__name__}: {e}", folder=str(folder))
                    log.error("DataComp %s failed on %s:\n%s", task.name, folder, traceback.format_exc())
                entry["seconds"] = time.time() - t0
            results["tasks"][task.key] = entry
            if output is not None:
                results["aggregate"] = aggregate(results)
                write_json(output, results)
    results["aggregate"] = aggregate(results)
    if output is not None:
        write_json(output, results)
    if progress:
        print(datacomp_table(results))
    return results
