"""`amorlip bench`: the harness (not timing). Every command runs at toy size on the CPU; the checks are on
what the harness must get right: a row per variant, JSON written, counts, step bookkeeping, memory accounting
against known allocations, FLOPs against an independent count."""
import json

import pytest
import torch

from amorlip.bench import run_command
from amorlip.bench.common import BenchStream, StepHooks, block_length, build_variants, cpu_tensor_peak
from amorlip.cli import main
from amorlip.config import ConfigError, build_config
from amorlip.stats import block_means, paired_stats

MICRO = ["--model", "micro-vit", "--batch-size", "8", "--no-progress"]


# ---------------------------------------------------------------------------------------------------
# Pieces


def test_block_stats_pair_blocks_and_amortize_periodic_cost():
    # a variant 10% slower on ordinary steps, with an expensive step every 4: the block mean amortizes it
    ref = [1.0] * 8
    slow = [1.1, 1.1, 1.1, 2.1] * 2
    assert block_means(slow, 4) == pytest.approx([1.35, 1.35])
    stats = paired_stats({"ref": ref, "x": slow}, "ref", 4)
    assert stats["x"].ratio == pytest.approx(1.35)
    assert stats["x"].delta_pct == pytest.approx(35.0)
    assert stats["ref"].ratio == pytest.approx(1.0) and stats["ref"].blocks == 2
    # blocks of one step (the per-step median ratio) would hide the periodic cost; blocks of its period do not
    per_step = paired_stats({"ref": ref, "x": slow}, "ref", 1)
    assert per_step["x"].ratio == pytest.approx(1.1) and per_step["x"].blocks == 8


def test_variants_expand_amorlip_sweeps_and_block_is_lcm(tmp_path):
    class Opts:
        objectives = "clip,amorlip,amorlip[amor.t_online=4]"
        t_online = "1,8"
        dim_factor = "0.5,1.0"
        config = None

    vs = build_variants(Opts, [("train.log_every", "10")], 5, str(tmp_path))
    labels = [v.label for v in vs]
    assert labels[0] == "clip" and vs[0].is_reference
    assert labels[1:5] == ["amorlip T=1 fd=0.5", "amorlip T=1 fd=1", "amorlip T=8 fd=0.5", "amorlip T=8 fd=1"]
    # an entry's own override wins over that sweep (the other sweep still applies)
    assert labels[5:] == ["amorlip[amor.t_online=4] fd=0.5", "amorlip[amor.t_online=4] fd=1"]
    assert vs[5].cfg.sections["amor"].t_online == 4 and vs[5].cfg.sections["amor"].dim_factor == 0.5
    assert vs[3].cfg.sections["amor"].t_online == 8 and vs[4].cfg.sections["amor"].dim_factor == 1.0
    assert all(v.cfg.train.steps == 5 and not v.cfg.eval.zeroshot for v in vs)
    # lcm(t_online 1, 8, 4, t_target 2, log_every 10) = 40, capped by what fits in the steps
    assert block_length([v.cfg for v in vs], 1000) == 40
    assert block_length([v.cfg for v in vs], 20) == 8


def test_bench_stream_feeds_the_real_trainer_and_sees_every_step(tmp_path):
    """The trainer runs on pre-made batches; hooks fire around every step, also the last one."""
    from amorlip.bench.common import bench_overrides, run_training

    class Record(StepHooks):
        def __init__(self):
            self.events = []

        def before(self, step):
            self.events.append(("before", step))

        def after(self, step):
            self.events.append(("after", step))

    cfg = build_config(None, [("model.name", "micro-vit"), ("train.batch_size", "8"),
                              *bench_overrides(5, str(tmp_path), "s")])
    hooks = Record()
    stream = BenchStream(8, 24, hooks=hooks)  # 3 steps per epoch: an epoch boundary inside the run
    run_training(cfg, stream)
    assert hooks.events == [(k, s) for s in range(5) for k in ("before", "after")]
    transform, tokenizer = (lambda im: torch.zeros(3, 16, 16)), (lambda texts: torch.ones(len(texts), 5))
    batch = next(iter(BenchStream(8, 24).iterate(1, 2, transform, tokenizer)))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["text"].shape == (8, 5)
    assert batch["index"].tolist() == list(range(16, 24))  # epoch 1, batch 2: positions [16, 24)


