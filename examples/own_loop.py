"""Train a tiny open_clip model with any amorlip objective in a plain PyTorch loop (docs/api.md).

    python examples/own_loop.py --objective amorlip --steps 50

With the same settings and seed it gives the weights `amorlip train --config tiny-clip --objective OBJ` gives
(tests/test_own_loop.py): same data order, initialisation, AdamW groups, warm-up + cosine lr, clipping and clamp.
"""
import argparse
import math

import open_clip
import torch

import amorlip
from amorlip.data import SyntheticScenes
from amorlip.data.mapstyle import MapStream
from amorlip.objectives import get


def main(argv=None):
    p = argparse.ArgumentParser(description="a plain PyTorch + open_clip loop with an amorlip objective")
    for flag, default in (("--objective", "amorlip"), ("--model", "tiny-vit"), ("--steps", 50), ("--batch-size", 64),
                          ("--dataset-size", 2000), ("--lr", 2e-3), ("--warmup", 5), ("--seed", 0), ("--out", "")):
        p.add_argument(flag, type=type(default), default=default)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = MapStream(SyntheticScenes(args.dataset_size, seed=args.seed), args.batch_size, args.seed)  # embedded data
    amorlip.register_tiny_configs()  # tiny-vit & co. for open_clip
    model, preprocess, _ = open_clip.create_model_and_transforms(
        args.model, output_dict=True, **get(args.objective).model_overrides)  # SigLIP: its scale and bias init
    tokenizer = open_clip.get_tokenizer(args.model)
    loss_fn = amorlip.make_loss(args.objective, dataset_size=data.dataset_size, steps_per_epoch=data.steps_per_epoch,
                                total_steps=args.steps, embed_dim=open_clip.get_model_config(args.model)["embed_dim"],
                                local_batch_size=args.batch_size)
    no_decay = ("bn", "ln", "bias", "embedding", "positional", "logit_")  # open_clip's exclusions
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if p.ndim >= 2 and not any(k in n for k in no_decay)], "weight_decay": 0.1},
              {"params": [p for n, p in params if p.ndim < 2 or any(k in n for k in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)

    def lr_at(step):  # linear warm-up, then cosine to 0
        if step < args.warmup:
            return args.lr * ((step + 1) / args.warmup)
        return args.lr * (0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup)))))

    model.train()
    step = 0
    while step < args.steps:
        for batch in data.iterate(step // data.steps_per_epoch, 0, preprocess, tokenizer):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(**model(batch["image"], batch["text"]), indices=batch["index"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            if step % 10 == 0 or step == args.steps:
                print(f"step {step}/{args.steps} loss {loss.item():.4f}")
            if step == args.steps:
                break
    if args.out:
        torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict()}, args.out)
    return model


if __name__ == "__main__":
    main()
