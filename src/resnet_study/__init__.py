"""resnet-study: the improved ResNet-18 CIFAR-100 study, re-measured with error bars."""

from .catalogue import PRESETS
from .config import (
    DataConfig,
    ExecutionConfig,
    Experiment,
    ModelConfig,
    TrainConfig,
)
from .errors import UsageError
from .models import CifarResNet, ResNet18, count_params
from .models import build_model as _build_model

EXPERIMENTS = PRESETS.experiments  # the presets by name


def build_model(spec: str | ModelConfig, num_classes: int = 100):
    """A preset's network by name (`build_model("resnet18-lr0.01")`), or any `ModelConfig`'s,
    pretrained weights loaded."""
    return _build_model(PRESETS.get(spec).model if isinstance(spec, str) else spec, num_classes)

__all__ = ["EXPERIMENTS", "PRESETS", "CifarResNet", "DataConfig", "ExecutionConfig", "Experiment",
           "ModelConfig", "ResNet18", "TrainConfig", "UsageError", "build_model", "count_params"]