def test_cpu_tensor_peak_matches_known_allocations():
    def work():
        a = torch.empty(1000, 1000)  # 4,000,000 bytes
        b = torch.empty(500, 1000)  # 2,000,000 bytes, alive together with a
        del a, b
        c = torch.empty(250, 1000)  # 1,000,000 bytes after both are freed
        del c

    assert cpu_tensor_peak(work) == 6_000_000


# ---------------------------------------------------------------------------------------------------
# The six commands


@pytest.mark.slow
def test_overhead_rows_json_and_memory(tmp_path):
    out_path = tmp_path / "overhead.json"
    out = run_command("overhead", [*MICRO, "--objectives", "clip,amorlip", "--t-online", "2", "--steps", "4",
                                   "--warmup", "1", "--block", "2", "--json", str(out_path)])
    assert json.loads(out_path.read_text())["command"] == "overhead"
    rows = {r["label"]: r for r in out["variants"]}
    assert list(rows) == ["clip", "amorlip T=2"]
    assert rows["clip"]["reference"] and rows["amorlip T=2"]["amor"]["t_online"] == 2
    peak = "cuda_peak" if torch.cuda.is_available() else "tensor_peak"  # the device the bench picked
    for r in rows.values():
        assert len(r["step_times_s"]) == 4 and r["blocks"] == 2 and r["step_ms_median"] > 0
        assert r[peak] > 0 and r["rss_growth"] is not None
        assert len(r["paired_ratios"]) == 2
    assert len(out["table"].splitlines()) == 2 + 2  # header, rule, one row per variant
    # AmorLIP allocates its amortization nets and their Adam state on top of CLIP's tensors
    assert rows["amorlip T=2"][peak] > 0.9 * rows["clip"][peak]


def test_loss_rows_and_memory_floor(tmp_path):
    out = run_command("loss", ["--batch-size", "64", "--dim", "16", "--steps", "2", "--warmup", "0", "--no-progress",
                               "--objectives", "clip,siglip,sogclr,fastclip,amorlip,neuclip", "--json",
                               str(tmp_path / "loss.json")])
    labels = [r["label"] for r in out["objectives"]]
    assert labels == ["floor: s X Y^T", "clip", "siglip", "sogclr", "fastclip", "amorlip", "neuclip"]
    rows = {r["label"]: r for r in out["objectives"]}
    matrix = 64 * 64 * 4
    assert out["matrix_bytes"] == matrix
    # the floor holds the B x B logits; CLIP holds both directions' logits at once
    assert rows["floor: s X Y^T"]["peak_bytes"] >= matrix
    assert rows["clip"]["peak_bytes"] >= 2 * matrix
    assert rows["floor: s X Y^T"]["x_floor_time"] == pytest.approx(1.0)
    assert rows["sogclr"]["state_bytes"] == 640 * (4 + 4 + 1)  # log u, log v (fp32), visited (bool)
    assert (tmp_path / "loss.json").is_file()


