"""open_clip's own trainer (`open_clip_train.main`, unmodified) with one of our objectives in place of its loss.

    python -m amorlip.open_clip_train --objective amorlip [--amor.t-online 1] [--temperature-scheme rescaled]
        [--rho 6.5] --model tiny-vit --train-data train.csv --dataset-type csv ... (any open_clip_train flag)

Our flags are read here, every other one goes to `open_clip_train.main.main` as it is. Four of its module names
are wrapped, none of its code is changed: `get_data` (to learn the dataset size and steps per epoch),
`create_loss` (returns `amorlip.make_loss(...)`, a `ContrastiveLoss`), the lr schedulers (each `scheduler(step)`
call also tells the loss the global step, so its schedules are exact, resumed runs included) and
`train_one_epoch` (after each epoch the objective's state is saved as `RUN/objective/epoch_N.pt` /
`epoch_latest.pt`, beside open_clip's `RUN/checkpoints/`, and loaded again on `--resume`; not inside checkpoints/,
whose newest `*.pt` open_clip's `--resume latest` takes for the model's).

Not possible through open_clip's trainer, and refused up front: index-based objectives (sogclr, fastclip need
each sample's dataset index; open_clip's loaders yield `(image, text)` only), `--accum-freq` > 1 (it calls the loss
once per micro-batch, so a stateful objective would update K times a step: use `amorlip train --train.accum-steps`
or `ContrastiveLoss.forward_backward`) and `--distill`.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import yaml

from amorlip import objectives
from amorlip.errors import ConfigError

OWN_FLAGS = ("--objective", "--temperature-scheme", "--rho")
SCHEDULERS = ("cosine_lr", "const_lr", "const_lr_cooldown")


def split_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Our flags (objective, temperature scheme, rho, the objective's `--SECTION.KEY VALUE` options) and the rest,
    for open_clip_train, in their order."""
    ours: dict[str, Any] = {"objective": None, "temperature": "auto", "rho": 6.5, "options": {}}
    rest: list[str] = []
    words = iter(argv)
    for word in words:
        key, eq, value = word.partition("=")
        if key in OWN_FLAGS or (key.startswith("--") and "." in key):
            if not eq:
                value = next(words, None)
                if value is None:
                    raise ConfigError(f"{key} needs a value")
            if key == "--objective":
                ours["objective"] = value
            elif key == "--temperature-scheme":
                ours["temperature"] = value
            elif key == "--rho":
                ours["rho"] = float(value)
            else:
                ours["options"][key[2:]] = value
        else:
            rest.append(word)
    if ours["objective"] is None:
        raise ConfigError(f"--objective NAME is required (one of: {', '.join(objectives.REGISTRY)})")
    return ours, rest


