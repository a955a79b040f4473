"""ResNet-18 (He et al., CVPR 2016) with two stems: ImageNet and CIFAR.

The ImageNet stem is a 7x7 stride-2 conv and a 3x3 stride-2 max pool (11.69M parameters with 1000
classes); the CIFAR stem is a single 3x3 stride-1 conv with no pool, which keeps 32x32 inputs at full
resolution into ``layer1`` (11.17M parameters with 10 classes). Module names follow torchvision
except the stem, which is one ``nn.Sequential`` so that both variants share a straight-line forward.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        # A 1x1 projection only where the shape changes; a config choice, so fx sees one branch.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, C_out, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, C_out, H/s, W/s)
        return self.relu(out + shortcut)


def _stem(kind: str) -> nn.Sequential:
    if kind == "imagenet":
        return nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                bn=nn.BatchNorm2d(64),
                relu=nn.ReLU(inplace=True),
                pool=nn.MaxPool2d(3, 2, 1),
            )
        )
    if kind == "cifar":
        return nn.Sequential(
            OrderedDict(conv=nn.Conv2d(3, 64, 3, 1, 1, bias=False), bn=nn.BatchNorm2d(64), relu=nn.ReLU(inplace=True))
        )
    raise ValueError(f"unknown ResNet stem {kind!r}; expected 'imagenet' or 'cifar'")


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000, stem: str = "imagenet") -> None:
        super().__init__()
        self.stem = _stem(stem)
        self.in_chs = 64
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, out_chs: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.in_chs, out_chs, stride)]
        self.in_chs = out_chs
        layers += [BasicBlock(out_chs, out_chs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # As torchvision: He init for convs, unit BN; the fc keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, 64, H/4, W/4) imagenet stem; (B, 64, H, W) cifar stem
        x = self.layer1(x)  # (B, 64, H', W')
        x = self.layer2(x)  # (B, 128, H'/2, W'/2)
        x = self.layer3(x)  # (B, 256, H'/4, W'/4)
        x = self.layer4(x)  # (B, 512, H'/8, W'/8)
        x = self.avgpool(x)  # (B, 512, 1, 1)
        x = x.flatten(1)  # (B, 512)
        return self.fc(x)  # (B, num_classes)


@register_model("resnet18", input_shape=(3, 224, 224), test_input_shape=(3, 64, 64), num_classes=1000, family="resnet")
def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, stem="imagenet")


@register_model("resnet18_cifar", input_shape=(3, 32, 32), num_classes=10, family="resnet")
def resnet18_cifar(num_classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, stem="cifar")
