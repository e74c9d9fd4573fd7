"""Model-zoo architectures for the field's benchmarks, in plain PyTorch, for `model.factory`.

Why here: RobustBench is not installable offline, and the torchvision / timm wheels on PyPI cannot
load beside the CPU build of torch pinned in this project (torchvision's compiled ops look for
CUDA libraries: "operator torchvision::nms does not exist"; timm imports torchvision). Both
architectures below use the parameter names of their originals, so a checkpoint saved from the
original model loads here with `torch.load(..., weights_only=True)` unchanged. Where torchvision
and timm are installed, `torchvision.models:resnet50` and `timm:create_model` work as factories
the same way.

- `wide_resnet`: RobustBench's `WideResNet` (model_zoo/architectures/wide_resnet.py, from TRADES),
  the architecture of its CIFAR-10 / CIFAR-100 `Standard` WRN-28-10 (the Tent / CoTTA /
  test-time-adaptation source model). Pre-activation basic blocks, 1x1 `convShortcut` where the
  width or stride changes, BN + ReLU + 8x8 average pool + `fc`. It takes [0, 1] inputs and no
  normalisation (identity mean 0 / std 1 in the config). RobustBench's `Standard.pt` stores
  `{"state_dict": {"module.<name>": ...}}`: strip the `module.` prefix once to get a plain
  state_dict.
- `resnet50`: torchvision's ResNet-50 (v1.5: stride on the 3x3 convolution of a bottleneck),
  the ImageNet-C source model of Tent / CoTTA; state_dict keys equal torchvision's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        # as the reference: when the shape changes, the shortcut also sees the pre-activated input
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class _NetworkBlock(nn.Module):
    def __init__(self, n_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            _WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, num_classes: int = 10, widen_factor: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wide_resnet: depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.n_channels = widths[3]
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        # the reference pools 8x8 (32 px inputs); adaptive pooling is the same there and allows other sizes
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wide_resnet(depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0) -> nn.Module:
    """RobustBench's WideResNet; the defaults are its CIFAR-10 `Standard` WRN-28-10."""
    return WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor, drop_rate=drop_rate)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        planes, in_planes = (64, 128, 256, 512), 64
        for i, (width, count) in enumerate(zip(planes, layers)):
            blocks = []
            for j in range(count):
                blocks.append(_Bottleneck(in_planes, width, 2 if (j == 0 and i > 0) else 1))
                in_planes = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * 4, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 architecture and parameter names (no weights: give a checkpoint)."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes)
