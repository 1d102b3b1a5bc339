"""`amorlip bench amortizer`: can AmorLIP's lambda nets learn log Z? Stage I alone on a trained model's frozen features.

The encoders are frozen (any run's checkpoint, `--run`), so log Z(u) = log (1/N) sum_j exp(s u . v_j) over all N
training pairs is a fixed function that can be computed exactly. Stage I (`AmorLIPObjective.amortize`, the
training code itself: `t_lambda` Adam steps of the l2-log loss on each batch's own log partitions, the EMA target
net every `t_target` steps) then runs alone for up to max(--steps) calls, and at each listed count the R2 of the
online and the EMA target nets against the exact log Z is measured on the training pairs and on held-out pairs
(1: the nets follow the per-sample spread of log Z; 0: no better than a constant). Every combination of --arch,
--dim-factor, --lr, --batch, --reinit-every and --targets is one row:

* `--reinit-every K`: re-initialise the nets every K Stage-I calls (fresh online and target nets, fresh Adam:
  Algorithm 1 line 4, which training does at each epoch start); 0 = never. One epoch holds N / (B t_online)
  calls: CC3M at batch 1,024 with t_online 8 gives 277, CC12M at 2,048 with t_online 1 gives 3,935.
* `--targets batch` (what AmorLIP trains on) | `exact` (the exact log Z of the batch's samples: the nets'
  capacity, without the noise and the Jensen gap of a batch estimate).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from amorlip.bench.common import split_list, write_json
from amorlip.config import ConfigError
from amorlip.evaluate.features import FrozenFeatures, exact_log_z, r2_score
from amorlip.objectives.amorlip import AmorConfig, AmorLIPObjective
from amorlip.objectives.base import ObjectiveContext
from amorlip.report import format_table

DEFAULT_STEPS = "100,300,1000,3000,10000,20000"


@dataclass(frozen=True)
class Setting:
    arch: str
    dim_factor: float
    lr: float
    batch: int
    reinit_every: int
    targets: str

    def label(self) -> str:
        reinit = "never" if self.reinit_every == 0 else str(self.reinit_every)
        return (f"{self.arch} f_d={self.dim_factor:g} lr={self.lr:g} B={self.batch} reinit={reinit} "
                f"targets={self.targets}")


class ExactTargets(AmorLIPObjective):
    """Stage I regressing the exact log Z of the batch's samples (set in `batch_targets` before each call)."""

    batch_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def _targets(self, image_features, text_features, scale, bias, beta):
        zi, zt = self.batch_targets
        return {"z_image": zi, "z_text": zt, "target_image": zi, "target_text": zt}


