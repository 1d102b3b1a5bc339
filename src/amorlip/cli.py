"""Command line: amorlip train | launch | eval | export | compare | bench | data | presets | models.

`train` and `compare` parse their words with the config parser (jsonargparse, `amorlip.config.config_parser`):
`--section.key VALUE` for every config key, with help from the dataclass docstrings. The other commands are
small argparse parsers. Every one rejects unknown flags, and every expected error is one line
`amorlip <cmd>: error: ... (fix)` with exit status 2, before any work starts. `amorlip --help`, `presets` (a
preset's resolved configuration too), `models`, `train --help`, `compare --help` and `train --print-config` import
neither torch nor open_clip, and neither does a `train` error found by config validation, except in the checks
that need torch: model.pretrained, train.device cuda, model.precision fp16, data.val_path and eval.imagenet_root.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from amorlip import __version__

TRAIN_DESCRIPTION = (
    "Train an open_clip model with the chosen objective. Values come from the defaults, then the preset "
    "(--config), then the command line. Runs unchanged under `torchrun --nproc_per_node N -m amorlip.cli train ...`."
)
COMPARE_DESCRIPTION = (
    "Train several objectives side by side (same model, data, batch and seeds), evaluate each, and write a "
    "table and plots. Config keys given here apply to every entry; an entry's own [key=value] overrides come next, "
    "then the sweep point's.\n\n"
    "Each (entry, sweep point, seed) is one run, named by its settings: a rerun of the same command skips the runs "
    "that finished with the same settings and resumes the half-finished ones from their checkpoint. Tables "
    "(table.md/.csv) give the mean and the 95% Student t interval over seeds; with --reference each other entry "
    "also gets its paired difference to the reference (same seeds) and a verdict: better / worse when the "
    "interval excludes 0, else \"no difference measured\". --jobs N trains N runs at once, each in its own "
    "process. docs/compare.md explains the outputs."
)
BENCH_COMMANDS = ("overhead", "loss", "throughput", "data", "comm", "flops", "memory", "amortizer")


# ----------------------------------------------------------------------------------------------------
# train, compare: the config parser


def _train_options(parser: Any) -> None:
    parser.add_argument("--config", metavar="PRESET|FILE",
                        help="preset name (`amorlip presets` lists them) or YAML file; the command line overrides it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (YAML) and exit without training")


def _compare_options(parser: Any) -> None:
    _train_options(parser)
    parser.add_argument("--objectives", default="clip,amorlip", metavar="ENTRIES",
                        help="comma-separated objectives or presets; an entry may carry overrides, e.g. "
                             "'clip,clip[temperature.scheme=rescaled],amorlip[amor.divide_by=target]'")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (mean and 95% interval when more than one)")
    parser.add_argument("--out", default="runs/compare", help="output folder for the table and plots")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                        help="run every entry at each value of a config key, e.g. --sweep train.batch_size=16,32,64; "
                             "repeat for a grid (--sweep data.dataset_size=4000,30000); the first key is the plots' "
                             "x axis")
    parser.add_argument("--budget", default="samples", metavar="{samples,steps,epochs}",
                        help="what a sweep holds equal, from train.steps (or train.epochs) at the base batch size: "
                             "samples (train.steps = base steps x base batch / batch; eval_every, log_every, "
                             "checkpoint_every, warmup and cooldown steps scale alike), steps (the same train.steps) "
                             "or epochs (the same train.epochs); a sweep over train.steps or train.epochs sets the "
                             "length itself")
    parser.add_argument("--reference", metavar="LABEL",
                        help="an entry of --objectives (e.g. clip): the others get paired differences to it per "
                             "metric and sweep point, with a 95% interval and a verdict")
    parser.add_argument("--jobs", default="1", metavar="N",
                        help="train N runs at once, each in its own process with one CPU thread (unless "
                             "--train.threads says otherwise), their output in OUT/jobs/; 1 trains them one after "
                             "another in this process")
    parser.add_argument("--tables-only", action="store_true",
                        help="train nothing: write the tables and plots from the runs of this command that have "
                             "finished so far (e.g. while it runs elsewhere); the others are listed as not finished")


def cmd_train(words: list[str]) -> int:
    """Collective under torchrun: every rank runs `amorlip train` together (train.main_worker). Parse, check and
    train; `--print-config` prints the resolved config instead."""
    from amorlip.config import build_config, describe, parse_config_args
    from amorlip.config.build import derived_steps_note

    own, overrides = parse_config_args(words, "amorlip train", TRAIN_DESCRIPTION, _train_options)
    cfg = build_config(own["config"], overrides)
    if own["print_config"]:
        note = derived_steps_note(cfg)
        print(describe(cfg) + (note + "\n" if note else ""), end="")
        return 0
    if os.environ.get("RANK", "0") == "0":  # a run folder in use is refused now, before torch is imported
        from amorlip.runlock import RUN_IN_USE_FIX, check_free

        check_free(cfg.run_dir, "run folder", RUN_IN_USE_FIX)
    from amorlip.model_catalog import skip_unused_imports

    skip_unused_imports(cfg.model.name)  # a lean start: open_clip would import transformers and timm unasked
    from amorlip.signals import Stopped
    from amorlip.train import main_worker

    try:
        main_worker(cfg)
    except Stopped as stopped:  # saved after a stop signal: under `amorlip launch` the launcher reports it
        from amorlip.launch import report_stop

        if report_stop(stopped.signum):
            return 0
        raise
    return 0


def cmd_compare(words: list[str]) -> int:
    from amorlip.config import describe, override_words, parse_config_args

    own, overrides = parse_config_args(words, "amorlip compare", COMPARE_DESCRIPTION, _compare_options)
    args = argparse.Namespace(**own)
    args.budget_given = any(w == "--budget" or w.startswith("--budget=") for w in words)
    if args.print_config:
        from amorlip.compare import compare_configs, point_label

        for run in compare_configs(args, overrides):
            where = " ".join(filter(None, (run.entry, point_label(run.point))))
            print(f"# --- {where}, seed {run.seed}\n{describe(run.cfg)}", end="")
        return 0
    from amorlip.compare import run_compare

    return run_compare(args, override_words(overrides))


# ----------------------------------------------------------------------------------------------------
# bench: forwards to amorlip.bench (each benchmark has its own parser)


def _bench_summary(what: str) -> str:
    """The first sentence of a bench module's docstring, read without importing it (or torch)."""
    spec = importlib.util.find_spec(f"amorlip.bench.{what}")
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else ""
    text = " ".join((doc or "").split("\n\n")[0].split())
    text = text.split(": ", 1)[1] if text.startswith("`amorlip bench") and ": " in text else text
    return text


