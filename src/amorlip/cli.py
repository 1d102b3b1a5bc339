"""Command line: amorlip train | eval | export | compare | bench | data | presets | models."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from amorlip import __version__


def _config_keys_help() -> str:
    from amorlip.config import all_section_types

    lines = ["config keys (override any with --section.key VALUE):", "  --objective NAME"]
    for section, typ in all_section_types().items():
        for f in dataclasses.fields(typ):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            lines.append(f"  --{section}.{f.name.replace('_', '-')} (default: {default})")
    return "\n".join(lines)


def _build_config(args: argparse.Namespace, extra: list[str]):
    from amorlip.config import build_config, parse_overrides

    overrides = parse_overrides(extra)
    if getattr(args, "objective", None):
        overrides.insert(0, ("objective", args.objective))
    return build_config(args.config, overrides)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.train import main_worker

    cfg = _build_config(args, extra)
    main_worker(cfg)
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.checkpoint import export_open_clip

    out, config_path = export_open_clip(args.checkpoint, args.out)
    print(f"wrote {out}\nwrote {config_path}")
    print(
        "load with: open_clip.add_model_config(%r); open_clip.create_model_and_transforms(%r, pretrained=%r)"
        % (str(config_path), config_path.stem, str(out))
    )
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.evaluate.cli import run_eval

    return run_eval(args, extra)


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.compare import run_compare

    return run_compare(args, extra)


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.bench import run_bench

    return run_bench(args, extra)


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.data.writers import write_synthetic_csv, write_synthetic_wds

    if extra:
        raise SystemExit(f"unexpected arguments: {' '.join(extra)}")
    out = Path(args.out)
    if args.format == "csv":
        path = write_synthetic_csv(out, args.n, args.seed)
        print(f"wrote {path}  (train with: amorlip train --data.source csv --data.train-path {path})")
    else:
        shards = write_synthetic_wds(out, args.n, args.seed, args.shard_size)
        print(f"wrote {len(shards)} shards in {out}  (train with: amorlip train --data.source wds --data.train-path {out})")
    return 0


def cmd_presets(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.config import preset_names

    for name in preset_names():
        print(name)
    return 0


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.models import TINY_MODELS, model_names

    print("tiny CPU configs: " + ", ".join(TINY_MODELS))
    print("open_clip configs: " + ", ".join(n for n in model_names() if n not in TINY_MODELS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amorlip",
        description="Resource-efficient CLIP pretraining: AmorLIP, CLIP, SigLIP, SogCLR, FastCLIP, NeuCLIP (+ RECLIP schedules).",
    )
    parser.add_argument("--version", action="version", version=f"amorlip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (also under torchrun)",
        description="Train an open_clip model with the chosen objective. Runs unchanged under "
        "`torchrun --nproc_per_node N -m amorlip.cli train ...`.",
        epilog=_config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="preset name (see `amorlip presets`) or YAML file")
    p.add_argument("--objective", help="clip | siglip | sogclr | fastclip | amorlip | neuclip")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder or checkpoint (zero-shot, retrieval, DataComp, normalizers)")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint), checkpoint file, or exported open_clip .pt")
    p.add_argument("--model", help="model config name (needed only for an exported checkpoint without config)")
    p.add_argument("--datacomp", metavar="ROOT", help="run the DataComp task list on local clip_benchmark wds folders under ROOT")
    p.add_argument("--datacomp-tasks", help="comma-separated subset of DataComp tasks")
    p.add_argument("--normalizers", action="store_true", help="normalizer diagnostics on the held-out split")
    p.add_argument("--data", default=None, help="evaluation data: synthetic | fashion-mnist (default: the run's training source)")
    p.add_argument("--out", help="write results JSON here (default: RUN/eval.json)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a plain open_clip checkpoint (+ config JSON) from a run")
    p.add_argument("checkpoint", help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="output .pt file, or a folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="train several objectives side by side and tabulate/plot them")
    p.add_argument("--config", help="base preset for every entry")
    p.add_argument("--objectives", default="clip,amorlip",
                   help="comma-separated entries; an entry may carry overrides: 'clip[temperature.scheme=rescaled]'")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (mean and spread when more than one)")
    p.add_argument("--out", default="runs/compare", help="output folder for the table and plots")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", add_help=False,
                       help="efficiency benchmarks (overhead, loss, throughput, data, comm, flops); "
                            "`amorlip bench WHAT --help` lists each one's options")
    p.add_argument("what", choices=["overhead", "loss", "throughput", "data", "comm", "flops"])
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="write the embedded synthetic data as CSV+PNG or webdataset shards")
    p.add_argument("format", choices=["csv", "wds"])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("presets", help="list built-in presets")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("models", help="list model configs")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from amorlip.checkpoint import CheckpointError
    from amorlip.config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        from amorlip.data.types import DataError
    except ImportError:  # pragma: no cover
        DataError = ValueError  # type: ignore[misc,assignment]
    try:
        return int(args.func(args, extra) or 0)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"amorlip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the loss diverged: the message says what to change
        print(f"amorlip {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --train.resume latest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
