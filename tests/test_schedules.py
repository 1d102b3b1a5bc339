"""Schedules: the param groups' learning rates (the temperature's own schedule and step_thresh), rho in the presets."""
import math

import pytest

from amorlip.config import ConfigError, OptimConfig, build_config
from amorlip.schedules import (
    STEP_THRESH_TEMPERATURE,
    lr_factor,
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
    """Warm-up + cosine factor written out independently of schedules.warmup_cosine_lr (flat after `total`)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


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


# optim.lr_scheduler: cosine (the default), const, const-cooldown


@pytest.mark.parametrize("lr_temperature", [None, 2e-4])
def test_default_scheduler_is_warmup_then_cosine_to_zero_at_every_step(lr_temperature):
    optim = OptimConfig(lr=1e-3, warmup_steps=7, lr_temperature=lr_temperature, lr_temperature_schedule="same-as-lr")
    assert optim.lr_scheduler == "cosine" and optim.min_lr == 0.0
    temp = {"group": "temperature", "base_lr": lr_temperature or 1e-3}
    for step in range(0, 64 + 2):
        for group in (ENC, temp):
            for hit in (False, True):
                # the temperature on same-as-lr: the same shape at its own rate, / 3 under step_thresh
                expected = group["base_lr"] * cosine(step, 7, 64) / (3 if group is temp and hit else 1)
                assert param_group_lr(group, step, optim, 64, hit) == pytest.approx(expected, rel=1e-12, abs=1e-18)
    # the shape's landmarks, by hand: the first warm-up step, the peak, mid-decay, the end
    assert param_group_lr(ENC, 0, optim, 64, False) == pytest.approx(ENC["base_lr"] / 7)
    assert param_group_lr(ENC, 7, optim, 64, False) == pytest.approx(ENC["base_lr"])
    assert param_group_lr(ENC, 7 + 57 // 2, optim, 64, False) == pytest.approx(ENC["base_lr"] / 2, rel=0.03)
    assert param_group_lr(ENC, 64, optim, 64, False) == pytest.approx(0.0, abs=1e-15)


def test_cosine_min_lr_is_the_floor():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, min_lr=1e-4)
    lr = [param_group_lr(ENC, s, optim, TOTAL, False) for s in range(TOTAL + 1)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # warm-up from lr / warmup_steps, as before
    assert lr[10] == pytest.approx(1e-3)
    assert lr[55] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 45 / 90)), rel=1e-12)
    assert lr[55] == pytest.approx(5.5e-4)  # half-way through the decay: the mid-point of lr and min_lr
    assert lr[TOTAL] == pytest.approx(1e-4) and min(lr[10:]) == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    # a temperature group following the lr keeps the shape, floor scaled: min_lr / lr of its own rate
    temp = {"group": "temperature", "base_lr": 2e-4}
    same = OptimConfig(lr=1e-3, warmup_steps=10, min_lr=1e-4, lr_temperature=2e-4, lr_temperature_schedule="same-as-lr")
    assert param_group_lr(temp, TOTAL, same, TOTAL, False) == pytest.approx(2e-5)
    assert param_group_lr(temp, 55, same, TOTAL, False) == pytest.approx(2e-4 * lr[55] / 1e-3, rel=1e-12)
    const_temp = OptimConfig(lr=1e-3, warmup_steps=10, min_lr=1e-4, lr_temperature=2e-4)
    assert param_group_lr(temp, TOTAL, const_temp, TOTAL, False) == 2e-4  # const stays const


def test_const_scheduler():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, lr_scheduler="const")
    assert param_group_lr(ENC, 0, optim, TOTAL, False) == pytest.approx(1e-4)
    assert param_group_lr(ENC, 4, optim, TOTAL, False) == pytest.approx(5e-4)
    for step in (9, 10, 50, 99, 100):
        assert param_group_lr(ENC, step, optim, TOTAL, False) == pytest.approx(1e-3, rel=1e-15), step
    no_warmup = OptimConfig(lr=1e-3, warmup_steps=0, lr_scheduler="const")
    assert param_group_lr(ENC, 0, no_warmup, TOTAL, False) == 1e-3
    same = OptimConfig(lr=1e-3, warmup_steps=10, lr_scheduler="const", lr_temperature_schedule="same-as-lr")
    assert param_group_lr(TEMP, 4, same, TOTAL, False) == pytest.approx(2e-4 * 0.5)
    assert param_group_lr(TEMP, 4, same, TOTAL, True) == pytest.approx(2e-4 * 0.5 / 3)


def open_clip_const_cooldown(step, base_lr, warmup, steps, cooldown, power, end):
    """open_clip_train.scheduler.const_lr_cooldown's step function, written out."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    start = steps - cooldown
    if step < start:
        return base_lr
    return (1 - (step - start) / (steps - start)) ** power * (base_lr - end) + end


@pytest.mark.parametrize("power,end", [(1.0, 0.0), (2.0, 0.0), (0.5, 1e-5), (1.0, 2e-4)])
def test_const_cooldown_scheduler(power, end):
    optim = OptimConfig(lr=1e-3, warmup_steps=10, lr_scheduler="const-cooldown", lr_cooldown_steps=20,
                        lr_cooldown_power=power, lr_cooldown_end=end)
    lr = [param_group_lr(ENC, s, optim, TOTAL, False) for s in range(TOTAL + 1)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # warm-up
    assert lr[10] == lr[50] == lr[79] == pytest.approx(1e-3, rel=1e-15)  # constant until the cooldown
    assert lr[80] == pytest.approx(1e-3)  # the cooldown starts at the constant rate, 20 steps before the end
    assert lr[90] == pytest.approx(end + (1e-3 - end) * 0.5 ** power, rel=1e-12)  # half-way: 0.5 ** power
    assert lr[99] == pytest.approx(end + (1e-3 - end) * 0.05 ** power, rel=1e-12)
    assert lr[TOTAL] == pytest.approx(end, abs=1e-18)  # the end rate at the last step
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    for step in range(TOTAL + 1):
        assert lr[step] == pytest.approx(open_clip_const_cooldown(step, 1e-3, 10, TOTAL, 20, power, end), rel=1e-12)


def test_open_clip_scheduler_values_when_installed():
    """Our schedulers against open_clip_train's own functions, where that package is installed."""
    sched = pytest.importorskip("open_clip_train.scheduler")

    class Opt:
        param_groups = [{"lr": 0.0}]

    cases = [
        (OptimConfig(lr=1e-3, warmup_steps=10), sched.cosine_lr(Opt(), 1e-3, 10, TOTAL)),
        (OptimConfig(lr=1e-3, warmup_steps=10, lr_scheduler="const"), sched.const_lr(Opt(), 1e-3, 10, TOTAL)),
        (OptimConfig(lr=1e-3, warmup_steps=10, lr_scheduler="const-cooldown", lr_cooldown_steps=30,
                     lr_cooldown_power=2.0, lr_cooldown_end=1e-5),
         sched.const_lr_cooldown(Opt(), 1e-3, 10, TOTAL, 30, 2.0, 1e-5)),
    ]
    for optim, adjust in cases:
        for step in range(TOTAL):
            assert param_group_lr(ENC, step, optim, TOTAL, False) == pytest.approx(adjust(step), rel=1e-12, abs=1e-18)


def test_cooldown_longer_than_an_epoch_based_run_fails_at_the_first_lr():
    """train.steps unset (epochs): validate cannot know the run's length; the schedule refuses it at step 0."""
    optim = OptimConfig(lr=1e-3, warmup_steps=10, lr_scheduler="const-cooldown", lr_cooldown_steps=95)
    with pytest.raises(ConfigError, match="optim.lr_cooldown_steps=95"):
        lr_factor(0, optim, TOTAL)
    assert lr_factor(0, optim, 200) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.lr_scheduler"):
        lr_factor(0, OptimConfig(lr_scheduler="linear"), TOTAL)


@pytest.mark.parametrize("overrides,key", [
    ([("optim.min_lr", 0.01)], "optim.min_lr"),  # above optim.lr (tiny-clip: 2e-3)
    ([("optim.min_lr", -1e-5)], "optim.min_lr"),
    ([("optim.min_lr", float("nan"))], "optim.min_lr"),
    ([("optim.lr_scheduler", "const"), ("optim.min_lr", 1e-5)], "optim.min_lr"),  # not read by const
    ([("optim.lr_scheduler", "linear")], "optim.lr_scheduler"),
    ([("optim.lr_scheduler", "const-cooldown")], "optim.lr_cooldown_steps"),  # required there
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 0)], "optim.lr_cooldown_steps"),
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", -5)], "optim.lr_cooldown_steps"),
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 600)], "optim.lr_cooldown_steps"),
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 10), ("optim.lr_cooldown_power", 0)],
     "optim.lr_cooldown_power"),
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 10), ("optim.lr_cooldown_power", -1)],
     "optim.lr_cooldown_power"),
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 10), ("optim.lr_cooldown_end", 1.0)],
     "optim.lr_cooldown_end"),
    ([("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 10), ("optim.lr_cooldown_end", -1e-6)],
     "optim.lr_cooldown_end"),
    ([("optim.lr_cooldown_steps", 10)], "optim.lr_cooldown_steps"),  # cosine does not read it
    ([("optim.lr_cooldown_end", 1e-5)], "optim.lr_cooldown_end"),
])
def test_bad_scheduler_values_are_refused_with_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        build_config("tiny-clip", overrides)
    message = str(e.value)
    assert "\n" not in message and key in message, message


def test_scheduler_values_that_fit_are_accepted():
    cfg = build_config("tiny-clip", [("optim.lr_scheduler", "const-cooldown"), ("optim.lr_cooldown_steps", 550),
                                     ("optim.lr_cooldown_power", 2.0), ("optim.lr_cooldown_end", 1e-5)])
    assert (cfg.optim.lr_scheduler, cfg.optim.lr_cooldown_steps) == ("const-cooldown", 550)
    assert build_config("tiny-clip", [("optim.min_lr", 2e-3)]).optim.min_lr == 2e-3  # min_lr = lr: allowed
    assert build_config("tiny-clip", [("optim.lr_scheduler", "const")]).optim.lr_scheduler == "const"
    # an epoch-based run: the length is not known before the data, so only the schedule itself can check it
    epochs = build_config("tiny-clip", [("train.steps", None), ("train.epochs", 1), ("optim.lr_scheduler",
                                        "const-cooldown"), ("optim.lr_cooldown_steps", 10 ** 6)])
    assert epochs.optim.lr_cooldown_steps == 10 ** 6
