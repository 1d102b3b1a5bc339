"""The command line as a user meets it: help from the docstrings, presets, --print-config, aliases and
suggestions, `base:` chains, steps/epochs, unknown flags, startup without torch."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from amorlip.cli import BENCH_COMMANDS, build_parser, main
from amorlip.config import ConfigError, build_config, describe, preset_description, preset_names


def run(capsys, *words):
    """main(words) -> (exit status, stdout, stderr); --help's SystemExit counts as a status."""
    try:
        rc = main(list(words))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, command):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]  # bench's load note
    assert len(lines) == 1 and lines[0].startswith(f"amorlip {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# help


def test_train_help_explains_every_key(capsys):
    rc, out, _ = run(capsys, "train", "--help")
    assert rc == 0
    assert "Global batch size (split evenly across processes)." in out  # a field docstring
    assert "--amor.divide-by {comb,target,online}" in out  # choices, from Literal
    assert "Stage II divisor" in out
    assert "--train.batch-size BATCH_SIZE" in out and "(type: int, default: 64)" in out
    for section in ("[model]", "[data]", "[optim]", "[temperature]", "[train]", "[eval]", "[amor]", "[resolution]"):
        assert f"\n{section}" in out
    assert out.count("--objective {") == 1
    assert "--print-config" in out and "--batch-size" in out and "= --train.batch-size" in out


@pytest.mark.slow
def test_every_subcommand_has_help(capsys):
    for words in (["--help"], ["compare", "--help"], ["eval", "--help"], ["export", "--help"], ["data", "--help"],
                  ["presets", "--help"], ["models", "--help"]):
        rc, out, _ = run(capsys, *words)
        assert rc == 0 and out.startswith("usage:"), words
    rc, out, _ = run(capsys, "compare", "--help")
    assert "--objectives" in out and "--train.steps" in out


def test_bench_help_lists_the_benchmarks(capsys):
    rc, out, _ = run(capsys, "bench", "--help")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for what in BENCH_COMMANDS:
        assert what in lines and len(lines[what].split()) > 3, what
    rc, _, _ = run(capsys, "bench")
    assert rc == 2
    one_line_error(*run(capsys, "bench", "nope")[::2], "bench")


# ----------------------------------------------------------------------------------------------------
# presets and --print-config


def test_presets_list_has_descriptions(capsys):
    rc, out, _ = run(capsys, "presets")
    assert rc == 0
    for name in preset_names():
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == name)
        assert preset_description(name) in line and len(preset_description(name)) > 10


def preset_file_keys(name):
    """The leaf keys a preset's YAML files set (its `base:` chain, the later file winning), read from the files."""
    from importlib.resources import files

    raw = yaml.safe_load((files("amorlip") / "presets" / f"{name}.yaml").read_text())
    keys = preset_file_keys(raw.pop("base")) if raw.get("base") else {}
    for section, body in raw.items():
        if isinstance(body, dict):
            keys.update({f"{section}.{k}": v for k, v in body.items() if not isinstance(v, dict)})
        else:
            keys[section] = body
    return keys


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-amorlip", "cc12m-vitb32-fastclip", "tiny-reclip-amorlip"])
def test_presets_name_prints_the_resolved_config(capsys, tmp_path, name):
    """What `amorlip presets NAME` prints is a complete config: every key the preset's file chain sets appears
    with its value, and the printed YAML, read back as a --config file, resolves to the same run."""
    rc, out, _ = run(capsys, "presets", name)
    assert rc == 0
    printed = yaml.safe_load(out)
    for key, value in preset_file_keys(name).items():
        section, _, leaf = key.rpartition(".")
        assert (printed[section][leaf] if section else printed[leaf]) == value, key
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    assert build_config(str(path)).to_dict() == printed


def test_train_print_config_runs_nothing(capsys, tmp_path):
    words = ["--config", "tiny-amorlip", "--train.output-dir", str(tmp_path / "runs"), "--amor.t-online", "2",
             "--optim.lr=0.01", "--train.stop_at", "none"]
    rc, out, _ = run(capsys, "train", *words, "--print-config")
    assert rc == 0
    expected = build_config("tiny-amorlip", [("train.output_dir", str(tmp_path / "runs")), ("amor.t_online", "2"),
                                             ("optim.lr", "0.01")])
    assert out == describe(expected)
    assert not (tmp_path / "runs").exists()


