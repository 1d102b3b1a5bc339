"""DataComp: task list, special metrics, the clip_benchmark wds path on generated folders, aggregation."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from amorlip.data.types import RetrievalSplit, ZeroShotTask
from amorlip.evaluate.datacomp import (
    DATACOMP_TASKS,
    _clip_benchmark_builder,
    aggregate,
    export_winogavil,
    find_task_dir,
    get_task,
    jaccard,
    load_results,
    macro_f1_present,
    run_datacomp,
    winogavil_metrics,
    winogavil_prompt,
    worst_group_accuracy,
)
from amorlip.evaluate.retrieval import retrieval_eval
from amorlip.evaluate.zeroshot import zeroshot_eval, zeroshot_logits
from amorlip.models import create_model

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}."]  # clip_benchmark's wds templates use {c}


def noise_image(i: int, size: int = 20) -> Image.Image:
    rng = np.random.default_rng(500 + i)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


class LabelledNoise(torch.utils.data.Dataset):
    classes = CLASSES
    templates = TEMPLATES

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return noise_image(i), i % len(CLASSES)


class CaptionedNoise(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return noise_image(100 + i), f"photo {i} of a {CLASSES[i % len(CLASSES)]}"


N_CLS, N_RET, N_GEO = 28, 16, 21
GEO_REGION = [i % 3 for i in range(N_GEO)]


def _write_geode(folder):
    """A classification wds with per-sample metadata (`npy` = [region, country]) as DataComp's GeoDE has."""
    (folder / "test").mkdir(parents=True)
    with wds.ShardWriter(str(folder / "test" / "%d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(N_GEO):
            buf = io.BytesIO()
            noise_image(300 + i).save(buf, format="png")
            sink.write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "cls": i % len(CLASSES),
                        "npy": np.array([GEO_REGION[i], 7 + i % 2])})
        n = sink.shard
    (folder / "test" / "nshards.txt").write_text(f"{n}\n")
    (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")


WINO = [  # (cue, number of candidates, indices of the associations)
    ("apple", 10, [0, 3, 5]),
    ("night", 12, [1, 2, 4, 8]),
    ("ocean", 5, [2, 4]),
]


def _wino_rows():
    for j, (cue, n, assoc) in enumerate(WINO):
        names = [f"img{j}_{k}" for k in range(n)]
        yield {"cue": cue, "candidates": names, "associations": [names[a] for a in assoc],
               "candidate_images": [noise_image(700 + 20 * j + k) for k in range(n)]}


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model, _, eval_tf, tok = create_model("micro-vit")
    return model.eval(), eval_tf, tok


@pytest.fixture(scope="module")
def dc_root(tmp_path_factory):
    """CIFAR-10 (DataComp's folder name, 3 shards), MSCOCO (clip-benchmark's folder name), GeoDE, WinoGAViL."""
    _clip_benchmark_builder()  # also imports clip_benchmark.webdataset_builder's dependencies
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset

    root = tmp_path_factory.mktemp("datacomp")

    class Ret(CaptionedNoise):
        def __getitem__(self, i):
            img, cap = super().__getitem__(i)
            return img, [cap]

    with warnings.catch_warnings():  # the converter always asks for 8 DataLoader workers
        warnings.simplefilter("ignore", UserWarning)
        convert_dataset(LabelledNoise(N_CLS), "test", str(root / "wds_cifar10_test"), transform=PIL_to_bytes("png"),
                        image_format="png", max_count=10, verbose=False)
        convert_retrieval_dataset(Ret(N_RET), "test", str(root / "wds_mscoco_captions"),
                                  transform=PIL_to_bytes("png"), image_format="png", verbose=False)
    _write_geode(root / "wds_geode_test")
    export_winogavil(_wino_rows(), root / "wds_misc-winogavil_test", image_format="png")
    # an incomplete classification folder (no class names) and a corrupt one
    (root / "wds_vtab-dtd_test" / "test").mkdir(parents=True)
    (root / "wds_vtab-dtd_test" / "test" / "nshards.txt").write_text("1\n")
    (root / "wds_vtab-dtd_test" / "test" / "0.tar").write_bytes(b"")
    bad = root / "wds_mnist_test"
    (bad / "test").mkdir(parents=True)
    (bad / "test" / "nshards.txt").write_text("1\n")
    (bad / "test" / "0.tar").write_bytes(b"this is not a tar file" * 50)
    (bad / "classnames.txt").write_text("zero\none\n")
    (bad / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    return root


@pytest.fixture(scope="module")
def dc_results(micro, dc_root):
    model, tf, tok = micro
    model.train()  # run_datacomp must evaluate in eval mode and restore this
    try:
        res = run_datacomp(model, tf, tok, dc_root, "cpu", batch_size=8, progress=False, num_workers=2,
                           output=dc_root / "out" / "datacomp.json")
        assert model.training
    finally:
        model.eval()
    return res


# ------------------------------------------------------------------------------------------ task list


def test_task_list_is_datacomp_38():
    assert len(DATACOMP_TASKS) == 38
    assert len({t.key for t in DATACOMP_TASKS}) == 38 and len({t.name for t in DATACOMP_TASKS}) == 38
    by_metric = {}
    for t in DATACOMP_TASKS:
        by_metric.setdefault(t.main_metric, set()).add(t.name)
    assert by_metric["mean_per_class_recall"] == {"Caltech-101", "FGVC Aircraft", "Oxford Flowers-102",
                                                  "Oxford-IIIT Pet"}
    assert by_metric["mean_recall@1"] == {"Flickr", "MSCOCO"}
    assert get_task("WinoGAViL").main_metric == "jaccard_score_10-12"
    assert get_task("wilds/iwildcam").main_metric == "F1-macro_all"
    assert get_task("FMoW").main_metric == "acc_worst_region"
    assert get_task("fairness/dollar_street").main_metric == "acc_top5_wg"
    assert get_task("GeoDE").main_metric == "acc_wg"
    assert len(by_metric["acc1"]) == 38 - 4 - 2 - 5
    assert get_task("vtab/caltech101").clip_benchmark_name == "wds/vtab/caltech101"
    assert get_task("fairness/geode").folder_names[0] == "wds_geode_test"  # DataComp's download_evalsets name
    assert "wds_mscoco_captions" in get_task("MSCOCO").folder_names  # clip-benchmark's HF repo name
    with pytest.raises(KeyError, match="unknown DataComp task"):
        get_task("fairface")


# ------------------------------------------------------------------------------------------- metrics


def test_jaccard_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, p = rng.random(10) < 0.4, rng.random(10) < 0.4
        if t.any() or p.any():
            assert jaccard(t, p) == pytest.approx(jaccard_score(t, p))


def test_worst_group_and_f1_hand_values():
    correct = np.array([1, 0, 1, 1, 0, 0, 1])
    groups = np.array([0, 0, 1, 1, 2, 2, 2])
    # group 0: 1/2, group 1: 2/2, group 2: 1/3 -> worst 1/3
    assert worst_group_accuracy(correct, groups) == pytest.approx(1 / 3)
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 3])  # class 3 predicted but never a label: not averaged
    # F1: class 0: p=1, r=1/2 -> 2/3; class 1: p=2/3, r=1 -> 4/5; class 2: p=0 (no pred), r=0 -> 0
    assert macro_f1_present(y_true, y_pred) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert macro_f1_present(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro",
                                                                      labels=[0, 1, 2]))


