"""What inspection knows of a network's parts (`Anatomy`): a built-in family's by its design,
any other network's found by running it once, not by its names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError

MIN_CAM_SIZE = 4  # Grad-CAM's layer: the deepest stage (or convolution) with maps at least 4x4


@dataclass
class Anatomy:
    """What inspection knows of a network's parts: a built-in's by its design, a user's found by
    running it on a batch (`anatomy`)."""

    stages: list[str]  # top-level modules that output feature maps, in order
    blocks: list[tuple[str, nn.Module]]  # residual blocks inside them
    residual: bool  # whether each block's residual branch and shortcut are known
    classifier: nn.Module  # its input is the penultimate features
    first_conv: nn.Conv2d  # its filters see the image
    cam: str | None  # Grad-CAM's module (a name in the network), and why
    cam_reason: str
    notes: list[str] = field(default_factory=list)  # what could not be done, and why


def stages(model: nn.Module) -> list[str]:
    """The stage names of a built-in network (`layer1`..`layer4` or `layer1`..`layer3`)."""
    return [name for name, _ in model.named_children() if name.startswith("layer")]


def anatomy(model: nn.Module, builtin: bool, x: torch.Tensor) -> Anatomy:
    """A built-in network's parts by name, as its family designed them; any other network's by
    running it once on `x`: its stages are its top-level modules of modules that output feature
    maps, their children its blocks; its classifier the last linear layer to run; Grad-CAM's
    module its deepest convolution whose output is still at least `MIN_CAM_SIZE` a side."""
    if builtin:
        names = stages(model)
        return Anatomy(names, [(f"{stage}.{i}", block) for stage in names
                               for i, block in enumerate(getattr(model, stage))], True,
                       model.fc, model.conv1, None, "")
    order: list[tuple[str, nn.Module, tuple]] = []
    handles = [m.register_forward_hook(lambda m, a, out, n=n: order.append((n, m, tuple(
        out.shape) if isinstance(out, torch.Tensor) else ())))
        for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    top = dict(model.named_children())
    names = [n for n, m, shape in order if n in top and len(shape) == 4 and any(m.children())]
    linears = [m for _, m, _ in order if isinstance(m, nn.Linear)]
    convs = [(n, m, shape) for n, m, shape in order if isinstance(m, nn.Conv2d)]
    if not linears or not convs:
        raise UsageError("inspect needs a network with a convolution and a final linear layer "
                         f"(found {len(convs)} convolutions, {len(linears)} linear layers)")
    usable = [c for c in convs if c[2][-1] >= MIN_CAM_SIZE] or convs[:1]
    cam, _, shape = usable[-1]
    notes = ["activation statistics per block: mean, variance and units that never fire on each "
             "block's output; its residual branch against its shortcut is not measured (a "
             "network of your own: which module ends the branch cannot be told from outside)"]
    if not names:
        notes.append("feature maps per stage: none drawn (no top-level module of modules "
                     "outputs feature maps)")
    return Anatomy(names, [(f"{stage}.{n}", b) for stage in names
                           for n, b in top[stage].named_children()], False, linears[-1],
                   next(m for _, m, _ in convs if m.in_channels == 3), cam,
                   f"{cam} ({shape[-2]}x{shape[-1]}): the deepest convolution whose maps are at "
                   f"least {MIN_CAM_SIZE}x{MIN_CAM_SIZE}", notes)
