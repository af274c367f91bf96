"""The built-in families of networks: the paper's Table 1, each a configuration of two.

- `ResNet18`: one configurable ResNet-18 covering all twelve of the paper's rows. Layer names
  follow torchvision's `resnet18` (`conv1`, `bn1`, `layer1..4`, `downsample`, `fc`), so that
  the base configuration loads torchvision's ImageNet weights unchanged and users can move
  state dicts between the two.
- `CifarResNet`: the CIFAR ResNets of the two literature rows, He et al.'s 6n+2-layer ResNets
  (ResNet-110: n = 18) and Zagoruyko & Komodakis's wide ResNets (WRN-16-8), with the same
  block classes and layer names (`layer1..3`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import UsageError
from .registry import register_family

STAGE_WIDTHS = (1, 2, 4, 8)  # ResNet-18's stages, times its layer1 channels C and width k
CIFAR_STAGE_WIDTHS = (16, 32, 64)  # He et al.'s CIFAR ResNets, times a wide ResNet's k
# A ResNet-18's stem: conv kernel, conv stride, 3x3/2 max-pool after it. The paper's ImageNet stem
# leaves layer1 8x8 maps of a 32x32 image, where the CIFAR literature's 3x3 stem keeps 32x32;
# the three between keep 16x16 at about 4x the paper's cost at its 64 channels, and at about its
# cost with 32 (docs/training.md, "What the paper never tried").
STEMS = {"imagenet": (7, 2, True), "imagenet-nopool": (7, 2, False),
         "imagenet-s1": (7, 1, True), "cifar-s2": (3, 2, False), "cifar": (3, 1, False)}


def _norm(channels: int, enabled: bool) -> nn.Module:
    # Identity keeps the forward code identical with and without batch norm; it has no
    # parameters, so "no BN" removes exactly the BN parameters (the paper's 11,218,212).
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that computes a map with fewer pixels than its kernel as one matrix product.

    With the paper's 7x7 stem a 32x32 image reaches layer3 as 2x2 and layer4 as 1x1 maps,
    where most of a 3x3 kernel's taps only ever see padding. oneDNN's backward pass for those
    shapes is pathological: layer4's 512x512 convolutions took half of a CPU training step
    (benchmarks/RESULTS.md). On such a map the convolution is a small dense linear map, whose
    matrix, assembled from the kernel's taps, costs less than the kernel's nominal work and runs
    as one GEMM. Same parameters and state dict, same function and gradients up to rounding.
    Only on the CPU: on a GPU cuDNN's kernels for those shapes beat the product (1.5x on an
    H200, benchmarks/RESULTS.md), and FLOPs counted on the meta device are the convolution's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        kh, kw = self.kernel_size
        if (x.device.type != "cpu" or h * w >= kh * kw or self.groups != 1
                or self.dilation != (1, 1)):
            return super().forward(x)
        n, cin = x.shape[:2]
        # torch.compile traces the uncached function (it warns of caches) into a constant.
        taps = _tap_selection.__wrapped__ if torch.compiler.is_compiling() else _tap_selection
        selection, ho, wo = taps(h, w, self.kernel_size, self.stride, self.padding, x.device)
        # A product with a 0/1 selection, not a gather: a gather's backward scatters with
        # atomic adds, which made CPU runs differ in the last bits from one process to another.
        selection = selection.to(self.weight.dtype)  # a no-op but for float64 models
        dense = torch.einsum("ock,pqk->poqc", self.weight.flatten(2), selection)
        dense = dense.reshape(ho * wo * self.out_channels, h * w * cin)
        out = x.permute(0, 2, 3, 1).reshape(n, h * w * cin) @ dense.T
        out = out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # channels_last strides
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


@functools.cache
def _tap_selection(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(out pixels, in pixels, taps) 0/1 tensor: which kernel tap joins each output pixel to
    each input pixel (none where the tap falls on padding). Cached per device, so that the
    forward pass never copies it from the host."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    selection = torch.zeros(ho * wo, h * w, kh * kw)
    for oy in range(ho):
        for ox in range(wo):
            for iy in range(h):
                for ix in range(w):
                    ky, kx = iy - oy * sh + ph, ix - ox * sw + pw
                    if 0 <= ky < kh and 0 <= kx < kw:
                        selection[oy * wo + ox, iy * w + ix, ky * kw + kx] = 1
    return selection.to(device), ho, wo


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: the identity, subsampled by the stride, with zeros for the new
    channels; it has no parameters."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Post-activation block (conv-BN-ReLU), as in He et al. 2016 and torchvision."""

    def __init__(self, inplanes: int, planes: int, stride: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = _norm(planes, cfg.batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(cfg.block_dropout) if cfg.block_dropout else nn.Identity()
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = _norm(planes, cfg.batch_norm)
        self.downsample = None
        if (stride != 1 or inplanes != planes) and cfg.shortcut == "zero-pad":
            self.downsample = ZeroPadShortcut(planes - inplanes, stride)
        elif stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                _conv(inplanes, planes, cfg.shortcut_kernel, stride), _norm(planes, cfg.batch_norm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.dropout(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class PreActBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv), He et al. 2016b.

    Where the shape changes, the paper's ResNet-18 gives the shortcut a BN of its own before
    its conv, on the block input, as the paper describes (which is what makes its
    pre-activation model 11,226,020 parameters). A CIFAR ResNet's projection takes the block's
    own pre-activation instead, as in He et al. 2016b and Zagoruyko & Komodakis's code.
    """

    def __init__(self, inplanes: int, planes: int, stride: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.bn1 = _norm(inplanes, cfg.batch_norm)
        self.relu = nn.ReLU()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn2 = _norm(planes, cfg.batch_norm)
        self.dropout = nn.Dropout(cfg.block_dropout) if cfg.block_dropout else nn.Identity()
        self.conv2 = _conv(planes, planes, 3)
        self.downsample = None
        self.shortcut_preactivated = cfg.family == "cifar-resnet" and cfg.shortcut == "projection"
        if (stride != 1 or inplanes != planes) and cfg.shortcut == "zero-pad":
            self.downsample = ZeroPadShortcut(planes - inplanes, stride)
        elif (stride != 1 or inplanes != planes) and self.shortcut_preactivated:
            self.downsample = _conv(inplanes, planes, cfg.shortcut_kernel, stride)
        elif stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(_norm(inplanes, cfg.batch_norm),
                                            _conv(inplanes, planes, cfg.shortcut_kernel, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        identity = (x if self.downsample is None else
                    self.downsample(pre if self.shortcut_preactivated else x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + identity


def _stage(block: type[nn.Module], inplanes: int, planes: int, stride: int,
           cfg: ModelConfig) -> nn.Sequential:
    """`cfg.blocks` blocks, the first taking the stride and the change of width."""
    return nn.Sequential(*(block(inplanes if j == 0 else planes, planes, stride if j == 0 else 1,
                                 cfg) for j in range(cfg.blocks)))


def _init_weights(model: nn.Module) -> None:
    """torchvision's initialisation (He et al.'s for the convolutions)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


PRETRAINED_BASE_ONLY = ("pretrained weights exist only for the base architecture (a 7x7 "
                        "imagenet stem, post-activation, width 1, 64 channels, 1x1 shortcut, "
                        "batch norm)")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _check_resnet18(cfg: ModelConfig) -> None:
    _require(cfg.blocks == 2 and cfg.shortcut == "projection",
             "a resnet18 has 2 blocks per stage and projection shortcuts; other depths and "
             "zero-padded shortcuts belong to family cifar-resnet")
    _require(cfg.pretrained is None or (cfg.width == 1 and cfg.channels == 64
                                        and cfg.shortcut_kernel == 1 and cfg.block == "post"
                                        and cfg.batch_norm and cfg.stem.startswith("imagenet")),
             PRETRAINED_BASE_ONLY)


def _check_cifar_resnet(cfg: ModelConfig) -> None:
    _require(cfg.channels == 64, "channels sets a resnet18's layer1; a cifar-resnet's stages "
                                 "are 16k, 32k, 64k channels (width k)")
    _require(cfg.stem == "cifar", "family cifar-resnet has the 3x3 stem only: set stem = cifar")
    _require(cfg.pretrained is None, PRETRAINED_BASE_ONLY)


@register_family("resnet18", check=_check_resnet18)
class ResNet18(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int = 100) -> None:
        super().__init__()
        self.cfg = cfg
        kernel, stride, pool = STEMS[cfg.stem]
        self.conv1 = nn.Conv2d(3, cfg.channels, kernel, stride=stride, padding=kernel // 2,
                               bias=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if pool else nn.Identity()
        self.bn1 = _norm(cfg.channels, cfg.batch_norm)
        self.relu = nn.ReLU(inplace=True)

        block = BasicBlock if cfg.block == "post" else PreActBlock
        inplanes = cfg.channels  # the stem's, whatever the width multiplier
        for i, multiple in enumerate(STAGE_WIDTHS):
            planes = multiple * cfg.channels * cfg.width
            self.add_module(f"layer{i + 1}", _stage(block, inplanes, planes, 1 if i == 0 else 2,
                                                    cfg))
            inplanes = planes
        # Pre-activation blocks end on a sum; one ReLU (no BN, which would change the
        # parameter count) gives the classifier rectified features as in the post variant.
        self.final_relu = nn.ReLU() if cfg.block == "pre" else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.fc_dropout) if cfg.fc_dropout else nn.Identity()
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(self.final_relu(x)), 1)
        return self.fc(self.dropout(x))


@register_family("cifar-resnet", check=_check_cifar_resnet)
class CifarResNet(nn.Module):
    """A 3x3 16-channel stem, three stages of `cfg.blocks` blocks at widths 16k, 32k and 64k
    (the second and third starting with stride 2), global average pooling and fc.

    Post-activation blocks with zero-padded shortcuts and k = 1 make He et al.'s 6n+2-layer
    CIFAR ResNets (ResNet-110: n = 18); pre-activation blocks with 1x1 projections make
    Zagoruyko & Komodakis's WRN-(6n+4)-k (WRN-16-8: n = 2, k = 8). A post-activation network
    applies BN-ReLU after its stem; a pre-activation one leaves that to its first block and
    ends with BN-ReLU before pooling, as the wide ResNets' code does.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = 100) -> None:
        super().__init__()
        self.cfg = cfg
        post = cfg.block == "post"
        self.conv1 = _conv(3, CIFAR_STAGE_WIDTHS[0], 3)
        self.bn1 = _norm(CIFAR_STAGE_WIDTHS[0], cfg.batch_norm) if post else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if post else nn.Identity()
        block = BasicBlock if post else PreActBlock
        inplanes = CIFAR_STAGE_WIDTHS[0]
        for i, base_width in enumerate(CIFAR_STAGE_WIDTHS):
            planes = base_width * cfg.width
            self.add_module(f"layer{i + 1}", _stage(block, inplanes, planes, 1 if i == 0 else 2,
                                                    cfg))
            inplanes = planes
        self.final_bn = nn.Identity() if post else _norm(inplanes, cfg.batch_norm)
        self.final_relu = nn.Identity() if post else nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.fc_dropout) if cfg.fc_dropout else nn.Identity()
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(self.final_relu(self.final_bn(x))), 1)
        return self.fc(self.dropout(x))