def test_winogavil_metrics_hand_example():
    assert winogavil_prompt("Apple") == "An apple" and winogavil_prompt("night") == "A night"
    inst = [
        (np.arange(10.0), np.isin(np.arange(10), [9, 8, 0])),  # picks 7,8,9 -> |{8,9}| / |{0,7,8,9}| = 1/2
        (-np.arange(12.0), np.isin(np.arange(12), [0, 1])),  # picks 0,1 -> 1
        (np.arange(5.0), np.isin(np.arange(5), [0])),  # picks 4 -> 0
    ]
    m = winogavil_metrics(inst)
    assert m["jaccard_score_10-12"] == pytest.approx(0.75)
    assert m["jaccard_score_5-6"] == pytest.approx(0.0)
    assert m["avg_jaccard_score"] == pytest.approx(0.5)
    assert np.isnan(m["jaccard_score_6"])


# ------------------------------------------------------------------------------- the clip_benchmark path


@pytest.mark.slow
def test_missing_and_incomplete_tasks_do_not_crash(dc_results):
    tasks = dc_results["tasks"]
    assert len(tasks) == 38
    ok = {k for k, e in tasks.items() if e["status"] == "ok"}
    assert ok == {"cifar10", "retrieval/mscoco_2014_5k_test_image_text_retrieval", "fairness/geode", "misc/winogavil"}
    assert tasks["imagenet1k"]["status"] == "missing" and "no data" in tasks["imagenet1k"]["reason"]
    assert tasks["vtab/dtd"]["status"] == "missing" and "classnames.txt" in tasks["vtab/dtd"]["reason"]
    assert tasks["mnist"]["status"] == "failed" and tasks["mnist"]["reason"]
    agg = dc_results["aggregate"]
    assert agg["partial"] is True and agg["n_tasks"] == 4 and len(agg["missing"]) == 34
    assert "mnist" in agg["missing"] and "cifar10" not in agg["missing"]
    scores = [tasks[k]["score"] for k in ok]
    assert agg["average"] == pytest.approx(sum(scores) / 4)


