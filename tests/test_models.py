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


def test_what_the_tiny_configs_support_for_locking():
    """ViT towers lock by groups (stem, blocks but the last, last block + norm, projection); a ResNet image tower
    only as a whole; open_clip's text transformer by the same kind of groups."""
    from amorlip.models import lock_groups, tower_kinds

    assert tower_kinds("micro-vit") == ("vit", "transformer") and lock_groups("micro-vit") == (3, 3)
    assert tower_kinds("tiny-vit") == ("vit", "transformer") and lock_groups("tiny-vit") == (4, 4)
    assert tower_kinds("tiny-rn") == ("resnet", "transformer") and lock_groups("tiny-rn") == (0, 4)


def test_locked_resnet_tower_freezes_its_batch_norm_statistics():
    from open_clip.utils import FrozenBatchNorm2d

    from amorlip.config import build_config
    from amorlip.models import build_model

    cfg = build_config(None, [("model.name", "tiny-rn"), ("model.lock_image", "true"),
                              ("model.lock_image_freeze_bn_stats", "true"), ("model.grad_checkpointing", "true")])
    model, *_ = build_model(cfg.model)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.visual.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
    assert model.transformer.grad_checkpointing  # (open_clip's ResNet tower has no checkpointing: text only)


def test_pure_bf16_model_takes_fp32_images():
    from amorlip.config import build_config
    from amorlip.models import build_model

    cfg = build_config(None, [("model.name", "micro-vit"), ("model.precision", "pure_bf16")])
    model, *_ = build_model(cfg.model, output_dict=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(torch.randn(2, 3, 16, 16), torch.randint(1, 100, (2, 16)))
    assert out["image_features"].dtype == torch.bfloat16 and out["text_features"].dtype == torch.bfloat16
