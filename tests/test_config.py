"""Config: presets, overrides, validation errors that name the fix."""
import pytest

from amorlip.config import ConfigError, build_config, parse_overrides, preset_names


def test_defaults_and_overrides():
    cfg = build_config(None, [("train.batch-size", "32"), ("optim.lr", "0.01"), ("train.steps", "none"),
                              ("train.epochs", "2"), ("model.compile", "false")])
    assert cfg.train.batch_size == 32 and cfg.optim.lr == 0.01
    assert cfg.train.steps is None and cfg.train.epochs == 2 and cfg.model.compile is False


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        build_config(None, [("train.batchsize", "32")])
    assert "train.batchsize" in str(e.value) and "batch_size" in str(e.value)


def test_unknown_section_and_bad_values():
    with pytest.raises(ConfigError, match="unknown config section"):
        build_config(None, [("trian.steps", "3")])
    with pytest.raises(ConfigError, match="cannot read"):
        build_config(None, [("train.steps", "many")])
    with pytest.raises(ConfigError, match="unknown objective"):
        build_config(None, [("objective", "nope")])
    with pytest.raises(ConfigError, match="train-path"):
        build_config(None, [("data.source", "wds")])
    with pytest.raises(ConfigError, match="at least 2"):
        build_config(None, [("train.batch_size", "1")])


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c.d=2"]) == [("a.b", "1"), ("c.d", "2")]
    with pytest.raises(ConfigError):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError):
        parse_overrides(["stray"])


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    cfg = build_config(name)
    assert cfg.objective
    assert cfg.train.batch_size >= 2


def test_tiny_presets_share_their_resources_and_length():
    """`amorlip compare --objectives tiny-clip,tiny-siglip,...` compares like for like: the same model, batch,
    length, loader processes and torch threads (what differs is the objective and its own settings; the RECLIP
    presets take more steps on purpose, for equal wall-clock time)."""
    tiny = ["tiny-clip", "tiny-siglip", "tiny-sogclr", "tiny-fastclip", "tiny-amorlip", "tiny-neuclip"]
    shared = {n: (c.model.name, c.train.batch_size, c.train.steps, c.data.workers, c.train.threads,
                  c.optim.lr, c.optim.warmup_steps) for n in tiny for c in [build_config(n)]}
    assert set(shared.values()) == {("tiny-vit", 64, 600, 1, 1, 2e-3, 50)}, shared


def test_preset_base_chain(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny-clip\ntrain:\n  steps: 7\n")
    cfg = build_config(str(p))
    assert cfg.train.steps == 7 and cfg.model.name == "tiny-vit"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(str(bad))
    with pytest.raises(ConfigError, match="neither a file nor a built-in preset"):
        build_config(str(tmp_path / "missing.yaml"))


def test_temperature_scheme_auto_resolves_per_objective():
    """`temperature.scheme auto` (the default) is what the objective needs; the saved config holds the result."""
    from amorlip.config import build_config

    assert build_config(None, [("objective", "fastclip")]).temperature.scheme == "rescaled"
    assert build_config(None, [("objective", "fastclip"), ("fastclip.version", "0")]).temperature.scheme == "plain"
    for name in ("clip", "siglip", "sogclr", "amorlip", "neuclip"):
        assert build_config(None, [("objective", name)]).temperature.scheme == "plain", name
    assert build_config(None, [("objective", "fastclip"), ("temperature.scheme", "rescaled")]).to_dict()[
        "temperature"]["scheme"] == "rescaled"
