"""The networks: the built-in families (`resnet`), the registry that keeps the set open to the
user's own (`registry`), and pretrained weights (`pretrained`)."""

from .pretrained import IMAGENET_WEIGHTS_URL, imagenet_weights_path, load_pretrained
from .registry import (
    FAMILIES,
    build_model,
    check_network,
    count_params,
    network,
    register_family,
    training_flops,
)
from .resnet import STEMS, BasicBlock, CifarResNet, Conv2d, PreActBlock, ResNet18

__all__ = ["FAMILIES", "IMAGENET_WEIGHTS_URL", "STEMS", "BasicBlock", "CifarResNet", "Conv2d",
           "PreActBlock", "ResNet18", "build_model", "check_network", "count_params",
           "imagenet_weights_path", "load_pretrained", "network", "register_family",
           "training_flops"]
