"""resnet-study: the improved ResNet-18 CIFAR-100 study, re-measured with error bars."""

from .config import (
    EXPERIMENTS,
    DataConfig,
    ExecutionConfig,
    Experiment,
    ModelConfig,
    TrainConfig,
    UsageError,
)
from .models import CifarResNet, ResNet18, build_model, count_params

__all__ = ["EXPERIMENTS", "CifarResNet", "DataConfig", "ExecutionConfig", "Experiment",
           "ModelConfig", "ResNet18", "TrainConfig", "UsageError", "build_model", "count_params"]
