"""The command-line parser of `train` and `compare` (jsonargparse): the command's own options, `--objective` and
one group per config section, `--SECTION.KEY VALUE` with help from the fields' docstrings; every value is
converted and checked by it. Around it, three things of ours: the `--section.key` spelling with dashes, the
open_clip aliases, and one-line error messages that name the fix.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import re
from typing import Any, Callable, get_args, get_origin

from amorlip.config.checks import flag_of
from amorlip.config.keys import is_optional, key_types, value_error
from amorlip.config.sections import all_section_types
from amorlip.data.sources import OPEN_CLIP_SOURCE_NAMES
from amorlip.errors import ConfigError
from amorlip.objectives.registry import DEFAULT_OBJECTIVE, REGISTRY

OPEN_CLIP_FLAGS: dict[str, str] = {
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "epochs": "train.epochs",
    "model": "model.name",
    "train_data": "data.train_path",
    "val_data": "data.val_path",
    "dataset_type": "data.source",
    "resume": "train.resume",
    "precision": "model.precision",
    "workers": "data.workers",
    "seed": "train.seed",
    "wd": "optim.weight_decay",
    "warmup": "optim.warmup_steps",
    "beta1": "optim.beta1",
    "beta2": "optim.beta2",
    "eps": "optim.eps",
    "grad_clip_norm": "optim.grad_clip",
    "name": "train.name",
    "logs": "train.output_dir",
    "device": "train.device",
    "force_quick_gelu": "model.force_quick_gelu",
    "force_image_size": "model.force_image_size",
    "force_patch_dropout": "model.force_patch_dropout",
    "image_mean": "model.image_mean",
    "image_std": "model.image_std",
    "image_interpolation": "model.image_interpolation",
    "image_resize_mode": "model.image_resize_mode",
    "pretrained": "model.pretrained",
    "lock_image": "model.lock_image",
    "lock_image_unlocked_groups": "model.lock_image_unlocked_groups",
    "lock_image_freeze_bn_stats": "model.lock_image_freeze_bn_stats",
    "lock_text": "model.lock_text",
    "lock_text_unlocked_layers": "model.lock_text_unlocked_layers",
    "lock_text_freeze_layer_norm": "model.lock_text_freeze_layer_norm",
    "grad_checkpointing": "model.grad_checkpointing",
    "torchcompile": "model.compile",
}
"""open_clip's training flags (`--batch-size 32`) that mean one of our keys: accepted as aliases on `train` and
`compare` (and listed under `amorlip train --help`)."""

AUTO_SOURCE = "auto"
"""open_clip's `--dataset-type auto`: the source is inferred from data.train_path (`amorlip.config.build`)."""

OPEN_CLIP_VALUES: dict[str, dict[str, str]] = {
    "model.precision": {"amp": "fp16", "amp_bfloat16": "bf16"},
    "data.source": OPEN_CLIP_SOURCE_NAMES,
}
"""open_clip's values of a key that mean one of ours (`--precision amp` = fp16 autocast with a gradient scaler,
`--dataset-type webdataset`: the data-source registry's `open_clip_name`s), accepted in every spelling of the key, on the command line and in YAML."""

REFUSED_VALUES: dict[str, dict[str, str]] = {
    "model.precision": {
        "pure_fp16": "model.precision=pure_fp16 (open_clip's fp16 weights and optimizer state, no loss scaler) is "
                     "not offered: fp16 without a scaler underflows in contrastive training (pass fp16 for fp16 "
                     "autocast with a gradient scaler, open_clip's amp, or pure_bf16 for low-precision weights)",
    },
}
"""open_clip's values we do not offer, with the one-line reason and the nearest offer."""


def open_clip_value(key: str, value: Any) -> Any:
    """`value` of the dotted `key` in our terms: an open_clip value mapped to ours (OPEN_CLIP_VALUES), a refused
    one raised as ConfigError naming the nearest offer (REFUSED_VALUES); any other value unchanged."""
    if not isinstance(value, str):
        return value
    refused = REFUSED_VALUES.get(key, {}).get(value.lower())
    if refused:
        raise ConfigError(refused)
    return OPEN_CLIP_VALUES.get(key, {}).get(value.lower(), value)



