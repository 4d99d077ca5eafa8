"""The seed document's small CNN, written correctly.

The seed's version forgot `import torch.nn.functional as F` and flattened to 64*6*6, which does
not match a 32-px input (two 2x poolings give 8x8). Here the flatten size follows the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycv.models.registry import register_model


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32):
        super().__init__()
        if input_size % 4:
            raise ValueError(f"simple_cnn needs an input size divisible by 4, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        side = input_size // 4
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) float
        x = self.pool(F.relu(self.conv1(x)))  # (B, 32, S/2, S/2)
        x = self.pool(F.relu(self.conv2(x)))  # (B, 64, S/4, S/4)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))  # (B, 128): the embedding
        return self.fc2(x)  # (B, num_classes) logits


@register_model("simple_cnn", default_input_size=32)
def simple_cnn(*, num_classes: int, weights: str | None = None, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    return SimpleCNN(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
