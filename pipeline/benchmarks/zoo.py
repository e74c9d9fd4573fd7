"""Architectures no installed library provides, in plain PyTorch, for `model.factory`.

Everything a library has comes from that library: torchvision's ResNets and the rest by name
(`torchvision.models:resnet50`), timm's ViTs and the rest through `timm:create_model`. What is
left here is RobustBench's CIFAR models, because the `robustbench` package does not import
offline (it imports `autoattack`, which is not on PyPI) and neither torchvision nor timm has them:

- `wide_resnet`: RobustBench's `WideResNet` (model_zoo/architectures/wide_resnet.py, from TRADES),
  the architecture of its CIFAR-10 `Standard` WRN-28-10 (the Tent / CoTTA / test-time-adaptation
  source model). Pre-activation basic blocks, 1x1 `convShortcut` where the width or stride
  changes, BN + ReLU + 8x8 average pool + `fc`; its parameter names.
- `cifar_resnext`: RobustBench's `CifarResNeXt` (model_zoo/architectures/resnext.py, from AugMix),
  the ResNeXt-29 32x4d of `Hendrycks2020AugMix_ResNeXt` (the CIFAR-100-C source model of CoTTA and
  test-time-adaptation), with RobustBench's (x - 0.5) / 0.5 normalisation inside the model.
- `robustbench(name, dataset, threat_model)`: the architecture of a RobustBench model-zoo entry
  (`Standard`, `Hendrycks2020AugMix_WRN`, `Hendrycks2020AugMix_ResNeXt`) for a checkpoint in
  RobustBench's own layout, `<model_dir>/<dataset>/<threat_model>/<name>.pt`
  (`robustbench_checkpoint` gives the path), loaded as RobustBench's `load_model` does: the
  `state_dict` entry, `module.` / `model.` prefixes stripped (workers.models.fit_names), the
  normalisation buffers `mu` / `sigma` not read from the file.
These models take inputs in [0, 1]; each instance carries `preprocess_cfg` (what
`model.preprocess: auto` reads: 32 px, mean 0 / std 1, no resize or crop).
- `resnet50`: kept so older configs run: torchvision's `resnet50(weights=None)` (the hand-written
  copy that stood here until torchvision could be imported is gone).
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


class _ResNeXtBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, cardinality: int, base_width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        dim = int(math.floor(planes * (base_width / 64.0)))
        self.conv_reduce = nn.Conv2d(inplanes, dim * cardinality, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(dim * cardinality)
        self.conv_conv = nn.Conv2d(dim * cardinality, dim * cardinality, 3, stride=stride, padding=1,
                                   groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(dim * cardinality)
        self.conv_expand = nn.Conv2d(dim * cardinality, planes * 4, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        out = F.relu(self.bn(self.conv_conv(out)), inplace=True)
        out = self.bn_expand(self.conv_expand(out))
        return F.relu((x if self.downsample is None else self.downsample(x)) + out, inplace=True)


class CifarResNeXt(nn.Module):
    """RobustBench's CifarResNeXt with the AugMix model's input normalisation ((x - mu) / sigma,
    mu = sigma = 0.5, as non-persistent buffers: RobustBench's checkpoint does not hold them)."""

    checkpoint_ignores = ("mu", "sigma")

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"cifar_resnext: depth must be 9n + 2, got {depth}")
        n = (depth - 2) // 9
        self.cardinality, self.base_width, self.num_classes = cardinality, base_width, num_classes
        self.register_buffer("mu", torch.tensor([0.5] * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sigma", torch.tensor([0.5] * 3).view(1, 3, 1, 1), persistent=False)
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.inplanes = 64
        self.stage_1 = self._make_layer(64, n, 1)
        self.stage_2 = self._make_layer(128, n, 2)
        self.stage_3 = self._make_layer(256, n, 2)
        self.classifier = nn.Linear(256 * 4, num_classes)
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [_ResNeXtBottleneck(self.inplanes, planes, self.cardinality, self.base_width, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_ResNeXtBottleneck(self.inplanes, planes, self.cardinality, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mu) / self.sigma
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        # the reference pools 8x8 (32 px inputs); adaptive pooling is the same there
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _NormalisedWideResNet(WideResNet):
    """RobustBench's Hendrycks2020AugMixWRNNet: the WRN with (x - 0.5) / 0.5 inside."""

    checkpoint_ignores = ("mu", "sigma")

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10) -> None:
        super().__init__(depth=depth, num_classes=num_classes, widen_factor=widen_factor)
        self.register_buffer("mu", torch.tensor([0.5] * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sigma", torch.tensor([0.5] * 3).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mu) / self.sigma)


# what `model.preprocess: auto` takes for these models: RobustBench feeds [0, 1] CIFAR images
CIFAR_PREPROCESS = {"image_shape": [3, 32, 32], "mean": 0.0, "std": 1.0, "resize": None, "center_crop": None,
                    "interpolation": "bilinear", "source": "RobustBench: inputs in [0, 1], normalisation inside the model"}
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}
ROBUSTBENCH = {  # (dataset, name) -> architecture, as RobustBench's model_zoo/cifar10.py / cifar100.py build them
    ("cifar10", "Standard"): lambda: WideResNet(depth=28, num_classes=10, widen_factor=10),
    ("cifar10", "Hendrycks2020AugMix_WRN"): lambda: _NormalisedWideResNet(40, 2, 10),
    ("cifar10", "Hendrycks2020AugMix_ResNeXt"): lambda: CifarResNeXt(29, 4, 32, num_classes=10),
    ("cifar100", "Hendrycks2020AugMix_WRN"): lambda: _NormalisedWideResNet(40, 2, 100),
    ("cifar100", "Hendrycks2020AugMix_ResNeXt"): lambda: CifarResNeXt(29, 4, 32, num_classes=100),
}
THREAT_MODELS = ("Linf", "L2", "corruptions")


def _with_preprocess(model: nn.Module) -> nn.Module:
    model.preprocess_cfg = dict(CIFAR_PREPROCESS)
    return model


def wide_resnet(depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0) -> nn.Module:
    """RobustBench's WideResNet; the defaults are its CIFAR-10 `Standard` WRN-28-10."""
    return _with_preprocess(WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor,
                                       drop_rate=drop_rate))


def cifar_resnext(depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 100) -> nn.Module:
    """RobustBench's Hendrycks2020AugMix_ResNeXt (ResNeXt-29 32x4d, normalisation inside)."""
    return _with_preprocess(CifarResNeXt(depth, cardinality, base_width, num_classes))


def robustbench(name: str = "Standard", dataset: str = "cifar10", threat_model: str = "corruptions") -> nn.Module:
    """The architecture of RobustBench's model-zoo entry `name` for `dataset` (no weights: give the
    checkpoint RobustBench downloaded, `<model_dir>/<dataset>/<threat_model>/<name>.pt`)."""
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    build = ROBUSTBENCH.get((dataset, name))
    if build is None:
        known = ", ".join(f"{d}/{n}" for d, n in ROBUSTBENCH)
        raise ValueError(f"RobustBench model {dataset}/{name} is not in this zoo (known: {known})")
    return _with_preprocess(build())


def robustbench_checkpoint(model_dir: str, name: str = "Standard", dataset: str = "cifar10",
                           threat_model: str = "corruptions") -> str:
    """Where RobustBench's `load_model(name, model_dir, dataset, threat_model)` keeps the file."""
    return f"{model_dir}/{dataset}/{threat_model}/{name}.pt"


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 (no weights); `torchvision.models:resnet50` is the same model."""
    from torchvision.models import resnet50 as tv_resnet50

    return tv_resnet50(weights=None, num_classes=num_classes)