def test_compare_print_config(capsys, tmp_path):
    rc, out, _ = run(capsys, "compare", "--objectives", "clip,amorlip[amor.divide_by=target]", "--seeds", "0,1",
                     "--train.steps", "5", "--out", str(tmp_path / "c"), "--print-config")
    assert rc == 0
    docs = [yaml.safe_load(d.split("\n", 1)[1]) for d in out.split("# --- ")[1:]]
    assert len(docs) == 4 and all(d["train"]["steps"] == 5 for d in docs)
    assert docs[2]["objective"] == "amorlip" and docs[2]["amor"]["divide_by"] == "target"
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------------------
# spellings, aliases, suggestions, unknown flags


def printed(capsys, *words):
    rc, out, err = run(capsys, "train", *words, "--print-config")
    assert rc == 0, err
    return yaml.safe_load(out)


@pytest.mark.slow
def test_open_clip_flags_are_aliases(capsys):
    cfg = printed(capsys, "--batch-size", "32", "--lr", "1e-3", "--epochs", "2", "--model", "ViT-B-32",
                  "--seed", "3", "--workers", "1", "--precision", "bf16", "--resume", "latest")
    assert cfg["train"]["batch_size"] == 32 and cfg["optim"]["lr"] == 1e-3 and cfg["model"]["name"] == "ViT-B-32"
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["steps"] is None
    assert cfg["train"]["seed"] == 3 and cfg["data"]["workers"] == 1 and cfg["model"]["precision"] == "bf16"
    assert cfg["train"]["resume"] == "latest"
    cfg = printed(capsys, "--train-data", "x.csv", "--dataset-type", "csv")
    assert cfg["data"]["train_path"] == "x.csv" and cfg["data"]["source"] == "csv"


def test_open_clip_values_mean_ours_or_are_refused_naming_the_nearest(capsys, tmp_path):
    from amorlip.config import parse_config_args

    def overrides(*words):
        return dict(parse_config_args(list(words), "amorlip train")[1])

    assert overrides("--precision", "amp") == {"model.precision": "fp16"}  # open_clip's amp: fp16 autocast + scaler
    assert overrides("--model.precision=AMP_BFLOAT16") == {"model.precision": "bf16"}
    assert printed(capsys, "--precision", "amp_bfloat16")["model"]["precision"] == "bf16"
    assert printed(capsys, "--precision", "amp_bf16")["model"]["precision"] == "amp_bf16"  # ours already
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {precision: amp_bfloat16}\n")  # YAML takes open_clip's values too
    assert build_config(str(preset)).model.precision == "bf16"
    line = one_line_error(*run(capsys, "train", "--precision", "pure_fp16")[::2], "train")
    assert "pure_fp16" in line and "pass fp16" in line and "pure_bf16" in line
    assert overrides("--val-data", "v.csv") == {"data.val_path": "v.csv"}


def test_open_clip_bare_bool_flags_and_lists_of_several_words(capsys):
    cfg = printed(capsys, "--force-quick-gelu", "--lock-image", "--grad-checkpointing")  # open_clip's store_true
    assert cfg["model"]["force_quick_gelu"] and cfg["model"]["lock_image"] and cfg["model"]["grad_checkpointing"]
    cfg = printed(capsys, "--force-quick-gelu", "false", "--lr", "0.02")
    assert cfg["model"]["force_quick_gelu"] is False and cfg["optim"]["lr"] == 0.02
    cfg = printed(capsys, "--image-mean", "0.5", "0.4", "0.3", "--temperature.rho-final", "-8.5")
    assert cfg["model"]["image_mean"] == [0.5, 0.4, 0.3] and cfg["temperature"]["rho_final"] == -8.5
    assert printed(capsys, "--image-std=[0.2,0.2,0.2]")["model"]["image_std"] == [0.2, 0.2, 0.2]
    assert printed(capsys, "--image-mean", "none")["model"]["image_mean"] is None
    assert "3 values" in one_line_error(*run(capsys, "train", "--image-mean", "0.5", "0.5")[::2], "train")
    cfg = printed(capsys, "--aug-cfg", "scale=(0.4, 1.0)", "color_jitter=(0.4, 0.4, 0.4, 0.1)", "color_jitter_prob=0.8",
                  "gray_scale_prob=0.2", "--lr", "0.03")  # open_clip's --aug-cfg, as its shell words arrive
    assert cfg["aug"]["scale"] == [0.4, 1.0] and cfg["aug"]["color_jitter"] == [0.4, 0.4, 0.4, 0.1]
    assert cfg["aug"]["color_jitter_prob"] == 0.8 and cfg["aug"]["gray_scale_prob"] == 0.2 and cfg["optim"]["lr"] == 0.03
    assert "unknown key aug.bogus" in one_line_error(*run(capsys, "train", "--aug-cfg", "bogus=1")[::2], "train")
    assert one_line_error(*run(capsys, "train", "--lr")[::2], "train").endswith(
        "--optim.lr needs a value (pass --optim.lr VALUE)")