def _objective(setting: Setting, feats: FrozenFeatures, t_lambda: int, t_target: int, alpha: float, seed: int):
    cfg = AmorConfig(arch=setting.arch, dim_factor=setting.dim_factor, lr=setting.lr, t_online=1,
                     t_lambda=t_lambda, t_target=t_target, alpha=alpha, pos_coef=1.0, loss="l2-log")
    n = feats.image.shape[0]
    ctx = ObjectiveContext(dataset_size=n, steps_per_epoch=max(1, n // setting.batch), total_steps=1,
                           total_epochs=1, embed_dim=feats.image.shape[1], local_batch_size=setting.batch)
    torch.manual_seed(seed)
    cls = ExactTargets if setting.targets == "exact" else AmorLIPObjective
    return cls(cfg, ctx)


def _scores(obj, feats: FrozenFeatures, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    s = torch.tensor(feats.scale)
    out = {}
    splits = [("train", feats.image, feats.text)]
    if feats.heldout_image is not None:
        splits.append(("heldout", feats.heldout_image, feats.heldout_text))
    idx = torch.zeros(1, dtype=torch.long)
    for net in ("online", "target"):
        for split, x, y in splits:
            est = obj.estimate_log_normalizers(x, y, s, idx, net=net)
            for mod in ("image", "text"):
                r2, bias = r2_score(est[mod], truth[f"{split}_{mod}"])
                out[f"{net}/{split}/{mod}_r2"] = r2
                out[f"{net}/{split}/{mod}_bias"] = bias
    return out


def stage1_curve(setting: Setting, feats: FrozenFeatures, truth: dict[str, torch.Tensor], steps: list[int],
                 t_lambda: int = 3, t_target: int = 2, alpha: float = 0.92, seed: int = 0) -> list[dict[str, Any]]:
    """Run Stage I alone for max(steps) calls under `setting`; one record per listed count with the online and
    target nets' R2 and bias per split (train, heldout) and modality (`_scores`)."""
    obj = _objective(setting, feats, t_lambda, t_target, alpha, seed)
    n = feats.image.shape[0]
    b = min(setting.batch, n)
    s = torch.tensor(feats.scale)
    gen = torch.Generator().manual_seed(seed + 1)
    order, pos, records, epoch = torch.randperm(n, generator=gen), 0, [], 0
    want = sorted(set(steps))
    for k in range(1, want[-1] + 1):
        if setting.reinit_every and k > 1 and (k - 1) % setting.reinit_every == 0:
            epoch += 1
            obj._reinitialise(epoch)  # Algorithm 1 line 4, as on_epoch_start does (no previous-epoch mixing here)
        if pos + b > n:
            order, pos = torch.randperm(n, generator=gen), 0
        batch = order[pos:pos + b]
        pos += b
        if setting.targets == "exact":
            obj.batch_targets = (truth["train_image"][batch].float(), truth["train_text"][batch].float())
        obj.amortize(feats.image[batch], feats.text[batch], s, None, beta=0.0)
        if k % t_target == 0:
            obj.update_target()
        if k in want:
            since = (k - 1) % setting.reinit_every + 1 if setting.reinit_every else k
            records.append({"steps": k, "since_reinit": since, **_scores(obj, feats, truth)})
    return records


def steps_to(records: list[dict[str, Any]], key: str, level: float = 0.5) -> int | None:
    """The first listed step count at which `key` (or, for `NET/SPLIT/r2`, the mean of its image and text R2)
    reaches `level` (None: never)."""
    for r in records:
        if _value(r, key) >= level:
            return int(r["steps"])
    return None


def _value(record: dict[str, Any], key: str) -> float:
    if key in record:
        return record[key]
    prefix = key.removesuffix("r2")
    return (record[prefix + "image_r2"] + record[prefix + "text_r2"]) / 2


def _settings(opts) -> list[Setting]:
    archs = split_list(opts.arch)
    for a in archs:
        if a not in ("mlp", "residual"):
            raise ConfigError(f"--arch {a!r} is not one of: mlp, residual")
    targets = split_list(opts.targets)
    for t in targets:
        if t not in ("batch", "exact"):
            raise ConfigError(f"--targets {t!r} is not one of: batch, exact")
    grid = itertools.product(archs, split_list(opts.dim_factor, float), split_list(opts.lr, float),
                             split_list(opts.batch, int), split_list(opts.reinit_every, int), targets)
    settings = [Setting(*g) for g in grid]
    if not settings:
        raise ConfigError("the grid is empty (each of --arch, --dim-factor, --lr, --batch, --reinit-every, "
                          "--targets needs a value)")
    for st in settings:
        if st.batch < 2 or st.dim_factor <= 0 or st.lr <= 0 or st.reinit_every < 0:
            raise ConfigError(f"bad setting {st.label()}: --batch >= 2, --dim-factor > 0, --lr > 0, "
                              "--reinit-every >= 0")
    return settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amorlip bench amortizer", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog="docs/findings.md has the measured tables and the commands.", allow_abbrev=False)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--run", required=True, help="run folder or training checkpoint whose model gives the features")
    p.add_argument("--pairs", type=int, help="training pairs to encode (default: all; log Z is then exact)")
    p.add_argument("--heldout", type=int, default=2000, help="held-out pairs (default 2000; 0: none)")
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"Stage-I call counts to score at (default {DEFAULT_STEPS})")
    p.add_argument("--arch", default="mlp", help="comma-separated: mlp, residual (default mlp)")
    p.add_argument("--dim-factor", default="0.5", help="comma-separated f_d values (default 0.5)")
    p.add_argument("--lr", default="1e-3", help="comma-separated Adam learning rates (default 1e-3)")
    p.add_argument("--batch", default="64", help="comma-separated Stage-I batch sizes (default 64)")
    p.add_argument("--reinit-every", default="0", help="comma-separated: re-initialise every K calls; 0 = never")
    p.add_argument("--targets", default="batch", help="comma-separated: batch (AmorLIP's), exact (default batch)")
    p.add_argument("--t-lambda", type=int, default=3, help="Adam steps per Stage-I call (amor.t_lambda; default 3)")
    p.add_argument("--t-target", type=int, default=2, help="EMA update every this many calls (default 2)")
    p.add_argument("--alpha", type=float, default=0.92, help="EMA decay of the target net (default 0.92)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nets and the batches (default 0)")
    return p


