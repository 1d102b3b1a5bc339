"""open_clip's model-forcing, preprocessing and augmentation options, torch-free: the `aug` config section, the
checks of the `model.force_*` / `model.image_*` keys, and what both become as keyword arguments of
`open_clip.create_model_and_transforms` (`model_kwargs`, `aug_cfg`) and in the open_clip config dict of the model a
run trains (`effective_model_config`, for export and `amorlip eval`).

open_clip_train's `--aug-cfg KEY=VALUE ...` is the `aug` section here: `--aug-cfg scale='(0.4, 1.0)'
color_jitter='(0.4, 0.4, 0.4, 0.1)' color_jitter_prob=0.8 gray_scale_prob=0.2` is `--aug.scale [0.4,1.0]
--aug.color-jitter [0.4,0.4,0.4,0.1] --aug.color-jitter-prob 0.8 --aug.gray-scale-prob 0.2`.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal

from amorlip.config.checks import flag_of
from amorlip.errors import ConfigError

Interpolation = Literal["bicubic", "bilinear", "random"]
ResizeMode = Literal["shortest", "longest", "squash"]
PREPROCESS_KEYS = {"image_mean": "mean", "image_std": "std", "image_interpolation": "interpolation",
                   "image_resize_mode": "resize_mode"}
"""model.KEY -> the key of open_clip's PreprocessCfg (and of a pretrained tag's config)."""


@dataclass
class AugConfig:
    """Training-image augmentation (open_clip's --aug-cfg; the evaluation transform never changes)."""

    scale: list[float] | None = None
    """[min, max] area fraction of the random resized crop (open_clip's default [0.9, 1.0]), e.g. [0.4,1.0]."""
    ratio: list[float] | None = None
    """[min, max] aspect ratio of the crop (aug.use_timm only; timm's default [0.75, 1.333])."""
    color_jitter: list[float] | None = None
    """Color jitter [brightness, contrast, saturation, hue], e.g. [0.4,0.4,0.4,0.1]; needs aug.color_jitter_prob (or aug.use_timm, which takes 1, 3 or 4 values)."""
    color_jitter_prob: float | None = None
    """Probability of applying aug.color_jitter to an image (SimCLR-style, e.g. 0.8)."""
    gray_scale_prob: float | None = None
    """Probability of turning an image gray (SimCLR-style, e.g. 0.2)."""
    re_prob: float | None = None
    """Random-erasing probability (aug.use_timm only)."""
    re_count: int | None = None
    """Random-erasing regions per image (aug.use_timm only)."""
    use_timm: bool = False
    """Build the training transform with timm's create_transform (needs timm) instead of open_clip's own."""

    def validate(self) -> None:
        """Pairs in range, probabilities in [0, 1], and no option that the chosen transform would ignore."""
        _pair("aug.scale", self.scale, "[0.4,1.0]", upper=1.0)
        _pair("aug.ratio", self.ratio, "[0.75,1.333]")
        for key in ("color_jitter_prob", "gray_scale_prob", "re_prob"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise ConfigError(f"aug.{key}={value} must be a probability in [0, 1] (pass e.g. {flag_of('aug.' + key)} "
                                  "0.2, or none)")
        if self.re_count is not None and self.re_count < 1:
            raise ConfigError(f"aug.re_count={self.re_count} must be at least 1 (pass {flag_of('aug.re_count')} 1)")
        jitter = self.color_jitter
        if jitter is not None and (len(jitter) not in (1, 3, 4) or any(not (v >= 0) for v in jitter)):
            raise ConfigError(f"aug.color_jitter={jitter} must be 1, 3 or 4 non-negative values (pass e.g. "
                              "--aug.color-jitter [0.4,0.4,0.4,0.1])")
        if not self.use_timm:
            self._check_open_clip_transform()

    def _check_open_clip_transform(self) -> None:
        """open_clip's own transform reads scale, color_jitter (+ prob, 4 values) and gray_scale_prob only."""
        timm_only = [k for k in ("ratio", "re_prob", "re_count") if getattr(self, k) is not None]
        if timm_only:
            raise ConfigError(f"aug.{timm_only[0]} applies to timm's transform only (pass --aug.use-timm true, or "
                              f"drop {flag_of('aug.' + timm_only[0])})")
        if (self.color_jitter is None) != (not self.color_jitter_prob):
            raise ConfigError("aug.color_jitter and aug.color_jitter_prob go together in open_clip's transform (pass "
                              "both, e.g. --aug.color-jitter [0.4,0.4,0.4,0.1] --aug.color-jitter-prob 0.8)")
        if self.color_jitter is not None and len(self.color_jitter) != 4:
            raise ConfigError(f"aug.color_jitter={self.color_jitter}: open_clip's transform takes 4 values "
                              "[brightness, contrast, saturation, hue] (pass e.g. --aug.color-jitter [0.4,0.4,0.4,0.1])")

    @property
    def enabled(self) -> bool:
        return self != AugConfig()


def _pair(key: str, value: list[float] | None, example: str, upper: float | None = None) -> None:
    if value is None:
        return
    ok = len(value) == 2 and all(math.isfinite(v) and v > 0 for v in value) and value[0] <= value[1]
    if ok and upper is not None:
        ok = value[1] <= upper
    if not ok:
        bound = f" at most {upper:g}" if upper is not None else ""
        raise ConfigError(f"{key}={value} must be [min, max] with 0 < min <= max{bound} (pass e.g. {flag_of(key)} "
                          f"{example})")


def aug_cfg(aug: Any) -> dict[str, Any] | None:
    """The `aug` section as open_clip's aug_cfg (its unset keys left to open_clip's AugmentationCfg defaults);
    None when nothing is set, so the training transform is open_clip's default one."""
    if aug is None or not aug.enabled:
        return None
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in asdict(aug).items() if v is not None}
    if not out.get("use_timm"):
        out.pop("use_timm", None)
    return out


@contextmanager
def used_aug_items() -> Iterator[None]:
    """Silence open_clip's "Unused augmentation cfg items" warning: its own transform uses color_jitter(_prob) and
    gray_scale_prob yet names them unused (it counts only what it pops); `AugConfig.validate` refuses the keys it
    would really ignore."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        yield


def check_model_options(mcfg: Any) -> None:
    """The forcing and preprocessing keys of ModelConfig in range (called by its validate)."""
    size = mcfg.force_image_size
    if size is not None and size < 1:
        raise ConfigError(f"model.force_image_size={size} must be a positive number of pixels (pass e.g. "
                          "--model.force-image-size 224, or none for the model config's size)")
    drop = mcfg.force_patch_dropout
    if drop is not None and not (math.isfinite(drop) and 0 <= drop < 1):
        raise ConfigError(f"model.force_patch_dropout={drop} must be in [0, 1): the fraction of image patches dropped "
                          "in training (pass e.g. --model.force-patch-dropout 0.5, or none)")
    for key in ("image_mean", "image_std"):
        value = getattr(mcfg, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"model.{key}={value} needs 3 values, one per RGB channel (pass e.g. {flag_of('model.' + key)}"
                              " [0.5,0.5,0.5])")
        if key == "image_std" and value is not None and not all(v > 0 for v in value):
            raise ConfigError(f"model.image_std={value} must be positive (pass e.g. --model.image-std [0.5,0.5,0.5])")


def model_kwargs(mcfg: Any) -> dict[str, Any]:
    """The user's forcing and preprocessing options as keyword arguments of open_clip's
    create_model_and_transforms (only those set: they win over a pretrained tag's)."""
    out: dict[str, Any] = {}
    if getattr(mcfg, "force_quick_gelu", False):
        out["force_quick_gelu"] = True
    for key in ("force_image_size", "force_patch_dropout", *PREPROCESS_KEYS):
        value = getattr(mcfg, key, None)
        if value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def tag_preprocess(tag_cfg: dict[str, Any]) -> dict[str, Any]:
    """A pretrained tag's activation and preprocessing, as create_model_and_transforms keywords."""
    out: dict[str, Any] = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    out.update({ours: tag_cfg[theirs] for ours, theirs in PREPROCESS_KEYS.items() if tag_cfg.get(theirs) is not None})
    return out


def effective_model_config(mcfg: Any) -> dict[str, Any]:
    """The open_clip config dict of the model a run trains: model.name's, with the forcing options applied as
    open_clip applies them (quick_gelu, vision_cfg.image_size, vision_cfg.patch_dropout)."""
    from amorlip.model_catalog import model_config

    cfg = model_config(mcfg.name)
    if getattr(mcfg, "force_quick_gelu", False):
        cfg["quick_gelu"] = True
    if getattr(mcfg, "force_image_size", None) is not None:
        cfg["vision_cfg"]["image_size"] = mcfg.force_image_size
    if getattr(mcfg, "force_patch_dropout", None) is not None:
        cfg["vision_cfg"]["patch_dropout"] = mcfg.force_patch_dropout
    return cfg