@pytest.mark.slow
def test_comm_counts_gathers_per_step(tmp_path):
    out = run_command("comm", [*MICRO, "--objectives", "clip,amorlip", "--t-online", "2", "--steps", "4",
                               "--warmup", "0", "--json", str(tmp_path / "comm.json")])
    rows = {r["label"]: r for r in out["variants"]}
    clip, amor = rows["clip"], rows["amorlip T=2"]
    assert clip["totals"]["all_gather_grad"] == 8 and clip["totals"]["all_gather"] == 0  # 2 per step
    # AmorLIP T_online=2 over 4 steps: Stage I at steps 0 and 2, one gather each, t_lambda=3 all-reduces each
    assert amor["totals"] == {"all_gather_grad": 0, "all_gather": 2, "all_reduce": 6, "broadcast": 0}
    assert amor["gather_steps"] == [0, 2]
    assert amor["gather_bytes_vs_reference"] == pytest.approx(0.5)  # 1 / T_online of CLIP's feature payload
    assert all(r["ranks_agree"] for r in rows.values())
    assert clip["ddp_buckets_per_step"] >= 1 and clip["ddp_bytes_per_step"] > 0
    assert json.loads((tmp_path / "comm.json").read_text())["world_size"] == 2


def test_data_rows_per_worker_count(tmp_path):
    out = run_command("data", [*MICRO, "--n", "48", "--workers", "0,1", "--batches", "3", "--model-steps", "2",
                               "--json", str(tmp_path / "data.json")])
    assert [r["workers"] for r in out["loader"]] == [0, 1]
    assert all(r["samples_per_s"] > 0 and r["batches"] == 3 and r["vs_model"] > 0 for r in out["loader"])
    assert out["model_step"]["samples_per_s"] > 0 and out["shards"] >= 2


def micro_vit_step_flops(image_size, context_length, batch):
    """micro-vit's forward + backward FLOPs by hand (2 per multiply-add): one layer of width 32 per tower costs
    24 n d^2 (qkv, output projection, 4x MLP) + 4 n^2 d (scores, weighted values) for n tokens; the 4 px patch
    embedding 2 P (3 * 16) d for P patches; the two projections to 32 dims 2 d e each on the pooled token.
    Backward is twice the forward, less the patch embedding's input gradient (images need none)."""
    d = e = 32
    patches = (image_size // 4) ** 2

    def layer(n):
        return 24 * n * d * d + 4 * n * n * d

    patch_embed = 2 * patches * 3 * 16 * d
    forward = layer(patches + 1) + layer(context_length) + patch_embed + 2 * (2 * d * e)
    return batch * (3 * forward - patch_embed)


def test_flops_per_resolution_phase(tmp_path):
    out = run_command("flops", [*MICRO, "--resolution.phases", "[[0.9, 8, 8], [0.1, 16]]", "--steps", "1",
                                "--warmup", "1", "--json", str(tmp_path / "flops.json")])
    phases = out["phases"]
    assert [(p["phase"], p["image_size"], p["context_length"]) for p in phases] == [(1, 8, 8), (2, 16, 16)]
    assert phases[0]["flops_per_step"] < phases[1]["flops_per_step"]
    for p in phases:
        # the encoders' count equals the transformer FLOPs written out by hand; the full step adds the loss
        enc = micro_vit_step_flops(p["image_size"], p["context_length"], 8)
        assert p["model_flops_per_step"] == enc
        assert 0.9 * enc < p["flops_per_step"] < 1.5 * enc
    s = out["schedule"]["clip"]
    assert s["steps"] == [540, 60] and 0 < s["flops_vs_native"] < 1


@pytest.mark.slow  # two fresh trainer processes, one after the other (~10-25 s)
def test_throughput_against_open_clip(tmp_path):
    from amorlip.bench.throughput import open_clip_available

    reason = open_clip_available()
    if reason:
        pytest.skip(reason)
    out = run_command("throughput", [*MICRO, "--steps", "4", "--warmup", "1", "--repeats", "1", "--data", "synthetic",
                                     "--json", str(tmp_path / "tp.json")])
    pair = out["pairs"][0]
    assert pair["ours"]["steps_measured"] == 3 and pair["open_clip"]["steps_measured"] == 3
    assert pair["ours"]["samples_per_s"] > 0 and pair["open_clip"]["samples_per_s"] > 0
    assert out["ratio"] == pytest.approx(pair["ours"]["samples_per_s"] / pair["open_clip"]["samples_per_s"])
    assert out["cpu_ratio"] == pytest.approx(pair["ours"]["samples_per_cpu_s"] / pair["open_clip"]["samples_per_cpu_s"])
    assert 0 < pair["ours"]["cpu_ms_per_step"] <= 1.5 * pair["ours"]["step_ms_mean"]  # one thread: CPU <= wall


def test_cli_dispatch_and_clear_errors(capsys):
    assert main(["bench", "loss", "--batch-size", "16", "--dim", "8", "--steps", "1", "--warmup", "0",
                 "--objectives", "clip", "--no-progress"]) == 0
    assert "floor: s X Y^T" in capsys.readouterr().out
    assert main(["bench", "overhead", "--objectives", "nosuch"]) == 2
    assert "unknown objective" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="override"):
        run_command("loss", ["stray"])