def bench_help() -> str:
    lines = ["usage: amorlip bench {" + ",".join(BENCH_COMMANDS) + "} [options] [--SECTION.KEY VALUE ...]", "",
             "Efficiency benchmarks: figures measured side by side in one run (docs/benchmarks.md).", "",
             "benchmarks:"]
    for what in BENCH_COMMANDS:
        lines.append(f"  {what:<11} {_bench_summary(what)}")
    lines += ["", "`amorlip bench WHAT --help` lists one benchmark's options. They all take --config, --model "
              "(= --model.name), --batch-size (= --train.batch-size), --device (= --train.device), --precision "
              "(= --model.precision), --threads (= --train.threads), and any --section.key VALUE of "
              "`amorlip train --help`."]
    return "\n".join(lines)


def cmd_bench(words: list[str]) -> int:
    from amorlip.config import ConfigError

    if not words:
        print(bench_help(), file=sys.stderr)
        return 2
    if words[0] in ("-h", "--help"):
        print(bench_help())
        return 0
    what, rest = words[0], words[1:]
    if what not in BENCH_COMMANDS:
        raise ConfigError(f"unknown benchmark {what!r} (choose one of: {', '.join(BENCH_COMMANDS)})")
    from amorlip.bench import run_bench

    return run_bench(argparse.Namespace(what=what), rest)


# ----------------------------------------------------------------------------------------------------
# the small commands


