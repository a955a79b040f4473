"""A multi-layer perceptron for 28x28 images (MNIST, Fashion-MNIST): 784 -> 512 -> 256 -> classes.

ReLU and dropout after each hidden layer; 535.8K parameters with 10 classes. The input is an image
``(B, 1, 28, 28)``; the model flattens it itself so that every registered model takes images.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class MLP(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 28 * 28,
        hidden: tuple[int, int] = (512, 256),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        h1, h2 = hidden
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, h1)
        self.act1 = nn.ReLU(inplace=True)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(h1, h2)
        self.act2 = nn.ReLU(inplace=True)
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)  # (B, 784)
        x = self.drop1(self.act1(self.fc1(x)))  # (B, 512)
        x = self.drop2(self.act2(self.fc2(x)))  # (B, 256)
        return self.fc3(x)  # (B, num_classes)


@register_model("mlp", input_shape=(1, 28, 28), num_classes=10, family="mlp")
def mlp(num_classes: int = 10, dropout: float = 0.2) -> MLP:
    return MLP(num_classes=num_classes, dropout=dropout)
