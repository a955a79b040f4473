"""EfficientNet-B0 (Tan & Le, ICML 2019), laid out like torchvision's so state-dict names match.

MBConv blocks: a 1x1 expansion conv, a k x k depthwise conv, squeeze-and-excitation, and a linear
1x1 projection, all with SiLU; a residual connection when the block keeps resolution and width.
5.29M parameters with 1000 classes. Stochastic depth is left out: it makes training-mode outputs
random per sample, and the compressor's tests compare train-mode graphs against eager.
"""

from __future__ import annotations

from torch import Tensor, nn

from .mobilenetv2 import make_divisible
from .registry import register_model

# (expansion, kernel, first stride, in channels, out channels, repeats), Table 1 of the paper.
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class ConvBNSiLU(nn.Sequential):
    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, chs: int, squeeze_chs: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(chs, squeeze_chs, 1)
        self.fc2 = nn.Conv2d(squeeze_chs, chs, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.avgpool(x)  # (B, C, 1, 1)
        scale = self.activation(self.fc1(scale))  # (B, C_sq, 1, 1)
        scale = self.scale_activation(self.fc2(scale))  # (B, C, 1, 1)
        return x * scale  # (B, C, H, W)


class MBConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = make_divisible(in_chs * expand_ratio, 8)
        # A config flag, fixed at construction: fx traces one branch, never a data-dependent one.
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: list[nn.Module] = []
        if hidden != in_chs:
            layers.append(ConvBNSiLU(in_chs, hidden, kernel_size=1))
        layers += [
            ConvBNSiLU(hidden, hidden, kernel_size, stride, groups=hidden),  # depthwise
            SqueezeExcitation(hidden, max(1, in_chs // 4)),  # squeeze ratio 0.25 of the block input
            ConvBNSiLU(hidden, out_chs, kernel_size=1, act=False),  # linear projection
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)  # (B, C_out, H/s, W/s)
        return out + x if self.use_res_connect else out


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, last_channel: int = 1280) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNSiLU(3, B0_STAGES[0][3], stride=2)]
        for expand, kernel, stride, in_chs, out_chs, repeats in B0_STAGES:
            stage = [
                MBConv(in_chs if i == 0 else out_chs, out_chs, kernel, stride if i == 0 else 1, expand)
                for i in range(repeats)
            ]
            features.append(nn.Sequential(*stage))
        features.append(ConvBNSiLU(B0_STAGES[-1][4], last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, 1280, H/32, W/32)
        x = self.avgpool(x)  # (B, 1280, 1, 1)
        x = x.flatten(1)  # (B, 1280)
        return self.classifier(x)  # (B, num_classes)


@register_model(
    "efficientnet_b0", input_shape=(3, 224, 224), test_input_shape=(3, 64, 64), num_classes=1000, family="efficientnet"
)
def efficientnet_b0(num_classes: int = 1000, dropout: float = 0.2) -> EfficientNet:
    return EfficientNet(num_classes=num_classes, dropout=dropout)