def run(extra: list[str]) -> dict[str, Any]:
    opts, unknown = parser().parse_known_args(extra)
    if unknown:
        raise ConfigError(f"unknown option(s) {' '.join(unknown)} (see `amorlip bench amortizer --help`)")
    steps = split_list(opts.steps, int)
    if not steps or min(steps) < 1:
        raise ConfigError("--steps needs positive counts, e.g. 100,1000")
    settings = _settings(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from amorlip.evaluate.cli import load_run_features

    t0 = time.perf_counter()
    feats = load_run_features(opts.run, opts.pairs, opts.heldout, opts.device,
                              progress=not opts.no_progress and sys.stderr.isatty())
    truth = exact_log_z(feats)
    print(f"bench amortizer: {feats.describe()} (step {feats.step}); features and exact log Z in "
          f"{time.perf_counter() - t0:.0f} s")
    results = []
    for st in settings:
        t1 = time.perf_counter()
        records = stage1_curve(st, feats, truth, steps, opts.t_lambda, opts.t_target, opts.alpha, opts.seed)
        results.append({"setting": st.__dict__ | {"label": st.label()}, "records": records,
                        "seconds": time.perf_counter() - t1})
        if not opts.no_progress:
            print(f"  {st.label()}: {time.perf_counter() - t1:.0f} s", flush=True)
    table = summary_table(results, steps)
    print(table)
    out = {"command": "amortizer", "run": opts.run, "features": feats.describe(), "step": feats.step,
           "t_lambda": opts.t_lambda, "t_target": opts.t_target, "alpha": opts.alpha, "results": results,
           "table": table}
    write_json(opts.json, out)
    return out


def summary_table(results: list[dict[str, Any]], steps: list[int]) -> str:
    """A row per setting and net: mean R2 over the modalities (train / held-out) at each step count, and the
    first count reaching R2 0.5 on the training pairs."""
    headers = ["setting", "net", *[f"R2@{k}" for k in sorted(set(steps))], "steps to R2 0.5"]
    rows = []
    for res in results:
        recs = res["records"]
        for net in ("online", "target"):
            cells = []
            for r in recs:
                cell = f"{_value(r, f'{net}/train/r2'):.2f}"
                if f"{net}/heldout/image_r2" in r:
                    cell += f" / {_value(r, f'{net}/heldout/r2'):.2f}"
                cells.append(cell)
            hit = steps_to(recs, f"{net}/train/r2")
            rows.append([res["setting"]["label"], net, *cells, "never" if hit is None else str(hit)])
    return format_table(headers, rows) + "\n(R2 train / held-out, mean of image and text; 1 = follows log Z per sample)"
