"""A network of your own for resnet-study (docs/experiments.md, "Your own network"): torchvision's
ResNet-18 layout with a squeeze-and-excitation gate (Hu et al. 2018) on every residual branch.

resnet-study imports `my_nets:resnet18_se` from the working directory (or PYTHONPATH) and calls
it with `num_classes` and the entry's options; it wants an nn.Module mapping N x 3 x 32 x 32
images to N x num_classes logits. Run from this folder:

    resnet-study experiments --experiments se.toml
    resnet-study study resnet18-se resnet18-lr0.01 --experiments se.toml --seeds 2
"""

from torch import nn


class SqueezeExcitation(nn.Module):
    """Each channel scaled by a gate computed from every channel's mean."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(),
                                  nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class Block(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, reduction: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcitation(planes, reduction)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


def resnet18_se(num_classes: int, reduction: int = 16) -> nn.Module:
    """ResNet-18 (the paper's 7x7 stem and max-pool) with SE gates of the given reduction."""
    stages = []
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(Block(inplanes, planes, stride, reduction),
                                    Block(planes, planes, 1, reduction)))
        inplanes = planes
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(512, num_classes))
