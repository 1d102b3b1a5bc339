"""Model construction and parameter groups."""
import math

import pytest
import torch

from amorlip.models import clamp_logit_scale, create_model, model_config, param_groups


def test_param_groups_and_clamp():
    model, *_ = create_model("micro-vit")
    groups = {g["group"]: g for g in param_groups(model, weight_decay=0.2, lr=1e-3, lr_temperature=1e-4)}
    names = {id(p): n for n, p in model.named_parameters()}
    temp = [names[id(p)] for p in groups["temperature"]["params"]]
    assert temp == ["logit_scale"] and groups["temperature"]["lr"] == 1e-4
    assert groups["temperature"]["weight_decay"] == 0.0 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)
    assert any(n.endswith(".bias") for n in no_decay) and any("ln" in n for n in no_decay)
    assert len(decay) + len(no_decay) + len(temp) == len(list(model.parameters()))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        model_config("ViT-Nope")


def test_siglip_overrides_reach_open_clip():
    from amorlip.objectives import get

    model, *_ = create_model("micro-vit", **get("siglip").model_overrides)
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.logit_bias.item() == pytest.approx(-10.0)


def test_random_init_notice_is_not_printed(caplog):
    """open_clip's "No pretrained weights loaded" warning is dropped (pretraining from scratch is the point);
    other warnings still pass."""
    import logging

    with caplog.at_level(logging.WARNING):
        create_model("micro-vit")
        logging.warning("an unrelated warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "an unrelated warning" in messages
    assert not any("No pretrained weights loaded" in m for m in messages)