def test_datacomp_classification_matches_our_zeroshot(micro, dc_results):
    model, tf, tok = micro
    res = dc_results["tasks"]["cifar10"]
    ours = zeroshot_eval(model, tok, ZeroShotTask("c", CLASSES, TEMPLATES, LabelledNoise(N_CLS)), tf, "cpu", 8)
    assert res["main_metric"] == "acc1" and res["score"] == pytest.approx(ours["top1"], abs=1e-9)
    assert res["metrics"]["acc5"] == pytest.approx(ours["top5"], abs=1e-9)
    assert res["metrics"]["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=1e-9)
    assert 0 < ours["top5"] < 1


def test_datacomp_retrieval_matches_our_retrieval(micro, dc_results):
    model, tf, tok = micro
    res = dc_results["tasks"]["retrieval/mscoco_2014_5k_test_image_text_retrieval"]
    ours = retrieval_eval(model, tok, RetrievalSplit("r", CaptionedNoise(N_RET)), tf, "cpu", 8)
    m = res["metrics"]
    for k in (1, 5, 10):
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image_to_text_R@{k}"], abs=1e-9)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text_to_image_R@{k}"], abs=1e-9)
    assert res["score"] == pytest.approx(ours["mean_R@1"], abs=1e-9)


def test_datacomp_geode_worst_region(micro, dc_results):
    model, tf, tok = micro

    class Geo(torch.utils.data.Dataset):
        def __len__(self):
            return N_GEO

        def __getitem__(self, i):
            return noise_image(300 + i), i % len(CLASSES)

    logits, targets = zeroshot_logits(model, tok, ZeroShotTask("g", CLASSES, TEMPLATES, Geo()), tf, "cpu", 8)
    correct = (logits.argmax(1) == targets).numpy()
    region = np.array(GEO_REGION)
    expected = min(correct[region == r].mean() for r in range(3))
    res = dc_results["tasks"]["fairness/geode"]
    assert res["score"] == pytest.approx(expected)
    assert res["metrics"]["acc_avg"] == pytest.approx(correct.mean())


@torch.no_grad()
def test_datacomp_winogavil(micro, dc_results):
    model, tf, tok = micro
    scores = []
    for j, (cue, n, assoc) in enumerate(WINO):
        if n < 10:
            continue
        img = model.encode_image(torch.stack([tf(noise_image(700 + 20 * j + k)) for k in range(n)]), normalize=True)
        txt = model.encode_text(tok([winogavil_prompt(cue)]), normalize=True)
        sims = (txt @ img.T).reshape(-1)
        pred = np.isin(np.arange(n), sims.topk(len(assoc)).indices.numpy())
        scores.append(jaccard_score(np.isin(np.arange(n), assoc), pred))
    assert dc_results["tasks"]["misc/winogavil"]["score"] == pytest.approx(np.mean(scores))


def test_results_json_and_table(dc_root, dc_results, micro, capsys):
    path = dc_root / "out" / "datacomp.json"
    loaded = load_results(path)
    assert loaded["aggregate"] == json.loads(json.dumps(dc_results["aggregate"]))
    assert aggregate(loaded) == dc_results["aggregate"]
    assert loaded["tasks"]["cifar10"]["metrics"]["acc1"] == pytest.approx(dc_results["tasks"]["cifar10"]["score"])
    # printed table when progress is on
    model, tf, tok = micro
    run_datacomp(model, tf, tok, dc_root, "cpu", tasks=["cifar10", "ImageNet 1k"], batch_size=16, progress=True,
                 num_workers=0)
    out = capsys.readouterr().out
    assert "| CIFAR-10" in out and "| ImageNet 1k" in out and "missing" in out and "PARTIAL" in out


def test_empty_root_all_missing(micro, tmp_path):
    model, tf, tok = micro
    res = run_datacomp(model, tf, tok, tmp_path, "cpu", progress=False)
    agg = res["aggregate"]
    assert agg == {"average": None, "n_tasks": 0, "partial": True, "missing": [t.key for t in DATACOMP_TASKS]}


def test_strict_reraises(micro, dc_root):
    model, tf, tok = micro
    with pytest.raises(Exception):
        run_datacomp(model, tf, tok, dc_root, "cpu", tasks=["mnist"], progress=False, strict=True)


