"""Where a run executes: its device, its precision, its memory peak, its determinism, and its
place among torchrun's processes."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} requested but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s): cuda:0 and up")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use cpu or cuda")
    return device


CPU_BF16_SWITCH = "RESNET_STUDY_CPU_BF16"  # 1: `auto` trains in bf16 on the CPU, 0: in fp32


def cpu_has_bf16() -> bool:
    """Whether `auto` takes this CPU for one with native bf16: detected, unless the switch says."""
    switch = os.environ.get(CPU_BF16_SWITCH, "")
    if switch not in ("", "0", "1"):
        raise UsageError(f"{CPU_BF16_SWITCH} must be 0 (fp32) or 1 (bf16), not {switch!r}")
    if switch:
        return switch == "1"
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32. bf16 needs no loss scaling, so it is preferred.

    `auto` picks bf16 only where the hardware computes it natively: on a CPU without
    AVX512-BF16 or AMX, oneDNN emulates bf16 and a training step runs about 8x slower than
    float32 (measured on an AVX2-only EPYC, benchmarks/RESULTS.md). `CPU_BF16_SWITCH` overrides
    that detection, so that one machine can run what either kind of CPU would.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def device_label(device: torch.device) -> str:
    """The device as a run's summary names it: the GPU's model, or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak, so that runs sharing a process (a study) each report their own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux only; elsewhere the peak is the process's
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float | None:
    """CUDA's peak allocation on a GPU, else the process's peak resident set (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        # Only on a change: torch's setter imports the inductor's config even to set the
        # default again, a second of every command's start on a CPU.
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def share_cores(processes: int) -> None:
    """This process's share of the machine's cores, as PyTorch threads, when `processes` train
    at once: each with a thread per core, two CPU workers ran at a fifth of their speed."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
