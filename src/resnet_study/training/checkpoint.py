"""Checkpoints: written atomically every epoch (and on a stop request), read back to resume a
run exactly, or to evaluate and inspect a trained one (`load_run`)."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import RESUMABLE, Experiment, differences
from ..data.splits import Splits, make_splits
from ..errors import UsageError
from ..files import load_tensors, write_bytes
from ..models import build_model
from .device import autocast_dtype, resolve_device
from .run_folder import RunFolder


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2])}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32),
                         state["numpy"]["pos"], 0, 0.0))


def save_checkpoint(path: Path, **state: Any) -> None:
    """Serialised in memory first: torch's own writer turns a full disk into a RuntimeError
    of its C++ internals; our write makes it the OSError it is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; run without --resume to start the run")
    try:
        ckpt = load_tensors(path)
    except Exception as e:
        raise UsageError(f"{path}: not a resnet-study checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "experiment", "epoch"} <= set(ckpt):
        raise UsageError(f"{path}: not a resnet-study checkpoint")
    return ckpt


def check_same_experiment(saved: dict[str, Any], exp: Experiment, path: Path) -> None:
    """Refuse to resume a run under settings that would change what it computes: any setting
    but the execution settings marked RESUMABLE (config.ExecutionConfig)."""
    try:
        old = Experiment.from_dict(saved)
    except (UsageError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: its experiment cannot be read ({e})") from None
    difference = next(differences(old, exp, ignore=lambda f: f.metadata == RESUMABLE),
                      None)
    if difference is not None:
        name, before, now = difference
        raise UsageError(f"{path} was written by experiment {saved.get('name')!r} with "
                         f"{name}={before!r}, not {now!r}; resume with the same settings or "
                         "choose another --out")


def check_fits(saved: dict, model: nn.Module, exp: Experiment, where: str) -> None:
    """One line (UsageError) where a checkpoint's weights do not fit the network its config
    builds: for a network of the user's own, its code changed since the run was trained."""
    mismatch = _mismatch(saved, model.state_dict())
    if mismatch and exp.model.user_network:
        raise UsageError(f"{where}: your network {exp.model.family} is not the one this run "
                         f"was trained with ({mismatch}); restore its code as it was, or "
                         "train it anew")
    if mismatch:  # another width, block, shortcut or number of classes
        raise UsageError(f"{where} does not fit its config.json ({mismatch}); were they copied "
                         "from different runs?")


def _mismatch(saved: dict, expected: dict) -> str:
    """The first difference between a checkpoint's weights and those the config builds."""
    for key, tensor in expected.items():
        if key not in saved:
            return f"the config's {key} is not in the checkpoint"
        if getattr(saved[key], "shape", None) != tensor.shape:
            shape = list(getattr(saved[key], "shape", []))
            return f"{key} is {shape} in the checkpoint, {list(tensor.shape)} for the config"
    extra = next((key for key in saved if key not in expected), None)
    return f"the checkpoint's {extra} is not in the config's network" if extra else ""


@dataclasses.dataclass
class LoadedRun:
    experiment: Experiment
    epoch: int  # epochs behind the checkpoint
    splits: Splits
    model: nn.Module  # the checkpoint's weights, on `device`, in eval mode
    device: torch.device
    amp: torch.dtype | None


def load_run(run_dir: Path, data: str | None = None, device: str | None = None,
             progress: bool = True) -> LoadedRun:
    """A run's trained model with its experiment and data, to evaluate or inspect it (on other
    data or another device if given). A folder that is not a run, a missing checkpoint, or a
    checkpoint that does not fit its config (another architecture) is a UsageError."""
    folder = RunFolder(run_dir)
    chosen = {k: v for k, v in (("data", data), ("device", device)) if v}
    exp = folder.experiment().replace(pretrained=None, test_split=True, **chosen)
    ckpt_path = folder.checkpoint
    ckpt = load_checkpoint(ckpt_path)
    target = resolve_device(exp.execution.device)
    splits = make_splits(exp, target, progress=progress)
    model = build_model(exp.model, len(splits.images.classes))
    check_fits(ckpt["model"], model, exp, f"{ckpt_path} ({splits.images.name}, "
                                          f"{len(splits.images.classes)} classes)")
    model.load_state_dict(_evaluated_weights(ckpt))
    memory_format = torch.channels_last if exp.execution.channels_last else torch.contiguous_format
    model = model.to(target, memory_format=memory_format).eval()
    return LoadedRun(exp, ckpt["epoch"], splits, model, target,
                     autocast_dtype(exp.execution.precision, target))


def _evaluated_weights(ckpt: dict) -> dict:
    """The weights a run is evaluated with: the moving average's (`--ema`), else the trained."""
    if "ema" not in ckpt:
        return ckpt["model"]
    prefix = "module."
    return {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}
