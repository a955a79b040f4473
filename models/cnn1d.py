"""A small 1-D CNN for signals such as MNIST-1D (40 samples, 10 classes).

Three Conv1d-BatchNorm1d-ReLU stages (32, 64, 128 channels; kernels 5, 3, 3; the last two halve the
length), global average pooling, dropout, and a linear head: 32.6K parameters with 10 classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class ConvBNReLU1d(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv1d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
            nn.BatchNorm1d(out_chs),
            nn.ReLU(inplace=True),
        )


class CNN1d(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        channels: tuple[int, int, int] = (32, 64, 128),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = ConvBNReLU1d(in_chans, c1, kernel_size=5)
        self.conv2 = ConvBNReLU1d(c1, c2, kernel_size=3, stride=2)
        self.conv3 = ConvBNReLU1d(c2, c3, kernel_size=3, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, 32, L)
        x = self.conv2(x)  # (B, 64, L/2)
        x = self.conv3(x)  # (B, 128, L/4)
        x = self.pool(x)  # (B, 128, 1)
        x = x.flatten(1)  # (B, 128)
        x = self.drop(x)  # (B, 128)
        return self.fc(x)  # (B, num_classes)


@register_model("cnn1d", input_shape=(1, 40), num_classes=10, family="cnn1d")
def cnn1d(num_classes: int = 10, dropout: float = 0.1, width_mult: float = 1.0) -> CNN1d:
    # width_mult scales every channel count (rounded, at least 1): the thinner baselines use it.
    channels = tuple(max(1, round(c * width_mult)) for c in (32, 64, 128))
    return CNN1d(num_classes=num_classes, channels=channels, dropout=dropout)
