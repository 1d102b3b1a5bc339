"""Validation on the user's own data: `data.val_path` (CSV or webdataset shards) for retrieval and
`eval.imagenet_root` (an ImageNet-style class folder) for zero-shot, during and after training and in
`amorlip eval`; the folder's zero-shot numbers against clip_benchmark's own evaluate; bad input as one line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from amorlip.cli import main
from amorlip.data.imagefolder import imagenet_folder_task, imagenet_templates, val_pairs
from amorlip.data.writers import write_synthetic_csv, write_synthetic_wds

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]
TINY = ["--model.name", "micro-vit", "--train.batch-size", "16", "--optim.warmup-steps", "1", "--train.progress", "false",
        "--train.threads", "1"]


def write_class_folder(root: Path, classes: list[str], per_class: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            pixels[..., k % 3] = 255  # a class-dependent tint, so the numbers are not all chance
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("valdata")
    train_csv = write_synthetic_csv(root / "train", 64, seed=0)
    val_csv = write_synthetic_csv(root / "val", 24, seed=1)
    write_synthetic_wds(root / "valwds", 24, seed=1, shard_size=10, image_format="png")  # the same pairs as val_csv
    inet = write_class_folder(root / "inet", SYNSETS)
    return {"root": root, "train": train_csv, "val_csv": val_csv, "val_wds": root / "valwds", "inet": inet}


@pytest.fixture(scope="module")
def run(data):
    out = data["root"] / "runs"
    assert main(["train", "--data.source", "csv", "--data.train-path", str(data["train"]),
                 "--data.val-path", str(data["val_wds"]), "--eval.imagenet-root", str(data["inet"]),
                 "--train.steps", "4", "--train.eval-every", "2", "--train.checkpoint-every", "2",
                 "--train.keep-checkpoints", "0", "--train.output-dir", str(out), "--train.name", "r", *TINY]) == 0
    return out / "r"


def logged_evals(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        ev = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        if ev:
            out.setdefault(row["step"], {}).update(ev)
    return out


def test_training_logs_val_metrics_and_eval_reproduces_them(run, data, tmp_path):
    evals = logged_evals(run)
    assert sorted(evals) == [2, 4]  # during (train.eval_every) and after training
    for metrics in evals.values():
        assert {"retrieval/val/image_to_text_R@1", "retrieval/val/text_to_image_R@10", "zeroshot/imagenet/top1",
                "zeroshot/imagenet/mean_per_class_recall"} <= set(metrics)
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert summary == pytest.approx(evals[4], abs=1e-9)
    # `amorlip eval RUN` evaluates on the run's own val data (the saved config), same checkpoint, same numbers
    for ckpt_path, step in ((run, 4), (run / "checkpoints" / "step_00000002.pt", 2)):
        out = tmp_path / f"eval{step}.json"
        assert main(["eval", str(ckpt_path), "--device", "cpu", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["step"] == step
        assert set(res["metrics"]) == set(evals[step])
        for k, v in evals[step].items():
            assert res["metrics"][k] == pytest.approx(v, abs=1e-6), (step, k)
    # the same pairs as a CSV (PNG images, same captions): the same retrieval numbers through --data
    out = tmp_path / "csv.json"
    assert main(["eval", str(run), "--device", "cpu", "--data", str(data["val_csv"]), "--out", str(out)]) == 0
    res = json.loads(out.read_text())["metrics"]
    assert set(res) == {k for k in evals[4] if k.startswith("retrieval/")}
    for k, v in res.items():
        assert v == pytest.approx(evals[4][k], abs=1e-6), k


def _numpy2_safe_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy` formula (its own calls float() on an array, an error in NumPy >= 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


class Transformed(Dataset):
    def __init__(self, ds, tf):
        self.ds, self.tf, self.classes = ds, tf, ds.classes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        return self.tf(img), label


def test_imagenet_folder_zeroshot_equals_clip_benchmark(run, data, tmp_path, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as zsc

    from amorlip.evaluate.cli import load_for_eval
    from amorlip.evaluate.zeroshot import zeroshot_eval

    if int(np.__version__.split(".")[0]) >= 2:
        monkeypatch.setattr(zsc, "accuracy", _numpy2_safe_accuracy)
    task = imagenet_folder_task(str(data["inet"]))
    assert task.name == "imagenet" and task.classnames == NAMES and len(task.dataset) == 15
    assert len(task.templates) == 80 and task.templates[0] == "a bad photo of a {c}."
    loaded = load_for_eval(str(run), None, torch.device("cpu"))
    ours = zeroshot_eval(loaded.model, loaded.tokenizer, task, loaded.eval_transform, "cpu", batch_size=4)
    loader = DataLoader(Transformed(task.dataset, loaded.eval_transform), batch_size=4)
    theirs = zsc.evaluate(loaded.model, loader, loaded.tokenizer, task.classnames, imagenet_templates(), "cpu",
                          amp=False)
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-6)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)
    # and `amorlip eval --data FOLDER` gives the same numbers
    out = tmp_path / "folder.json"
    assert main(["eval", str(run), "--device", "cpu", "--data", str(data["inet"]), "--out", str(out)]) == 0
    res = json.loads(out.read_text())["metrics"]
    assert res["zeroshot/imagenet/top1"] == pytest.approx(theirs["acc1"], abs=1e-6)
    assert res["zeroshot/imagenet/mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)


def test_folder_names_are_class_names_when_not_synsets(tmp_path):
    root = write_class_folder(tmp_path / "flowers", ["daisy", "rose", "tulip"], per_class=2)
    task = imagenet_folder_task(str(root))
    assert task.name == "flowers" and task.classnames == ["daisy", "rose", "tulip"]
    assert [label for _, label in task.dataset.samples] == [0, 0, 1, 1, 2, 2]
    assert task.templates == imagenet_templates()


def test_val_pairs_csv_and_wds_read_the_same_pairs(data):
    a, b = val_pairs(str(data["val_csv"])), val_pairs(str(data["val_wds"]))
    assert len(a.dataset) == len(b.dataset) == 24
    pairs_b = list(b.dataset)
    for i, (img_b, cap_b) in enumerate(pairs_b):
        img_a, cap_a = a.dataset[i]
        assert cap_a == cap_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))


def test_eval_csv_run_without_val_data_says_so(run, tmp_path, capsys):
    from amorlip.config import config_from_dict

    state = torch.load(run / "checkpoints" / "step_00000004.pt", map_location="cpu", weights_only=False)
    cfg = config_from_dict(state["config"])
    cfg.data.val_path, cfg.eval.imagenet_root = None, None
    path = tmp_path / "noval.pt"
    torch.save({**state, "config": cfg.to_dict()}, path)
    capsys.readouterr()
    assert main(["eval", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "eval", "without validation data", "--data")
    assert not (tmp_path / "noval.eval.json").exists()
    # naming a source explicitly still works
    assert main(["eval", str(path), "--device", "cpu", "--data", "synthetic", "--out", str(tmp_path / "s.json")]) == 0


def assert_one_line(err: str, command: str, *words: str) -> None:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"amorlip {command}: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, err)


def _bad_inputs(root: Path, data: dict) -> dict[str, tuple[list[str], list[str]]]:
    no_caption_col = root / "nocap.csv"
    no_caption_col.write_text("filepath\n" + str(data["val_csv"].parent / "images" / "00000000.png") + "\n")
    empty_caption = root / "empty.csv"
    empty_caption.write_text("filepath,title\n" + str(data["val_csv"].parent / "images" / "00000000.png") + ",\n")
    images_only = root / "images_only"
    images_only.mkdir()
    Image.new("RGB", (8, 8)).save(images_only / "a.png")
    no_txt = root / "notxt"
    no_txt.mkdir()
    import webdataset as wds

    with wds.TarWriter(str(no_txt / "shard-00000.tar")) as sink:
        sink.write({"__key__": "00000000", "png": (data["val_csv"].parent / "images" / "00000000.png").read_bytes()})
    empty_root = root / "empty_inet"
    empty_root.mkdir()
    empty_class = root / "empty_class"
    (empty_class / "n01440764").mkdir(parents=True)
    # one unreadable image among 200 pairs (the 200th), in a CSV, in shards, in a class folder
    from amorlip.data.writers import write_synthetic_csv, write_synthetic_wds

    bad_csv = write_synthetic_csv(root / "val200", 200, seed=5)
    (root / "val200" / "images" / "00000199.png").write_bytes(b"not an image")
    bad_shards = root / "shards200"
    write_synthetic_wds(bad_shards, 200, seed=5, shard_size=100, image_format="png")
    with wds.TarWriter(str(bad_shards / "shard-00002.tar")) as sink:
        sink.write({"__key__": "00000200", "png": b"not an image", "txt": "a caption"})
    bad_class = root / "bad_class"
    (bad_class / "n01440764").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad_class / "n01440764" / "a.png")
    (bad_class / "n01440764" / "b.png").write_bytes(b"not an image")
    return {
        "an unreadable csv image": (["--data.val-path", str(bad_csv)], ["00000199.png", "line 201", "cannot be read"]),
        "an unreadable shard image": (["--data.val-path", str(bad_shards)], ["shard-00002.tar:00000200",
                                                                           "cannot be read"]),
        "an unreadable class image": (["--eval.imagenet-root", str(bad_class)], ["b.png", "cannot be read"]),
        "csv without caption column": (["--data.val-path", str(no_caption_col)], ["title"]),
        "csv row without caption": (["--data.val-path", str(empty_caption)], ["line 2", "no caption"]),
        "folder of images": (["--data.val-path", str(images_only)], ["data.val_path", "captions"]),
        "shards without captions": (["--data.val-path", str(no_txt)], ["no caption"]),
        "missing val path": (["--data.val-path", str(root / "nope.csv")], ["data.val_path", "does not exist"]),
        "missing imagenet root": (["--eval.imagenet-root", str(root / "nope")], ["eval.imagenet_root", "does not exist"]),
        "empty imagenet root": (["--eval.imagenet-root", str(empty_root)], ["eval.imagenet_root", "no class sub-folders"]),
        "class folder without images": (["--eval.imagenet-root", str(empty_class)], ["n01440764", "no images"]),
    }


@pytest.mark.slow
def test_bad_validation_data_is_one_line_before_training(data, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, data)
    for name, (flags, words) in cases.items():
        out = tmp_path / f"runs-{name.replace(' ', '_')}"
        capsys.readouterr()
        code = main(["train", "--data.source", "csv", "--data.train-path", str(data["train"]), *flags,
                     "--train.steps", "1", "--train.output-dir", str(out), *TINY])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert_one_line(err, "train", *words)
        assert not out.exists(), name  # nothing written: the check ran before training


def test_bad_eval_data_is_one_line(run, data, tmp_path, capsys):
    for flags, words in (
        (["--data", str(tmp_path / "missing.csv")], ["--data", "existing path"]),
        (["--data", str(tmp_path)], ["--data", "no class sub-folders"]),
    ):
        capsys.readouterr()
        assert main(["eval", str(run), "--device", "cpu", *flags, "--out", str(tmp_path / "x.json")]) == 2
        assert_one_line(capsys.readouterr().err, "eval", *words)
    assert not (tmp_path / "x.json").exists()
