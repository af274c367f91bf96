"""torchvision's ImageNet weights for the base ResNet-18, or a state dict of the user's, loaded
into everything but the classifier."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError, one_line
from ..files import load_tensors

# torchvision's ResNet18_Weights.IMAGENET1K_V1, named here so that importing the model
# does not pull in torchvision.
IMAGENET_WEIGHTS_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def imagenet_weights_path() -> Path:
    """Where torch.hub keeps (and looks for) the downloaded ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_WEIGHTS_URL.rsplit("/", 1)[1]


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    path = imagenet_weights_path()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(IMAGENET_WEIGHTS_URL, str(path), progress=True)
        except Exception as e:  # offline, proxy, DNS: all mean the same thing to the user
            raise UsageError(
                f"could not download ImageNet weights ({type(e).__name__}); to work offline, "
                f"place {IMAGENET_WEIGHTS_URL} at {path}, or pass a local state dict path "
                f"as pretrained") from None
    return _load_state_dict(path)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UsageError(f"pretrained weights file {path} does not exist")
    try:
        state = load_tensors(path)
    except Exception as e:
        raise UsageError(f"{path}: not a loadable state dict ({one_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: expected a torchvision-format state dict of tensors")
    return state


def load_pretrained(model: nn.Module, source: str) -> None:
    """Load torchvision-format resnet18 weights into everything but the classifier."""
    state = _imagenet_state_dict() if source == "imagenet" else _load_state_dict(Path(source))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    bad = sorted(k for k, v in state.items() if k not in own or own[k].shape != v.shape)
    missing = sorted(k for k in own if not k.startswith("fc.") and k not in state)
    if bad or missing:
        raise UsageError(f"{source}: not a resnet18 state dict "
                         f"(first mismatch: {(bad + missing)[0]})")
    model.load_state_dict(state, strict=False)  # fc keeps its fresh initialisation