def _options(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """`--SECTION.KEY VALUE` words -> the objective's options (values read as YAML: 1, 0.5, true, null)."""
    cls = objectives.get(name)
    out = {}
    for dotted, value in raw.items():
        section, _, key = dotted.partition(".")
        if section != cls.section:
            raise ConfigError(f"--{dotted}: {name}'s options are --{cls.section}.KEY"
                              if cls.section else f"--{dotted}: {name} takes no options")
        out[key.replace("-", "_")] = yaml.safe_load(value)  # a bad key: make_loss's message lists the valid ones
    return out


def check_supported(name: str, rest: list[str]) -> list[str]:
    """Refuse what open_clip's trainer cannot do with `name`; add `--siglip` (its logit scale and bias init) for an
    objective that needs a logit bias."""
    cls = objectives.get(name)
    if cls.needs_indices:
        raise ConfigError(
            f"objective {name!r} needs each sample's dataset index, which open_clip's data loaders do not yield; "
            f"train it with `amorlip train --objective {name}` (any open_clip model, --data.source csv|wds) or in your "
            "own loop with amorlip.make_loss(...)(..., indices=...)")
    for i, word in enumerate(rest):
        key, _, value = word.partition("=")
        if key == "--accum-freq" and int(value or rest[i + 1]) > 1:
            raise ConfigError("--accum-freq > 1 calls the loss once per micro-batch, which would update the "
                              "objective's state K times a step; use `amorlip train --train.accum-steps K` or "
                              "ContrastiveLoss.forward_backward(..., accum_steps=K)")
        if key == "--distill":
            raise ConfigError("--distill is not supported with our objectives (drop it)")
    if cls.model_overrides.get("init_logit_bias") is not None and "--siglip" not in rest:
        rest = [*rest, "--siglip"]  # open_clip's switch for SigLIP's init (s = 10, b = -10); its loss is replaced
    return rest


def main(argv: list[str] | None = None) -> None:
    """Collective under torchrun: every rank runs it. Run open_clip_train.main with our objective in place of its
    loss (see the module docstring)."""
    ours, rest = split_args(list(sys.argv[1:] if argv is None else argv))
    if ours["objective"] not in objectives.REGISTRY:
        raise ConfigError(f"unknown objective {ours['objective']!r}; choose one of: {', '.join(objectives.REGISTRY)}")
    options = _options(ours["objective"], ours["options"])
    rest = check_supported(ours["objective"], rest)
    try:
        import open_clip_train.main as trainer
    except ImportError as e:
        raise ConfigError(f"open_clip's trainer cannot be imported ({e}); pip install 'amorlip[open_clip_train]'") from None
    from amorlip.models import register_tiny_configs

    register_tiny_configs()
    state: dict[str, Any] = {}
    saved = {name: getattr(trainer, name) for name in ("get_data", "create_loss", "train_one_epoch", *SCHEDULERS)}
    try:
        trainer.get_data = _capture_data(saved["get_data"], state)
        trainer.create_loss = _loss_factory(ours, options, state)
        trainer.train_one_epoch = _saving_epochs(saved["train_one_epoch"], state)
        for name in SCHEDULERS:
            setattr(trainer, name, _telling_step(saved[name], state))
        trainer.main(rest)
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


def _capture_data(get_data: Callable, state: dict[str, Any]) -> Callable:
    def wrapped(args, *a, **k):
        state["data"] = data = get_data(args, *a, **k)
        return data
    return wrapped


def _telling_step(factory: Callable, state: dict[str, Any]) -> Callable:
    """An lr scheduler factory whose schedulers also set the loss's step (open_clip calls scheduler(step) first)."""
    def wrapped(*a, **k):
        scheduler = factory(*a, **k)

        def at(step: int):
            if state.get("loss") is not None:
                state["loss"].step = int(step)
            return scheduler(step)
        return at
    return wrapped


def _loss_factory(ours: dict[str, Any], options: dict[str, Any], state: dict[str, Any]) -> Callable:
    """open_clip's `create_loss` replaced: our objective as a ContrastiveLoss sized by the captured data."""
    def create_loss(args):
        """Collective: every rank calls this together (`make_loss`)."""
        import open_clip

        from amorlip.loss import make_loss

        if "train" not in state.get("data", {}):
            raise ConfigError("our objectives train: pass --train-data")
        loader = state["data"]["train"].dataloader
        loss = make_loss(ours["objective"], dataset_size=int(loader.num_samples),
                         steps_per_epoch=int(loader.num_batches), total_steps=int(loader.num_batches) * args.epochs,
                         embed_dim=int(open_clip.get_model_config(args.model)["embed_dim"]),
                         local_batch_size=args.batch_size, options=options or None,
                         temperature=ours["temperature"], rho=ours["rho"], device=args.device)
        _load_objective_state(loss, args)
        state["loss"], state["args"] = loss, args
        logging.info(f"amorlip: objective {ours['objective']} ({loss.scheme} temperature scheme) replaces open_clip's loss")
        return loss
    return create_loss


def objective_checkpoint(checkpoint: str) -> str:
    """Where the objective's state of open_clip checkpoint `RUN/checkpoints/epoch_N.pt` lives:
    `RUN/objective/epoch_N.pt` (outside the folder whose files open_clip's `--resume latest` searches)."""
    folder, name = os.path.split(os.path.abspath(checkpoint))
    return os.path.join(os.path.dirname(folder), "objective", name)


def _load_objective_state(loss: Any, args: Any) -> None:
    if not getattr(args, "resume", None):
        return
    import torch

    path = objective_checkpoint(args.resume)
    if os.path.exists(path):
        loss.load_state_dict(torch.load(path, map_location=args.device, weights_only=False))
        logging.info(f"amorlip: objective state resumed from {path}")
    else:
        logging.warning(f"amorlip: {path} not found: the objective's state starts afresh")


def _saving_epochs(train_one_epoch: Callable, state: dict[str, Any]) -> Callable:
    """train_one_epoch, then the objective's state beside the checkpoint open_clip is about to write."""
    def wrapped(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **k):
        """Collective: every rank calls this together (open_clip's training epoch)."""
        out = train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **k)
        done = epoch + 1
        if args.save_logs:
            import torch

            names = []
            if done == args.epochs or (args.save_frequency > 0 and done % args.save_frequency == 0):
                names.append(f"epoch_{done}.pt")
            if args.save_most_recent:
                names.append("epoch_latest.pt")
            for name in names:
                path = objective_checkpoint(os.path.join(args.checkpoint_path, name))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save(loss.state_dict(), path)
        return out
    return wrapped


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"amorlip.open_clip_train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
