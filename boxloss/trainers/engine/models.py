"""Networks for the reference trainers: a small encoder-decoder that trains on a CPU, and torchvision's models.

The papers start from ImageNet-pretrained ResNet/ResNeXt/VGG backbones; nothing is downloaded here, so the default
network is small enough to train in CPU minutes and its encoder can start from :mod:`.pretrain`'s stand-in features.

Every network maps images (B, 3, H, W) in [0, 1] to a dict of named heads at the input resolution. ``heads`` maps a
head name to its channel count, e.g. ``{"logits": C + 1}`` or Box2Seg's ``{"logits": C + 1, "attention": C,
"embedding": 32}``. :func:`head_outputs` also accepts a user model that returns a tensor (read as ``"logits"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: ImageNet mean/std: the normalisation every network here applies to its [0, 1] input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODELS = ("small-unet", "deeplabv3-resnet101", "deeplabv3-resnet50", "deeplabv3-mobilenet", "lraspp-mobilenet")


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ConvBlock(nn.Sequential):
    """3 x 3 convolution, GroupNorm, ReLU. GroupNorm keeps every image's output independent of its batch, so a
    distributed run equals a single process on the combined batch."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True)
        )


class Encoder(nn.Module):
    """Four stages at strides 2, 4, 8 and 16, each two :class:`ConvBlock`; returns the four feature maps."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 96)):
        super().__init__()
        self.widths = tuple(widths)
        stages, cin = [], in_channels
        for w in self.widths:
            stages.append(nn.Sequential(ConvBlock(cin, w, stride=2), ConvBlock(w, w)))
            cin = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SmallUNet(nn.Module):
    """The default network: :class:`Encoder` plus a U-Net decoder (upsample, concatenate the skip, one
    :class:`ConvBlock`) to stride 2, and one 1 x 1 convolution per head, upsampled bilinearly to the input size.

    Args:
        heads: head name -> output channels.
        in_channels: input channels (3 for images; LPG's generator takes more).
        widths: encoder widths of the four stages.
        normalize: subtract the ImageNet mean and divide by its std from the first three input channels.
        output_stride: 1, the heads at the input size; or 2, at the decoder's own resolution (``ceil(H / 2)`` x
            ``ceil(W / 2)``, not upsampled), where a loss over every pixel costs a quarter (DeepLab computes its loss
            at its output stride). An attribute, so it can be set on a built model.
    """

    def __init__(
        self,
        heads: dict[str, int],
        *,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64, 96),
        normalize: bool = True,
        output_stride: int = 1,
    ):
        super().__init__()
        if not heads:
            raise ValueError("SmallUNet: heads must name at least one output")
        if output_stride not in (1, 2):
            raise ValueError(f"SmallUNet: output_stride must be 1 or 2, got {output_stride!r}")
        self.heads = dict(heads)
        self.normalize = normalize
        self.output_stride = output_stride
        self.encoder = Encoder(in_channels, widths)
        w = list(widths)
        self.decoder = nn.ModuleList(ConvBlock(w[i + 1] + w[i], w[i]) for i in reversed(range(len(w) - 1)))
        self.out = nn.ModuleDict({name: nn.Conv2d(w[0], c, 1) for name, c in self.heads.items()})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        if self.normalize:
            x = torch.cat([(x[:, :3] - self.mean) / self.std, x[:, 3:]], 1)
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
        if self.output_stride == 2:
            return {name: conv(y) for name, conv in self.out.items()}
        return {
            name: F.interpolate(conv(y), size=size, mode="bilinear", align_corners=False)
            for name, conv in self.out.items()
        }


class TorchvisionSegmenter(nn.Module):
    """torchvision's DeepLabV3 or LR-ASPP (``weights=None``, nothing downloaded) with one extra 1 x 1 head per
    additional output, on the same features as the classifier's input."""

    def __init__(self, name: str, heads: dict[str, int], *, imagenet_backbone: bool = False):
        super().__init__()
        from torchvision.models import segmentation as seg

        self.heads = dict(heads)
        first, *rest = self.heads.items()
        builders = {
            "deeplabv3-resnet101": seg.deeplabv3_resnet101,
            "deeplabv3-resnet50": seg.deeplabv3_resnet50,
            "deeplabv3-mobilenet": seg.deeplabv3_mobilenet_v3_large,
            "lraspp-mobilenet": seg.lraspp_mobilenet_v3_large,
        }
        backbone = torchvision_backbone_weights(name) if imagenet_backbone else None
        kwargs = {"weights": None, "weights_backbone": backbone, "num_classes": first[1]}
        if name != "lraspp-mobilenet":
            kwargs["aux_loss"] = False
        self.net = builders[name](**kwargs)
        self.first = first[0]
        feat = self.net.backbone(torch.zeros(1, 3, 64, 64))["out"].shape[1]
        self.extra = nn.ModuleDict({n: nn.Conv2d(feat, c, 1) for n, c in rest})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        x = (x - self.mean) / self.std
        out = {self.first: self.net(x)["out"]}
        if self.extra:
            feat = self.net.backbone(x)["out"]
            for n, conv in self.extra.items():
                out[n] = F.interpolate(conv(feat), size=size, mode="bilinear", align_corners=False)
        return out


def torchvision_backbone_weights(name: str):
    """torchvision's ImageNet weights of ``name``'s backbone, only if they are already in torch's hub cache:
    nothing is downloaded here, so a missing file is a clear error."""
    import os

    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights

    weights = {
        "deeplabv3-resnet101": ResNet101_Weights.IMAGENET1K_V1,
        "deeplabv3-resnet50": ResNet50_Weights.IMAGENET1K_V1,
        "deeplabv3-mobilenet": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "lraspp-mobilenet": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    }[name]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained=torchvision: {path} is not on this machine and nothing is downloaded; "
            f"copy torchvision's {weights} file there, or pass --weights PATH"
        )
    return weights


def build_model(
    name: str, heads: dict[str, int], *, in_channels: int = 3, widths=(16, 32, 64, 96), imagenet_backbone: bool = False
) -> nn.Module:
    """One of :data:`MODELS` with the given heads (torchvision models take 3 input channels only;
    ``imagenet_backbone`` loads torchvision's ImageNet backbone weights from the local hub cache)."""
    if name == "small-unet":
        if imagenet_backbone:
            raise ValueError("pretrained=torchvision needs a torchvision model (--set model=deeplabv3-resnet101)")
        return SmallUNet(heads, in_channels=in_channels, widths=tuple(widths))
    if name in MODELS:
        if in_channels != 3:
            raise ValueError(f"build_model: {name} takes 3 input channels, got in_channels={in_channels}")
        return TorchvisionSegmenter(name, heads, imagenet_backbone=imagenet_backbone)
    raise ValueError(f"build_model: model must be one of {', '.join(MODELS)}, got {name!r}")


def head_outputs(output) -> dict[str, torch.Tensor]:
    """A network's output as a dict of heads: a tensor is the ``"logits"`` head; torchvision's ``{"out": ...}``
    becomes ``"logits"``."""
    if isinstance(output, torch.Tensor):
        return {"logits": output}
    if isinstance(output, dict):
        if "out" in output and "logits" not in output:
            output = {"logits": output["out"], **{k: v for k, v in output.items() if k not in ("out", "aux")}}
        return output
    raise TypeError(f"a model must return a tensor of logits or a dict of named heads, got {type(output).__name__}")
