"""Schedules: the param groups' learning rates (the temperature's own schedule and step_thresh), rho in the presets."""
import math

import pytest

from amorlip.config import OptimConfig, build_config
from amorlip.schedules import (
    STEP_THRESH_TEMPERATURE,
    param_group_lr,
    rho_at,
    step_thresh_hit,
    temperature_lr_schedule,
    warmup_cosine_lr,
    watch_temperature,
)

TOTAL = 100
ENC = {"group": "decay", "base_lr": 1e-3}
TEMP = {"group": "temperature", "base_lr": 2e-4}


def cosine(step, warmup=10, total=TOTAL):
    """Warm-up + cosine factor written out independently of schedules.warmup_cosine_lr."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_warmup_cosine_factor():
    for step in (0, 4, 9, 10, 37, 55, 99, 100):
        assert warmup_cosine_lr(step, 1.0, 10, TOTAL) == pytest.approx(cosine(step), abs=1e-15)


@pytest.mark.parametrize("schedule", [None, "const", "same-as-lr"])
def test_temperature_group_lr_at_chosen_steps(schedule):
    optim = OptimConfig(lr=1e-3, warmup_steps=10, lr_temperature=2e-4, lr_temperature_schedule=schedule)
    resolved = "const" if schedule is None else schedule  # a separate lr_temperature: const, as the releases
    for step in (0, 5, 9, 10, 55, 90, 99):
        # the encoders always follow warm-up + cosine
        assert param_group_lr(ENC, step, optim, TOTAL, False) == pytest.approx(1e-3 * cosine(step), rel=1e-12)
        got = param_group_lr(TEMP, step, optim, TOTAL, False)
        want = 2e-4 if resolved == "const" else 2e-4 * cosine(step)
        assert got == pytest.approx(want, rel=1e-12), (schedule, step)
        # step_thresh divides whatever the schedule gives by 3; it never touches the encoders
        assert param_group_lr(TEMP, step, optim, TOTAL, True) == pytest.approx(want / 3, rel=1e-12)
        assert param_group_lr(ENC, step, optim, TOTAL, True) == pytest.approx(1e-3 * cosine(step), rel=1e-12)
    if resolved == "same-as-lr":  # the old behaviour: ~0 at step 0, ~0.02 of the rate at 90% of the run
        assert param_group_lr(TEMP, 0, optim, TOTAL, False) == pytest.approx(2e-4 / 10)
        assert param_group_lr(TEMP, 90, optim, TOTAL, False) / 2e-4 == pytest.approx(cosine(90)) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * 80 / 90)))


def test_temperature_schedule_default_follows_lr_temperature():
    assert temperature_lr_schedule(None, 1e-4) == "const"
    assert temperature_lr_schedule(None, None) == "same-as-lr"  # temperature shares lr: open_clip's schedule
    assert temperature_lr_schedule("same-as-lr", 1e-4) == "same-as-lr"
    assert temperature_lr_schedule("const", None) == "const"
    optim = OptimConfig(lr=1e-3, warmup_steps=10, lr_temperature=None)
    lr_temp_group = {"group": "temperature", "base_lr": 1e-3}
    assert param_group_lr(lr_temp_group, 3, optim, TOTAL, False) == param_group_lr(ENC, 3, optim, TOTAL, False)
    with pytest.raises(ValueError, match="lr_temperature_schedule"):
        temperature_lr_schedule("cosine", 1e-4)


def run_thresh(optim, temperatures):
    """The trainer's use: after each step, read the temperature when watched and update the flag."""
    hit, flags, watched = False, [], []
    for t in temperatures:
        w = watch_temperature(optim, hit)
        watched.append(w)
        if w:
            hit = step_thresh_hit(optim, t, hit)
        flags.append(hit)
    return flags, watched


def test_step_thresh_toggles_both_ways_when_rechecked():
    temps = [0.07, 0.05, 0.03, 0.02, 0.0301, 0.06, 0.029, 0.031]
    recheck = OptimConfig(temperature_step_thresh=True)
    flags, watched = run_thresh(recheck, temps)
    assert flags == [False, False, True, True, False, False, True, False]  # <= 0.03 on, above it off again
    assert all(watched)  # read every step
    assert STEP_THRESH_TEMPERATURE == 0.03

    latch = OptimConfig(temperature_step_thresh=True, temperature_step_thresh_latch=True)
    flags, watched = run_thresh(latch, temps)
    assert flags == [False, False, True, True, True, True, True, True]  # once reached, for good
    assert watched == [True, True, True, False, False, False, False, False]  # no more reads once latched

    off = OptimConfig(temperature_step_thresh=False)
    flags, watched = run_thresh(off, temps)
    assert flags == [False] * len(temps) and not any(watched)
    assert step_thresh_hit(off, 0.01, True) is False

    # the lr follows the flag: const 2e-4, a third of it while the flag is on
    lrs = [param_group_lr(TEMP, 50, recheck, TOTAL, f) for f in run_thresh(recheck, temps)[0]]
    assert lrs == pytest.approx([2e-4 if not f else 2e-4 / 3 for f in run_thresh(recheck, temps)[0]])


