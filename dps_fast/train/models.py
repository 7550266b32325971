"""Small image classifiers for the trainer (torchvision is not needed).

Every model has ``embed(x) -> [B, D]`` (penultimate features), ``head`` (the
linear classifier) and ``forward(x) = head(embed(x))``.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, in_shape, num_classes: int, hidden: int = 256, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        d = int(torch.tensor(in_shape).prod())
        layers, width = [nn.Flatten()], d
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.embed(x))


class SmallCNN(nn.Module):
    def __init__(self, in_shape, num_classes: int, width: int = 32):
        super().__init__()
        c = in_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 2 * width
        self.head = nn.Linear(2 * width, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.embed(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)), inplace=True)


class ResNetSmall(nn.Module):
    """ResNet-style network for 28x28 (or 8x8) inputs: a 3x3 stem and three stages
    of two basic blocks (widths w, 2w, 4w; strides 1, 2, 2), global average pool."""

    def __init__(self, in_shape, num_classes: int, width: int = 16, blocks: int = 2):
        super().__init__()
        c = in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for k in range(blocks):
                stages.append(BasicBlock(cin, cout, 2 if (k == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)

    def forward(self, x):
        return self.head(self.embed(x))


MODELS = {"mlp": MLP, "cnn": SmallCNN, "resnet": ResNetSmall}


def build_model(name: str, in_shape, num_classes: int, **kw) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    return MODELS[name](in_shape, num_classes, **kw)


class ProjectionHead(nn.Module):
    """Two-layer MLP projection for the contrastive term (SimCLR-style)."""

    def __init__(self, dim_in: int, dim_out: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, h):
        return self.net(h)
