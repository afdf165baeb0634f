"""Trainer configurations: a dataclass per trainer whose defaults are its paper's hyper-parameters, presets that
override some of them, and ``--set key=value`` overrides parsed by the field's type."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields

PRESETS = ("quick", "paper")


class ConfigError(ValueError):
    """A setting that does not exist or a value of the wrong type; the message names both."""


@dataclass
class TrainerConfig:
    """Settings every trainer has. A trainer's config subclasses this and adds its paper's hyper-parameters.

    The defaults here are the ``paper`` preset's run settings; :attr:`QUICK` holds what the ``quick`` preset
    changes (sizes and schedules small enough for a laptop CPU)."""

    #: the preset these settings started from (set by from_preset)
    preset: str = "paper"
    seed: int = 0
    device: str = "cpu"
    #: "small-unet", or a torchvision model (see engine.models.MODELS)
    model: str = "small-unet"
    #: encoder widths of the small U-Net
    widths: tuple[int, ...] = (16, 32, 64, 96)
    #: "synthetic" (the pre-training stand-in for ImageNet features, see engine.pretrain), "torchvision" (a
    #: torchvision model's ImageNet backbone from the local hub cache), "none", or a checkpoint path
    pretrained: str = "synthetic"
    #: torch threads (0: torch's default)
    threads: int = 0
    #: "synthetic", "voc:PATH" or "coco:ANNOTATIONS:IMAGES"
    data: str = "synthetic"
    #: seed of the synthetic benchmark (kept apart from the training seed: every training seed sees the same data)
    data_seed: int = 0
    num_classes: int = 6
    image_size: int = 256
    train_images: int = 2000
    val_images: int = 500
    batch_size: int = 16
    workers: int = 0
    log_every: int = 25
    checkpoint_every: int = 200

    #: preset name -> field overrides; subclasses extend it
    PRESET_OVERRIDES: typing.ClassVar[dict[str, dict]] = {"paper": {}, "quick": {}}

    @classmethod
    def from_preset(cls, preset: str, overrides: typing.Sequence[str] = (), **values) -> TrainerConfig:
        """The config of ``preset`` with ``key=value`` strings and keyword values applied (in that order)."""
        if preset not in cls.PRESET_OVERRIDES:
            raise ConfigError(f"preset must be one of {', '.join(cls.PRESET_OVERRIDES)}, got {preset!r}")
        cfg = cls()
        cfg = dataclasses.replace(cfg, preset=preset, **cls.PRESET_OVERRIDES[preset])
        cfg = apply_overrides(cfg, overrides)
        return dataclasses.replace(cfg, **values) if values else cfg

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"  {f.name:<{width}} = {getattr(self, f.name)!r}" for f in fields(self))


def _parse(name: str, kind, text: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):  # Optional[...] and X | None
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse(name, args[0], text)
    if origin in (tuple, list):
        (item, *_) = typing.get_args(kind) or (str,)
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        return tuple(_parse(name, item, p.strip()) for p in parts)
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {name}: expected true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"--set {name}: expected {kind.__name__}, got {text!r}") from None
    return text


def apply_overrides(cfg: TrainerConfig, overrides: typing.Sequence[str]) -> TrainerConfig:
    """``cfg`` with each ``"key=value"`` applied; the value is parsed by the field's type."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in fields(cfg)]
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise ConfigError(
                f"--set {key}: no such setting of {type(cfg).__name__}; the settings are: {', '.join(names)}"
            )
        changes[key] = _parse(key, hints[key], text.strip())
    return dataclasses.replace(cfg, **changes)