def test_dataset_type_auto_and_a_bare_train_data_infer_the_source(capsys, tmp_path):
    def source(*words):
        return printed(capsys, *words)["data"]["source"]

    assert source("--train-data", "x.csv") == "csv"  # open_clip's --dataset-type defaults to auto
    assert source("--train-data", "pairs.TSV") == "csv"
    assert source("--dataset-type", "webdataset", "--train-data", "s/{0..3}.tar") == "wds"
    assert source("--dataset-type", "auto", "--train-data", "s/shard-0000.tar") == "wds"
    assert source("--data.source=auto", "--data.train-path", "pipe:cat s/0.tar") == "wds"
    assert source("--train-data", str(tmp_path)) == "wds"  # a shard folder
    assert source("--dataset-type", "synthetic") == "synthetic"
    csv_preset = tmp_path / "csv.yaml"
    csv_preset.write_text("data: {source: csv, train_path: a.csv}\n")
    assert source("--config", str(csv_preset), "--train-data", "rows.data") == "csv"  # kept: the name tells nothing
    line = one_line_error(*run(capsys, "train", "--train-data", "rows.data")[::2], "train")
    assert "rows.data" in line and "--data.source csv" in line and "--data.source wds" in line
    line = one_line_error(*run(capsys, "train", "--dataset-type", "auto")[::2], "train")
    assert "data.train_path" in line and "--data.train-path" in line


def test_print_config_says_what_steps_epochs_give_and_the_run_takes_that_many(capsys, tmp_path):
    words = ["--model.name", "micro-vit", "--data.synthetic-size", "72", "--train.batch-size", "8",
             "--train.epochs", "2", "--data.val-size", "16", "--data.eval-size", "16", "--eval.zeroshot", "false",
             "--eval.retrieval", "false", "--train.progress", "false", "--train.threads", "1",
             "--optim.warmup-steps", "1", "--train.output-dir", str(tmp_path), "--train.name", "e"]
    rc, out, _ = run(capsys, "train", *words, "--print-config")
    assert rc == 0 and yaml.safe_load(out)["train"]["steps"] is None
    assert out.endswith("train.epochs 2 x 9 steps per epoch (72 samples // train.batch_size 8) = 18 steps\n")
    rc, _, err = run(capsys, "train", *words)
    assert rc == 0, err
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["steps"] == 18
    rc, out, _ = run(capsys, "train", "--train-data", "x.csv", "--epochs", "3", "--print-config")
    assert rc == 0 and out.endswith("train.epochs 3 x (the dataset's samples // train.batch_size 64)\n")
    rc, out, _ = run(capsys, "train", "--train.steps", "7", "--print-config")
    assert "# train.steps" not in out


def test_dashes_underscores_equals_and_none(capsys):
    a = printed(capsys, "--train.batch-size", "16", "--optim.warmup_steps=3", "--train.stop-at=none",
                "--temperature.rho-final", "-8.5")
    assert a["train"]["batch_size"] == 16 and a["optim"]["warmup_steps"] == 3 and a["train"]["stop_at"] is None
    assert a["temperature"]["rho_final"] == -8.5


@pytest.mark.parametrize("flag, suggestion", [
    ("--batchsize", "--train.batch-size"),
    ("--train.batchsize", "--train.batch-size"),
    ("--steps", "--train.steps"),
    ("--amor.dimfactor", "--amor.dim-factor"),
    ("--learning-rate", None),
])
def test_unknown_flags_get_a_suggestion(capsys, flag, suggestion):
    line = one_line_error(*run(capsys, "train", flag, "3")[::2], "train")
    assert f"unknown option {flag}" in line
    if suggestion:
        assert f"did you mean {suggestion}?" in line


def test_bad_values_name_the_choices_or_the_type(capsys):
    line = one_line_error(*run(capsys, "train", "--amor.divide-by", "x")[::2], "train")
    assert "comb, target, online" in line and "--amor.divide-by" in line
    assert "cannot read 'many' as int" in one_line_error(*run(capsys, "train", "--train.steps", "many")[::2], "train")
    line = one_line_error(*run(capsys, "train", "--model.name", "ViT-Q-99")[::2], "train")
    assert "ViT-Q-99" in line and "amorlip models" in line