def test_cpu_tensor_peak_is_per_session():
    """Tensors an earlier profiled call allocated and that were freed outside the profiler do not count."""
    keep = []
    cpu_tensor_peak(lambda: keep.append(torch.empty(1000, 1000)))
    keep.clear()
    assert cpu_tensor_peak(lambda: torch.empty(500, 1000)) == 2_000_000


@pytest.mark.slow
def test_memory_loss_tiled_vs_dense_and_accum_steps(tmp_path):
    out = run_command("memory", [*MICRO, "--threads", "1", "--objectives", "clip,amorlip,sogclr",
                                 "--batch-sizes", "24,48", "--dim", "8", "--tile-size", "8", "--repeats", "1",
                                 "--accum", "1,2", "--steps", "2", "--warmup", "0", "--budget-mb", "64",
                                 "--json", str(tmp_path / "memory.json")])
    assert json.loads((tmp_path / "memory.json").read_text())["command"] == "memory"
    rows = {(r["objective"], r["batch"], r["mode"]): r for r in out["loss"]}
    assert set(rows) == {(o, b, m) for o in ("clip", "amorlip", "sogclr") for b in (24, 48) for m in ("dense", "tiled")}
    for o in ("clip", "amorlip", "sogclr"):
        assert rows[(o, 48, "tiled")]["tile_rows"] == 8 and rows[(o, 48, "dense")]["tile_rows"] == 0
        # the dense loss holds several B x B matrices, the tiled one a few strips of 8 rows
        assert rows[(o, 48, "tiled")]["peak_bytes"] < rows[(o, 48, "dense")]["peak_bytes"]
        assert rows[(o, 48, "dense")]["x_matrix"] >= 1.0
    assert rows[("clip", 48, "dense")]["time_ratio"] == pytest.approx(1.0)
    budget = {(f["objective"], f["mode"]): f for f in out["loss_budget"]}
    assert budget[("clip", "tiled")]["scaling"] == "B" and budget[("clip", "dense")]["scaling"] == "B^2"
    assert budget[("clip", "dense")]["largest_measured"] == 48
    step = out["step"]
    assert [r["accum_steps"] for r in step["rows"]] == [1, 2] and step["batch_size"] == 8
    assert [r["micro_batch"] for r in step["rows"]] == [8, 4]
    assert step["rows"][0]["time_ratio"] == pytest.approx(1.0)
    assert all(r["peak_bytes"] and r["step_ms_median"] > 0 and len(r["step_times_s"]) == 2 for r in step["rows"])
    with pytest.raises(ConfigError, match="accum"):
        run_command("memory", [*MICRO, "--skip-loss", "--accum", "3"])


def test_throughput_ratio_spread():
    from amorlip.bench.throughput import ratio_spread

    assert ratio_spread([1.2]) == {"min": 1.2, "q1": 1.2, "median": 1.2, "q3": 1.2, "max": 1.2}
    s = ratio_spread([0.9, 1.0, 1.1, 1.3, 1.5])
    assert (s["min"], s["q1"], s["median"], s["q3"], s["max"]) == pytest.approx((0.9, 1.0, 1.1, 1.3, 1.5))
