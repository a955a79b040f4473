"""Small models for 1x28x28 inputs (Fashion-MNIST), each with a width multiplier.

The width multiplier scales every channel count (rounded to the nearest integer, at least 1), so a
thinner model can be sized to any parameter budget: that is how the "thinner dense" baseline of
``nesc.baselines`` matches a compressed model's size.

* ``resnet_fmnist``: a 3x3 stride-2 stem and three stages of one ResNet basic block each (16, 32, 64
  channels at width 1; strides 1, 2, 2), global average pooling, a linear head: 77,754 parameters.
* ``mobilenetv2_fmnist``: a 3x3 stride-2 stem (16 channels) and six MobileNetV2 inverted residual
  blocks (expansion 1 then 4; 16, 24, 32, 32, 64, 64 channels; three stride-2 stages), a 1x1 conv to
  256 channels, pooling, dropout, a linear head: 54,234 parameters.

Both stems halve the resolution at once (28 -> 14): a quarter of the compute of a stride-1 stem, for
the same parameters, so that the experiment suite trains on a shared CPU.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .mobilenetv2 import ConvBNReLU6, InvertedResidual
from .registry import register_model
from .resnet import BasicBlock

RESNET_WIDTHS = (16, 32, 64)
# (expansion t, output channels c, repeats n, first stride s), a shortened Table 2 of MobileNetV2.
MOBILENET_SETTING = ((1, 16, 1, 1), (4, 24, 1, 2), (4, 32, 2, 2), (4, 64, 1, 2))
MOBILENET_LAST = 256


def scaled(channels: int, width_mult: float) -> int:
    """A channel count times the width multiplier, rounded, at least 1."""
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0; got {width_mult!r}")
    return max(1, round(channels * width_mult))


class ResNetFMNIST(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = (scaled(c, width_mult) for c in RESNET_WIDTHS)
        # A stride-2 stem: 14x14 feature maps keep training cheap on a CPU; the parameters do not change.
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chans, c1, 3, 2, 1, bias=False),
                                              bn=nn.BatchNorm2d(c1), relu=nn.ReLU(inplace=True)))
        self.layer1 = BasicBlock(c1, c1, stride=1)
        self.layer2 = BasicBlock(c1, c2, stride=2)
        self.layer3 = BasicBlock(c2, c3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, c1, 14, 14)
        x = self.layer1(x)  # (B, c1, 14, 14)
        x = self.layer2(x)  # (B, c2, 7, 7)
        x = self.layer3(x)  # (B, c3, 4, 4)
        x = self.avgpool(x).flatten(1)  # (B, c3)
        return self.fc(x)  # (B, num_classes)


class MobileNetV2FMNIST(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.1,
                 in_chans: int = 1) -> None:
        super().__init__()
        in_chs = scaled(16, width_mult)
        features: list[nn.Module] = [ConvBNReLU6(in_chans, in_chs, stride=2)]  # 14x14 from here: cheap on a CPU
        for t, c, n, s in MOBILENET_SETTING:
            out_chs = scaled(c, width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, expand_ratio=t))
                in_chs = out_chs
        last = scaled(MOBILENET_LAST, width_mult)
        features.append(ConvBNReLU6(in_chs, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, last, 2, 2)
        x = self.pool(x).flatten(1)  # (B, last)
        return self.classifier(x)  # (B, num_classes)


@register_model("resnet_fmnist", input_shape=(1, 28, 28), num_classes=10, family="resnet")
def resnet_fmnist(num_classes: int = 10, width_mult: float = 1.0) -> ResNetFMNIST:
    return ResNetFMNIST(num_classes=num_classes, width_mult=width_mult)


@register_model("mobilenetv2_fmnist", input_shape=(1, 28, 28), num_classes=10, family="mobilenet")
def mobilenetv2_fmnist(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.1) -> MobileNetV2FMNIST:
    return MobileNetV2FMNIST(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