def test_find_task_dir_names(dc_root):
    folder, reason = find_task_dir(dc_root, get_task("MSCOCO"))
    assert folder is not None and folder.name == "wds_mscoco_captions" and reason == ""
    folder, reason = find_task_dir(dc_root, get_task("Flickr"))
    assert folder is None and "wds_retrieval-flickr30k_test" in reason


# ----------------------------------------------------------------------------------------- aggregation


def test_aggregate_hand_made_results_file(tmp_path):
    hand = {
        "benchmark": "datacomp",
        "tasks": {
            "cifar10": {"status": "ok", "score": 0.50},
            "vtab/caltech101": {"status": "ok", "score": 0.25, "main_metric": "mean_per_class_recall"},
            "retrieval/flickr30k": {"status": "ok", "score": 0.75},
            "imagenet1k": {"status": "failed", "score": None},
            "fairness/fairface": {"status": "ok", "score": 0.99},  # not one of the 38: ignored
        },
    }
    p = tmp_path / "results.json"
    p.write_text(json.dumps(hand))
    agg = aggregate(load_results(p))
    assert agg["average"] == pytest.approx((0.50 + 0.25 + 0.75) / 3)  # = 0.5
    assert agg["n_tasks"] == 3 and agg["partial"] is True
    assert len(agg["missing"]) == 35 and "imagenet1k" in agg["missing"] and "cifar10" not in agg["missing"]

    # a complete file: task i scores i / 100 -> average = mean(0..37) / 100 = 18.5 / 100
    full = {"tasks": {t.key: {"score": i / 100} for i, t in enumerate(DATACOMP_TASKS)}}
    p.write_text(json.dumps(full))
    agg = aggregate(load_results(p))
    assert agg == {"average": pytest.approx(0.185), "n_tasks": 38, "partial": False, "missing": []}
    # a subset of expected tasks is always partial (it is not the DataComp average)
    sub = aggregate(full, expected=["cifar10", "imagenet1k"])
    assert sub["average"] == pytest.approx((1 / 100 + 11 / 100) / 2) and sub["partial"] is True


def test_aggregate_datacomp_jsonl(tmp_path):
    lines = [
        {"key": "vtab/caltech101", "dataset": "Caltech-101", "metrics": {"main_metric": 0.8, "acc1": 0.7}},
        {"key": "misc/winogavil", "dataset": "WinoGAViL", "metrics": {"main_metric": 0.4}},
        {"key": "fairness/fairface", "dataset": "FairFace", "metrics": {"main_metric": None}},
    ]
    p = tmp_path / "eval_results.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    agg = aggregate(load_results(p))
    assert agg["average"] == pytest.approx(0.6) and agg["n_tasks"] == 2 and agg["partial"]
    # display names work as keys too
    assert aggregate({"Caltech-101": 0.2, "WinoGAViL": 0.4})["average"] == pytest.approx(0.3)


@pytest.mark.slow
def test_eval_datacomp_through_the_cli(dc_root, tmp_path, capsys):
    """`amorlip eval RUN --datacomp ROOT --datacomp-tasks ...`: the same scores as run_datacomp on the run's model,
    in the results file beside the run's own metrics."""
    from amorlip.cli import main
    from amorlip.evaluate.cli import load_for_eval, read_checkpoint

    tiny = ["--model.name", "micro-vit", "--data.synthetic-size", "32", "--data.val-size", "16", "--data.eval-size",
            "16", "--train.batch-size", "8", "--train.steps", "1", "--train.progress", "false"]
    assert main(["train", "--train.output-dir", str(tmp_path), "--train.name", "r", *tiny]) == 0
    out = tmp_path / "dc.json"
    assert main(["eval", str(tmp_path / "r"), "--datacomp", str(dc_root), "--datacomp-tasks", "cifar10,mscoco_captions",
                 "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DataComp partial average over 2 tasks" in printed
    results = json.loads(out.read_text())
    loaded = load_for_eval(str(tmp_path / "r"), None, torch.device("cpu"), read_checkpoint(str(tmp_path / "r")))
    direct = run_datacomp(loaded.model, loaded.eval_transform, loaded.tokenizer, dc_root, "cpu",
                          tasks=["cifar10", "mscoco_captions"], batch_size=8, progress=False, num_workers=0)
    for key in ("cifar10", "retrieval/mscoco_2014_5k_test_image_text_retrieval"):
        assert results["datacomp"]["tasks"][key]["score"] == pytest.approx(direct["tasks"][key]["score"], abs=1e-6)
    assert results["datacomp_summary"]["n_tasks"] == 2 and "zeroshot/mean_top1" in results["metrics"]
