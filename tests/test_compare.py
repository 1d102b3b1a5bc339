"""`amorlip compare` end to end at toy size, and its parsing/aggregation pieces."""
import pytest

from amorlip.cli import main
from amorlip.compare import build_table, parse_entry, split_entries
from amorlip.config import ConfigError
from amorlip.report import format_table


def test_entry_parsing():
    entries = split_entries("clip,clip[temperature.scheme=rescaled,train.steps=3],amorlip")
    assert entries == ["clip", "clip[temperature.scheme=rescaled,train.steps=3]", "amorlip"]
    e = parse_entry(entries[1])
    assert e.objective == "clip" and e.overrides == [("temperature.scheme", "rescaled"), ("train.steps", "3")]
    with pytest.raises(ConfigError):
        split_entries("clip[a=b")
    with pytest.raises(ConfigError):
        parse_entry("clip[nokey]")


def test_table_mean_and_interval():
    """Mean and 95% t interval over seeds: with two seeds t_{0.975,1} = 12.71, so 0.5 and 0.7 give 60 ± 127."""
    runs = [{"entry": "a", "seed": 0, "metrics": {"zeroshot/mean_top1": 0.5}},
            {"entry": "a", "seed": 1, "metrics": {"zeroshot/mean_top1": 0.7}},
            {"entry": "b", "seed": 0, "metrics": {"zeroshot/mean_top1": 0.2}}]
    md, csv_text, cols = build_table({"entries": ["a", "b"], "runs": runs})
    assert "| a | 2 | 60.00 ± 127.06 |" in md and "| b | 1 | 20.00 |" in md
    assert cols == ["zeroshot/mean_top1"]
    assert csv_text.splitlines()[1] == "a,2,0.6,1.27062,0.141421"



def test_format_table_plain_and_markdown():
    """The one table formatter: plain (bench) aligns columns, markdown (compare, crossing) leaves cells unpadded."""
    rows = [["clip", 1, 2.5], ["amorlip", "-", None]]
    assert format_table(["entry", "n", "x"], rows) == ("entry    n     x\n"
                                                       "-------  -  ----\n"
                                                       "clip     1   2.5\n"
                                                       "amorlip  -  None")
    assert format_table(["entry", "n", "x"], rows, markdown=True) == ("| entry | n | x |\n|---|---|---|\n"
                                                                      "| clip | 1 | 2.5 |\n| amorlip | - | None |")
    assert format_table(["entry", "seeds"], [], markdown=True) == "| entry | seeds |\n|---|---|"


@pytest.mark.slow
def test_compare_cli(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--objectives", "clip,clip[temperature.scheme=rescaled]", "--seeds", "0,1",
               "--out", str(out), "--model.name", "micro-vit", "--data.synthetic-size", "128", "--data.val-size", "32",
               "--data.eval-size", "32", "--train.batch-size", "16", "--train.steps", "4", "--train.progress", "false",
               "--train.eval-every", "2", "--optim.warmup-steps", "1"])
    assert rc == 0
    table = (out / "table.md").read_text()
    assert "| clip | 2 |" in table and "| clip[temperature.scheme=rescaled] | 2 |" in table
    assert (out / "table.csv").is_file() and (out / "results.json").is_file()
    assert list(out.glob("*.png"))
    assert len(list((out / "runs").iterdir())) == 4


def test_compare_rejects_bad_entry_before_training(tmp_path):
    rc = main(["compare", "--objectives", "clip,nope", "--out", str(tmp_path / "c"), "--train.steps", "2"])
    assert rc == 2
    assert not (tmp_path / "c" / "runs").exists()


@pytest.mark.slow
def test_compare_entry_can_be_a_preset(tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--objectives", "tiny-fastclip[train.steps=2]", "--out", str(out),
               "--model.name", "micro-vit", "--data.synthetic-size", "64", "--data.val-size", "16",
               "--data.eval-size", "16", "--train.batch-size", "16", "--train.progress", "false"])
    assert rc == 0
    (run_dir,) = (out / "runs").glob("tiny-fastclip_train.steps_2-s0-*")  # name-seed-settings hash
    config = (run_dir / "config.yaml").read_text()
    assert "scheme: rescaled" in config and "objective: fastclip" in config


@pytest.mark.slow
def test_compare_never_reuses_runs_made_with_other_settings(tmp_path):
    """Run names carry a hash of the result-changing settings: a rerun with another lr trains anew, a rerun with
    the same settings reuses its finished run (and neutral keys such as log_every do not matter)."""
    out = tmp_path / "cmp"
    common = ["compare", "--objectives", "clip", "--out", str(out), "--model.name", "micro-vit",
              "--data.synthetic-size", "64", "--data.val-size", "16", "--data.eval-size", "16",
              "--train.batch-size", "16", "--train.steps", "2", "--train.progress", "false"]
    assert main([*common, "--optim.lr", "1e-3"]) == 0
    assert main([*common, "--optim.lr", "1e-3", "--train.log-every", "1"]) == 0
    assert len(list((out / "runs").iterdir())) == 1
    assert main([*common, "--optim.lr", "2e-3"]) == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("clip-s0-") for r in runs)
    assert {yaml_lr(r) for r in runs} == {0.001, 0.002}


def yaml_lr(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"]


def test_table_header_names_each_entry_whose_batch_or_length_differs():
    from amorlip.compare.tables import describe_setup

    def run(entry, batch, steps):
        return {"entry": entry, "label": entry, "batch_size": batch, "steps": steps, "epochs": None}

    record = {"model": "micro-vit", "data": "synthetic", "seeds": [0, 1], "sweep": {},
              "runs": [run("clip", 32, 100), run("amorlip", 32, 100), run("clip[train.batch_size=256]", 256, 100),
                       run("clip", 32, 100)]}
    assert describe_setup(record) == ("model micro-vit, data synthetic, batch 32 (clip[train.batch_size=256]: batch 256), "
                                      "100 steps, seeds 0,1; mean ± 95% t interval over seeds")
    record["runs"] = [run("clip", 64, 50), run("amorlip", 64, 50)]
    assert describe_setup(record).startswith("model micro-vit, data synthetic, batch 64, 50 steps, seeds 0,1")