@pytest.mark.parametrize("words", [
    ["train", "--bogus", "1"], ["train", "stray"], ["compare", "--bogus", "1"], ["eval", "run", "--bogus"],
    ["export", "run", "--out", "x", "--bogus"], ["data", "csv", "--out", "x", "--bogus"],
    ["presets", "tiny-clip", "--show"], ["models", "--bogus"], ["bench", "loss", "--bogus", "1"],
    ["bench", "overhead", "--bogus"],
])
def test_every_subcommand_rejects_unknown_flags(capsys, words):
    rc, _, err = run(capsys, *words)
    one_line_error(rc, err, words[0])


def test_eval_and_bench_accept_the_train_spellings():
    args = build_parser().parse_args(["eval", "run", "--model.name", "micro-vit", "--eval.batch-size", "8",
                                      "--train.device", "cpu"])
    assert (args.model, args.batch_size, args.device) == ("micro-vit", 8, "cpu")
    from amorlip.bench.common import base_parser, parse_args

    opts, overrides = parse_args(base_parser("loss", ""), ["--model.name", "micro-vit", "--train.batch-size", "8",
                                                           "--train.device", "cpu", "--model.precision", "fp32"])
    assert ("model.name", "micro-vit") in overrides and ("train.batch_size", "8") in overrides
    assert ("train.device", "cpu") in overrides and opts.precision == "fp32"


# ----------------------------------------------------------------------------------------------------
# base: chains, steps/epochs


def test_base_is_relative_to_the_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "common.yaml").write_text("base: tiny-clip\ntrain:\n  batch_size: 8\n")
    (tmp_path / "cfgs" / "run.yaml").write_text("base: common.yaml\ntrain:\n  steps: 7\n")
    monkeypatch.chdir(tmp_path)  # not the files' folder
    cfg = build_config(str(tmp_path / "cfgs" / "run.yaml"))
    assert cfg.train.batch_size == 8 and cfg.train.steps == 7 and cfg.model.name == "tiny-vit"


def test_base_loop_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loop") as e:
        build_config(str(tmp_path / "a.yaml"))
    assert "a.yaml" in str(e.value) and "b.yaml" in str(e.value)
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        build_config(str(tmp_path / "self.yaml"))


def test_setting_epochs_or_steps_derives_the_other(tmp_path):
    cfg = build_config(None, [("train.epochs", "1")])  # the default steps=600 no longer hides it
    assert cfg.train.epochs == 1 and cfg.train.steps is None
    cfg = build_config("tiny-clip", [("train.epochs", "2")])  # the preset sets steps
    assert cfg.train.epochs == 2 and cfg.train.steps is None
    cfg = build_config("cc3m-rn50-fastclip", [("train.steps", "10")])  # the preset sets epochs
    assert cfg.train.steps == 10 and cfg.train.epochs is None
    with pytest.raises(ConfigError, match="both set"):
        build_config(None, [("train.epochs", "1"), ("train.steps", "5")])
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny-clip\ntrain:\n  epochs: 3\n")  # tiny-clip sets steps: 600
    cfg = build_config(str(child))
    assert cfg.train.epochs == 3 and cfg.train.steps is None
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  epochs: 3\n  steps: 10\n")
    with pytest.raises(ConfigError, match="both set"):
        build_config(str(both))


# ----------------------------------------------------------------------------------------------------
# startup and model names