def release_epoch_rho(values, epochs):
    """The AmorLIP release's per-epoch split of --rho_list: len(values) parts of epochs // len(values) epochs,
    the last part taking the remainder."""
    part = epochs // len(values)
    out = []
    for i, v in enumerate(values):
        out += [v] * (epochs - part * i if i == len(values) - 1 else part)
    return out


def preset_steps(cfg):
    steps_per_epoch = cfg.data.dataset_size // cfg.train.batch_size  # what the loaders do
    return steps_per_epoch, cfg.train.epochs * steps_per_epoch


def rho(cfg, step, total):
    t = cfg.temperature
    return rho_at(step, total, t.rho, t.rho_final, t.rho_final_fraction)


@pytest.mark.parametrize("name", ["cc12m-vitb32-amorlip-l2log", "cc12m-vitb32-amorlip-fdiv"])
def test_rho_cc12m_presets_switch_for_the_last_third(name):
    cfg = build_config(name)
    spe, total = preset_steps(cfg)
    assert (spe, total) == (3935, 129855)
    switch = 22 * spe  # epochs 22..32: the last third of 33 epochs (App. D)
    for step, want in ((0, 8.5), (43285, 8.5), (switch - 1, 8.5), (switch, -8.5), (total - 1, -8.5)):
        assert rho(cfg, step, total) == want, step


def test_rho_cc12m_release_variant_switches_after_the_first_third():
    cfg = build_config("cc12m-vitb32-amorlip-l2log-rho-release")
    spe, total = preset_steps(cfg)
    per_epoch = release_epoch_rho([8.5, -8.5, -8.5], 33)
    assert per_epoch[10] == 8.5 and per_epoch[11] == -8.5
    for epoch in range(33):  # first and last step of every epoch: the release's value for that epoch
        for step in (epoch * spe, (epoch + 1) * spe - 1):
            assert rho(cfg, step, total) == per_epoch[epoch], (epoch, step)
    assert rho(cfg, 11 * spe - 1, total) == 8.5 and rho(cfg, 11 * spe, total) == -8.5


@pytest.mark.parametrize("name", ["cc3m-rn50-amorlip-l2log", "cc3m-rn50-amorlip-fdiv"])
def test_rho_cc3m_presets_switch_for_the_last_quarter(name):
    cfg = build_config(name)
    spe, total = preset_steps(cfg)
    assert (spe, total) == (2221, 66630)
    switch = total - round(total / 4)  # 49972, mid-epoch 22 (the paper: the last quarter of the epochs)
    assert switch == 49972
    for step, want in ((0, 6.5), (switch - 1, 6.5), (switch, -8.0), (total - 1, -8.0)):
        assert rho(cfg, step, total) == want, step


@pytest.mark.parametrize("name", ["cc3m-rn50-fastclip", "cc12m-vitb32-fastclip", "tiny-fastclip"])
def test_fastclip_presets_keep_rho(name):
    cfg = build_config(name)
    total = 1000
    assert {rho(cfg, s, total) for s in (0, 500, 999)} == {cfg.temperature.rho}


@pytest.mark.parametrize("name", ["cc3m-rn50-amorlip-l2log", "cc12m-vitb32-amorlip-l2log", "cc3m-rn50-fastclip",
                                  "cc12m-vitb32-fastclip", "tiny-fastclip", "tiny-neuclip"])
def test_presets_with_lr_temperature_keep_it_constant(name):
    cfg = build_config(name)
    assert cfg.optim.lr_temperature is not None and cfg.optim.temperature_step_thresh
    assert not cfg.optim.temperature_step_thresh_latch
    assert temperature_lr_schedule(cfg.optim.lr_temperature_schedule, cfg.optim.lr_temperature) == "const"
    group = {"group": "temperature", "base_lr": cfg.optim.lr_temperature}
    for step in (0, cfg.optim.warmup_steps // 2, 10 * cfg.optim.warmup_steps):
        assert param_group_lr(group, step, cfg.optim, 20 * cfg.optim.warmup_steps, False) == cfg.optim.lr_temperature