def _formatter_class() -> type:
    """jsonargparse's help formatter, with two changes argparse offers no public hook for (so they override its
    formatter's methods): descriptions keep their line breaks, and keys are spelt as users type them."""
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        """jsonargparse's help, with keys spelled as users type them (`--train.batch-size`)."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            # keep the line breaks of descriptions and epilogs (each line is wrapped on its own)
            return "\n".join(indent + line if line.startswith("  ") else
                             super(HelpFormatter, self)._fill_text(line, width, indent) if line.strip() else ""
                             for line in text.splitlines())

        def _format_action_invocation(self, action: Any) -> str:
            text = super()._format_action_invocation(action)
            for opt in action.option_strings:
                if "." in opt:
                    text = text.replace(opt, opt.replace("_", "-"))
            return text

    return HelpFormatter



def _aliases_help() -> str:
    width = max(len(k) for k in OPEN_CLIP_FLAGS) + 2
    pairs = [f"  --{k.replace('_', '-'):<{width}} = {flag_of(v)}" for k, v in OPEN_CLIP_FLAGS.items()]
    return "open_clip's spellings are accepted as aliases:\n" + "\n".join(pairs)



class _OwnOptions:
    """What `add_options` is given: `add_argument` adds to the parser and keeps the action it made, so that the
    command's own options are known without reading argparse's private action lists."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self.actions: list[argparse.Action] = []

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._parser.add_argument(*args, **kwargs)
        self.actions.append(action)
        return action



