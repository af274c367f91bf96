"""The families of networks, kept open as timm's `register_model` keeps its set: the built-in
`resnet18` and `cifar-resnet` register here (`resnet`), each with the rules it lays on the
other model settings, and a user's network is any importable `module:callable` that takes
`num_classes` and its options and returns an `nn.Module` mapping N x 3 x 32 x 32 images to
N x num_classes logits. Whatever builds, prices or checks a network asks here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..config import FAMILY_RULES, ModelConfig
from ..errors import UsageError, one_line


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[ModelConfig, int], nn.Module]  # (config, num_classes) -> network


FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, check: Callable[[ModelConfig], None]):
    """A class decorator: the network class (built from a ModelConfig and num_classes) becomes
    family `name`, whose configs `check` validates (UsageError) as they are made."""
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        FAMILIES[name] = Family(name, cls)
        FAMILY_RULES[name] = check
        return cls
    return register


def user_callable(family: str) -> Callable[..., nn.Module]:
    """The callable `module:callable` names, imported from the working directory or
    PYTHONPATH; one line (UsageError) where it cannot be had."""
    module_name, _, name = family.partition(":")
    if os.getcwd() not in sys.path:  # a console script's path starts at its own folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0] and e.name != module_name:
            raise UsageError(f"family {family}: module {module_name} cannot be imported: it "
                             f"imports {e.name}, which is not installed") from None
        raise UsageError(f"family {family}: no module {module_name} here; put "
                         f"{module_name}.py in the working directory ({os.getcwd()}) or on "
                         "PYTHONPATH") from None
    except Exception as e:
        raise UsageError(f"family {family}: module {module_name} cannot be imported "
                         f"({one_line(e)})") from None
    found = getattr(module, name, None)
    if found is None:
        raise UsageError(f"family {family}: module {module_name} ({module.__file__}) has no "
                         f"{name}")
    if not callable(found):
        raise UsageError(f"family {family}: {name} is a {type(found).__name__}, not a callable "
                         "that returns a network")
    return found


def network(cfg: ModelConfig, num_classes: int = 100) -> nn.Module:
    """The network `cfg` describes, freshly initialised (no pretrained weights)."""
    if not cfg.user_network:
        return FAMILIES[cfg.family].build(cfg, num_classes)
    make = user_callable(cfg.family)
    try:
        model = make(num_classes=num_classes, **cfg.options.as_dict())
    except Exception as e:
        raise UsageError(f"family {cfg.family}: building it with num_classes={num_classes} "
                         f"and options {cfg.options.as_dict()} failed ("
                         f"{one_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"family {cfg.family}: returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def check_network(cfg: ModelConfig, num_classes: int = 100) -> None:
    """A user's network, as its experiments file is read: importable, callable with its
    options, and mapping a 2 x 3 x 32 x 32 batch to 2 x num_classes, all on the meta device
    (no weights are made)."""
    with torch.device("meta"):
        model = network(cfg, num_classes)
        try:
            out = model(torch.empty(2, 3, 32, 32))
        except Exception as e:
            raise UsageError(f"family {cfg.family}: its forward pass on a 2 x 3 x 32 x 32 batch "
                             f"failed ({one_line(e)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"family {cfg.family}: maps a 2 x 3 x 32 x 32 batch to {shape}, not "
                         f"[2, {num_classes}]: it must return one logit per class")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@functools.cache
def training_flops(cfg: ModelConfig, num_classes: int) -> float:
    """FLOPs of one training step (forward and backward) per 32x32 image, counted on the meta
    device in a fraction of a second: the weight a study's time estimate gives each run."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        network(cfg, num_classes)(torch.empty(2, 3, 32, 32)).sum().backward()
    return counter.get_total_flops() / 2


def build_model(cfg: ModelConfig, num_classes: int = 100) -> nn.Module:
    """Build any `ModelConfig`'s network; loads pretrained weights."""
    from .pretrained import load_pretrained

    model = network(cfg, num_classes)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model