def cmd_export(args: argparse.Namespace) -> int:
    from amorlip.checkpoint import export_open_clip

    out, config_path = export_open_clip(args.checkpoint, args.out)
    print(f"wrote {out}\nwrote {config_path}")
    print(
        "load with: open_clip.add_model_config(%r); open_clip.create_model_and_transforms(%r, pretrained=%r)"
        % (str(config_path), config_path.stem, str(out))
    )
    import torch

    tensors = len(torch.load(out, map_location="meta", weights_only=True)["state_dict"])
    print(f"exported: {out} ({tensors} tensors)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from amorlip.evaluate.cli import run_eval

    return run_eval(args, [])


def cmd_data(args: argparse.Namespace) -> int:
    from amorlip.data.writers import write_dataset

    written = write_dataset(args.format, Path(args.out), args.n, args.seed, args.shard_size, args.overwrite)
    if args.format == "csv":
        print(f"wrote {written[0]}  (train with: amorlip train --data.source csv --data.train-path {written[0]})")
    else:
        print(f"wrote {len(written)} shards in {args.out}  (train with: amorlip train --data.source wds "
              f"--data.train-path {args.out})")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from amorlip.config import build_config, describe, preset_description, preset_names

    if args.name:
        print(describe(build_config(args.name)), end="")
        return 0
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    print("\n`amorlip presets NAME` prints a preset's resolved configuration; `amorlip train --config NAME` runs it.")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from amorlip.model_catalog import TINY_MODELS, model_names

    print("tiny CPU configs: " + ", ".join(TINY_MODELS))
    print("open_clip configs: " + ", ".join(n for n in model_names() if n not in TINY_MODELS))
    return 0


# ----------------------------------------------------------------------------------------------------
# the top-level parser


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line `amorlip <cmd>: error: ...` (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The `amorlip` parser of the commands argparse reads (eval, export, data, presets, models); train, compare,
    bench and launch have entries for `amorlip --help` only (they parse their own words, OWN_PARSERS)."""
    parser = _Parser(
        prog="amorlip",
        description="Resource-efficient CLIP pretraining: AmorLIP, CLIP, SigLIP, SogCLR, FastCLIP, NeuCLIP (+ RECLIP schedules).",
        epilog="`amorlip COMMAND --help` explains each command; config keys are listed by `amorlip train --help`.",
    )
    parser.add_argument("--version", action="version", version=f"amorlip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    # train, compare and bench parse their own words (see main); these entries are for `amorlip --help`
    sub.add_parser("train", add_help=False, help="train a model (also under torchrun); --help lists every config key")
    sub.add_parser("launch", add_help=False,
                   help="torchrun whose every stop signal saves a checkpoint: amorlip launch [torchrun options] "
                        "-m amorlip.cli train ...")
    _add_eval_parser(sub)

    p = sub.add_parser("export", help="write a plain open_clip checkpoint (+ config JSON) from a run")
    p.add_argument("checkpoint", help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="output .pt file, or a folder")
    p.set_defaults(func=cmd_export)

    sub.add_parser("compare", add_help=False, help="train several objectives side by side and tabulate/plot them")
    sub.add_parser("bench", add_help=False,
                   help="efficiency benchmarks (" + ", ".join(BENCH_COMMANDS) + "); `amorlip bench --help` lists them")

    _add_data_parser(sub)

    p = sub.add_parser("presets", help="list the built-in presets, or print one's resolved configuration")
    p.add_argument("name", nargs="?", metavar="NAME", help="a preset name or YAML file: print its resolved configuration")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("models", help="list model configs")
    p.set_defaults(func=cmd_models)
    return parser


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`amorlip eval` and its options."""
    from amorlip.data.sources import HELD_OUT

    p = sub.add_parser("eval", help="evaluate a run folder or checkpoint (zero-shot, retrieval, DataComp, normalizers)")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint), checkpoint file, or exported open_clip .pt")
    p.add_argument("--model", "--model.name", dest="model",
                   help="model config name (needed only for an exported checkpoint without config)")
    p.add_argument("--datacomp", metavar="ROOT", help="run the DataComp task list on local clip_benchmark wds folders under ROOT")
    p.add_argument("--datacomp-tasks", help="comma-separated subset of DataComp tasks")
    p.add_argument("--normalizers", action="store_true", help="normalizer diagnostics (log partition estimates vs exact) on a fixed training subset and held-out pairs")
    p.add_argument("--gradient-fidelity", action="store_true",
                   help="bias and variance of each objective's minibatch gradient against the exact full-data InfoNCE "
                        "gradient, on the run's frozen features, per batch size (docs/findings.md); writes "
                        "gradient_fidelity.png beside the results JSON")
    p.add_argument("--gf-objectives", default="clip,sogclr,fastclip,amorlip,neuclip",
                   help="objectives for --gradient-fidelity (default: clip,sogclr,fastclip,amorlip,neuclip)")
    p.add_argument("--gf-batch-sizes", default="16,64,256,1024",
                   help="batch sizes for --gradient-fidelity (default: 16,64,256,1024; capped at the pairs)")
    p.add_argument("--gf-pairs", type=int, default=None,
                   help="training pairs that make the dataset of --gradient-fidelity (default: all)")
    p.add_argument("--gf-warmup", type=int, default=2,
                   help="epochs over the pairs before measuring, so objective states see every pair (default 2)")
    p.add_argument("--gf-epochs", type=int, default=4, help="epochs measured (visits per pair; default 4)")
    p.add_argument("--gf-trained-state", action="store_true",
                   help="the run's own objective starts from the state its checkpoint saved (lambda nets, u, "
                        "prototypes) at its step, without warm-up, instead of a fresh state warmed up on the frozen "
                        "features; every measured pass counts as the checkpoint's epoch (needs all training pairs)")
    p.add_argument("--data", "--data.source", dest="data", default=None,
                   help=f"evaluation data: {', '.join(HELD_OUT)}, or a CSV / shards / class folder path (default: what "
                        "the run evaluated on: its data.val_path, eval.imagenet_root or its source's held-out split)")
    p.add_argument("--out", help="write results JSON here (default: RUN/eval.json; with --data, RUN/eval-NAME-HASH.json "
                                 "per data set, so that evaluations on other data keep their own files)")
    p.add_argument("--batch-size", "--eval.batch-size", "--eval.batch_size", dest="batch_size", type=int, default=256,
                   help="evaluation batch size (eval.batch_size; default: 256)")
    p.add_argument("--device", "--train.device", dest="device", default="auto",
                   help="auto | cpu | cuda (train.device; default: auto)")
    p.set_defaults(func=cmd_eval)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    """`amorlip data` and its options."""
    p = sub.add_parser("data", help="write the embedded synthetic data as CSV+PNG or webdataset shards")
    p.add_argument("format", choices=["csv", "wds"])
    p.add_argument("--out", required=True, help="the folder to write (created; files of other kinds in it are kept)")
    p.add_argument("--n", type=int, default=2000, help="number of pairs (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="the synthetic scenes' seed (default: 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per webdataset shard (default: 1000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset of this format already in --out (by default that is an error)")
    p.set_defaults(func=cmd_data)


def cmd_launch(words: list[str]) -> int:
    from amorlip.launch import main as launch_main

    return launch_main(words)


OWN_PARSERS: dict[str, Callable[[list[str]], int]] = {"train": cmd_train, "compare": cmd_compare, "bench": cmd_bench,
                                                      "launch": cmd_launch}


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message names the fix (printed as one line, exit 2); DataError's module is looked up only if
    already imported, so that startup does not import torch."""
    from amorlip.errors import CheckpointError, ConfigError

    out: list[type[BaseException]] = [ConfigError, CheckpointError, FileNotFoundError]
    cls = getattr(sys.modules.get("amorlip.data.types"), "DataError", None)
    if isinstance(cls, type):
        out.append(cls)
    return tuple(out)


def warning_line(command: str | None) -> Callable[..., str]:
    """A `warnings.formatwarning` for the command line: `amorlip CMD: warning: MESSAGE`, naming the library a
    warning came from when it is not amorlip itself, instead of Python's source path and line."""

    def format_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        parts = Path(filename).parts
        origin = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else Path(filename).stem
        source = "" if "amorlip" in parts else f" ({category.__name__} from {origin.removesuffix('.py')})"
        return f"{prog}: warning: {message}{source}\n"

    prog = f"amorlip {command}" if command else "amorlip"
    return format_warning


def main(argv: list[str] | None = None) -> int:
    """Collective for `amorlip train` under torchrun (every rank runs it: cmd_train). The `amorlip` command line:
    dispatches to the command and returns its exit status (an expected error: one line, 2; a divergence: 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    import warnings

    previous_format, warnings.formatwarning = warnings.formatwarning, warning_line(command)
    try:
        if command != "train":
            return _run_command(argv, command)
        from amorlip.outlog import OutLog

        with OutLog():  # RUN/out.log, once the run folder exists
            return _run_command(argv, command)
    finally:
        warnings.formatwarning = previous_format


def _run_command(argv: list[str], command: str | None) -> int:
    try:
        if command in OWN_PARSERS:
            return int(OWN_PARSERS[command](argv[1:]) or 0)
        args, extra = build_parser().parse_known_args(argv)
        if extra:
            print(f"amorlip {args.command}: error: unrecognized arguments: {' '.join(extra)} "
                  f"(see `amorlip {args.command} --help`)", file=sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except FloatingPointError as e:  # the loss diverged: the message says what to change
        print(f"amorlip {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a training (which saves on Ctrl-C, amorlip.signals): nothing more to save
        print(f"amorlip {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`amorlip models | head -1`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as e:
        if not isinstance(e, _expected_errors()):
            raise
        print(f"amorlip {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