def config_parser(prog: str = "amorlip train", description: str | None = None,
                  add_options: Callable[[Any], None] | None = None) -> tuple[Any, list[argparse.Action]]:
    """A jsonargparse parser for `prog` and the actions of the command's own options: `add_options(p)` adds them
    through `p.add_argument`; then `--objective` and one group per config section (`--section.key VALUE`, help
    from the fields' docstrings)."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = jsonargparse.ArgumentParser(
        prog=prog, description=description, exit_on_error=False, formatter_class=_formatter_class(),
        usage=f"{prog} [options] [--SECTION.KEY VALUE ...]",
        epilog="Every key is also accepted with underscores (--train.batch_size) and as --key=value; `none` unsets "
               "a key whose type allows null. Setting one of train.steps / train.epochs derives the other.\n\n"
               + _aliases_help(),
    )
    own = _OwnOptions(parser)
    if add_options is not None:
        add_options(own)
    names = list(REGISTRY)
    parser.add_argument("--objective", choices=names, metavar="{" + ",".join(names) + "}", default=DEFAULT_OBJECTIVE,
                        help="the training objective; its options are the section of the same name below")
    for section, typ in all_section_types().items():
        doc = "" if not typ.__doc__ or typ.__doc__.startswith(typ.__name__ + "(") else typ.__doc__
        doc = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0].rstrip(".")
        # our own group without jsonargparse's `--section FILE` loader (YAML presets do that job)
        group = parser.add_argument_group(f"[{section}]" + (f" {doc}" if doc else ""), name=section)
        group.add_class_arguments(typ, nested_key=section, as_group=False, fail_untyped=False, instantiate=False)
    return parser, own.actions


@functools.lru_cache(maxsize=1)
def value_parser(key_set: tuple[str, ...]) -> Any:
    """The parser that converts single values (`convert`), built once per set of keys."""
    return config_parser("amorlip")[0]



def _is_list(typ: Any) -> bool:
    """Whether the type is a list (or an optional one)."""
    return any(get_origin(t) is list for t in (typ, *get_args(typ)))


def _value_words(words: list[str], i: int, typ: Any) -> tuple[str | None, int]:
    """The value of the key whose flag is `words[i - 1]`, and the index after it: the next word; none for a bare
    bool flag (open_clip's `--force-quick-gelu`: the next word is another flag, or there is none: true); for a
    list, every word up to the next flag joined (`--image-mean 0.5 0.5 0.5`)."""
    def is_flag(k: int) -> bool:
        return words[k].startswith("--") and len(words[k]) > 2

    if i >= len(words) or is_flag(i):
        return ("true", i) if typ is bool else (None, i)
    if _is_list(typ) and not words[i].lstrip().startswith("[") and words[i].lower() not in ("none", "null"):
        j = i
        while j < len(words) and not is_flag(j):
            j += 1
        return "[" + ",".join(words[i:j]) + "]", j
    return words[i], i + 1


def _canonical_words(words: list[str], types: dict[str, Any], own: set[str]) -> list[str]:
    """Command-line words with config keys in the parser's spelling: dashes -> underscores, open_clip aliases ->
    our keys, open_clip values -> ours (`open_clip_value`), `none` -> null for keys that may be unset, bare bool
    flags -> true and lists given as several words -> one (`_value_words`)."""
    out: list[str] = []
    i = 0
    while i < len(words):
        word, i = words[i], i + 1
        if word in ("--aug-cfg", "--aug_cfg"):  # open_clip's `--aug-cfg KEY=VALUE ...`: the aug section's keys
            while i < len(words) and not words[i].startswith("--"):
                key, _, value = words[i].partition("=")
                value = value.strip()
                if value.startswith("(") and value.endswith(")"):
                    value = "[" + value[1:-1] + "]"
                out.append(f"--aug.{key.strip()}={value}")
                i += 1
            continue
        name, eq, value = word[2:].partition("=")
        canonical = OPEN_CLIP_FLAGS.get(name.replace("-", "_"), name.replace("-", "_"))
        if not word.startswith("--") or len(word) <= 2 or name in own or canonical not in types:
            out.append(word)
            continue
        typ = types[canonical]
        if not eq:
            value, i = _value_words(words, i, typ)
            if value is None:  # no value: the parser says so
                out.append(f"--{canonical}")
                continue
        value = "null" if is_optional(typ) and value.lower() == "none" else open_clip_value(canonical, value)
        out.append(f"--{canonical}={value}")
    return out



def _take_auto_source(words: list[str]) -> tuple[list[str], bool]:
    """Canonical words without `--data.source auto` (not a source: the parser would refuse it), and whether it was
    there (`amorlip.config.build` infers the source from data.train_path then)."""
    out: list[str] = []
    auto = False
    i = 0
    while i < len(words):
        word = words[i]
        if word == f"--data.source={AUTO_SOURCE}":
            auto = True
        elif word == "--data.source" and i + 1 < len(words) and words[i + 1].lower() == AUTO_SOURCE:
            auto, i = True, i + 1
        else:
            out.append(word)
        i += 1
    return out, auto



def _unknown_option_error(message: str, types: dict[str, Any], own: list[str]) -> ConfigError:
    words = message.split(":", 1)[1].split() if ":" in message else []
    flags = [w for w in words if w.startswith("-")] or words
    known = {flag_of(k): flag_of(k) for k in types}
    known.update({o: o for o in own})
    known.update({flag_of(alias): flag_of(key) for alias, key in OPEN_CLIP_FLAGS.items()})
    parts = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        tail = name.lstrip("-").replace("-", "_")  # `--steps` -> `--train.steps`: the key's last part, any section
        close = [flag_of(k) for k in types if "." not in tail and k.split(".")[-1] == tail][:1]
        if not close:
            matches = difflib.get_close_matches(name.replace("_", "-"), list(known), n=1, cutoff=0.6)
            close = [known[c] for c in matches]
        key = name.lstrip("-").replace("-", "_")
        parts.append(f"option {name}" + (f": unknown key {key}" if "." in key else "")
                     + (f" (did you mean {close[0]}?)" if close else ""))
    return ConfigError(f"unknown {', '.join(parts)} (see --help for the keys)")



def parse_config_args(words: list[str], prog: str, description: str | None = None,
                      add_options: Callable[[Any], None] | None = None) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Parse a command's words with the config parser: returns (the command's own options, as a dict with their
    defaults, and the config overrides given, as (dotted key, value) pairs). `--help` prints and exits 0."""
    parser, own_actions = config_parser(prog, description, add_options)
    types = key_types()
    own_names = {o[2:] for a in own_actions for o in a.option_strings}
    canonical, auto_source = _take_auto_source(_canonical_words(list(words), types, own_names))
    try:
        ns = parser.parse_args(canonical, defaults=False)
    except argparse.ArgumentError as e:
        message = " ".join(str(e).split())
        if message.lower().startswith("unrecognized arguments"):
            raise _unknown_option_error(message, types, [o for a in own_actions for o in a.option_strings])
        match = re.search(r'Parser key "([^"]+)"', str(e))
        if match and match.group(1) in types:
            given = re.search(r"(?:Given|Got) value: (.*)", str(e))
            raise value_error(match.group(1), given.group(1).strip() if given else "?", types[match.group(1)])
        missing = re.match(r"argument (--\S+): expected one argument", message)
        if missing:
            flag = missing.group(1).replace("_", "-") if "." in missing.group(1) else missing.group(1)
            raise ConfigError(f"{flag} needs a value (pass {flag} VALUE)") from None
        raise ConfigError(message) from None
    given = ns.as_dict()
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix not in types:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat.append((prefix, value))

    walk("", given)
    own = {a.dest: a.default for a in own_actions}
    overrides = []
    for key, value in flat:
        if key in own:
            own[key] = value
        else:
            overrides.append((key, value))
    if auto_source:
        overrides.append(("data.source", AUTO_SOURCE))
    return own, overrides