@pytest.mark.parametrize("words", [["--help"], ["presets"], ["models"], ["bench", "--help"]])
def test_startup_does_not_import_torch(words):
    code = ("import sys; from amorlip.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'" % words)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_closed_pipe_ends_quietly():
    """`amorlip models | head -1`: the reader has gone when amorlip writes; exit 141 as a shell reports SIGPIPE,
    and no traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "amorlip.cli", "models"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


CONFIG_ONLY_COMMANDS = [  # (words, exit status): each finishes in the config layer
    (["presets", "tiny-amorlip"], 0),
    (["presets", "tiny-clip"], 0),
    (["train", "--help"], 0),
    (["compare", "--help"], 0),
    (["train", "--objective", "fastclip", "--print-config"], 0),  # temperature.scheme auto -> rescaled
    (["train", "--train.batch-size", "0"], 2),
    (["train", "--model.name", "nosuchmodel"], 2),
    (["train", "--model.lock-image", "true", "--model.lock-image-unlocked-groups", "9"], 2),  # reads tiny-vit's config
    (["train", "--objective", "amorlip", "--amor.arch", "nope"], 2),
    (["train", "--resolution.phases", "[[0.5, 16]]"], 2),
    (["compare", "--objectives", "clip,siglip", "--train.batch-size", "0"], 2),
    (["compare", "--objectives", "clip", "--sweep", "train.batchsize=16,32"], 2),
]


@pytest.mark.slow
def test_config_layer_does_not_import_torch_or_open_clip():
    """Presets, `--help` and the errors config validation finds import neither torch, torchvision nor open_clip; the
    torch-free model catalog lists what open_clip lists (compared here, in a process that has open_clip)."""
    from amorlip.models import model_names

    code = (
        "import io, json, sys, contextlib\n"
        "from amorlip.cli import main\n"
        "from amorlip.model_catalog import model_names, tower_kinds\n"
        "out = {'rc': [], 'stdout': []}\n"
        "for words, _ in %r:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            rc = main(words)\n"
        "        except SystemExit as e:\n"
        "            rc = e.code\n"
        "    out['rc'].append(rc)\n"
        "    out['stdout'].append(buf.getvalue())\n"
        "out['names'] = model_names()\n"
        "out['kinds'] = [tower_kinds(n) for n in ('tiny-vit', 'tiny-rn', 'RN50', 'ViT-B-32')]\n"
        "out['imported'] = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "print(json.dumps(out))\n" % CONFIG_ONLY_COMMANDS
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == [], f"imported {out['imported']}"
    assert out["rc"] == [rc for _, rc in CONFIG_ONLY_COMMANDS]
    assert yaml.safe_load(out["stdout"][0])["objective"] == "amorlip"
    assert yaml.safe_load(out["stdout"][4])["temperature"]["scheme"] == "rescaled"
    assert "--train.batch-size" in out["stdout"][2] and "--amor.dim-factor" in out["stdout"][2]
    assert out["names"] == model_names()
    assert out["kinds"] == [["vit", "transformer"], ["resnet", "transformer"], ["resnet", "transformer"],
                            ["vit", "transformer"]]


def test_model_catalog_reads_what_open_clip_reads(monkeypatch):
    """The catalog's own reading of the JSON configs (open_clip's live registry hidden from it) gives what
    open_clip's loader built at its import: the same names in the same order, the same config dicts; the tiny
    configs are our files as written."""
    import open_clip

    from amorlip import model_catalog

    theirs = {name: open_clip.get_model_config(name) for name in open_clip.list_models()
              if name not in model_catalog.TINY_MODELS}
    monkeypatch.setattr(model_catalog, "_live_open_clip", lambda: None)
    names = model_catalog.model_names()
    assert [n for n in names if n not in model_catalog.TINY_MODELS] == list(theirs)  # open_clip's order
    assert len(theirs) > 50 and set(model_catalog.TINY_MODELS) <= set(names)
    assert all(model_catalog.model_config(name) == cfg for name, cfg in theirs.items())
    for name in model_catalog.TINY_MODELS:
        assert model_catalog.model_config(name) == json.loads((model_catalog.MODEL_CONFIG_DIR / f"{name}.json").read_text())
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        model_catalog.model_config("ViT-Nope")


def test_objective_classes_take_their_registry_entry():
    """Each registered class gets `name`, `section` and `Config` from its (torch-free) registry entry; the hooks
    say what `temperature.scheme auto` means; the old import paths still work."""
    from amorlip import objectives, reclip, reclip_options
    from amorlip.objectives import REGISTRY, Objective, ObjectiveContext, ObjectiveOutput, get, options
    from amorlip.objectives.amorlip import AmorConfig
    from amorlip.objectives.base import Objective as BaseObjective
    from amorlip.objectives.sogclr import FastCLIPConfig

    for name, entry in REGISTRY.items():
        cls = get(name)
        assert (cls.name, cls.section, cls.Config) == (name, entry.section, entry.options), name
        assert entry.cls == f"{cls.__module__}:{cls.__qualname__}"
    assert Objective is BaseObjective and ObjectiveContext.__module__ == ObjectiveOutput.__module__ == "amorlip.objectives.base"
    assert AmorConfig is options.AmorConfig and reclip.ResolutionConfig is reclip_options.ResolutionConfig
    assert REGISTRY["fastclip"].auto_temperature(FastCLIPConfig()) == "rescaled"
    assert REGISTRY["fastclip"].auto_temperature(FastCLIPConfig(version=0)) == "plain"
    assert REGISTRY["fastclip"].auto_temperature(None) == "rescaled"
    assert all(REGISTRY[n].auto_temperature(None) == "plain" for n in REGISTRY if n != "fastclip")
    with pytest.raises(AttributeError):
        objectives.NoSuchName  # noqa: B018
