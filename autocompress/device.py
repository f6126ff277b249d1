"""Where the compute happens: ``--device auto|cpu|cuda[:N]`` (the Python API's ``device=``).

``auto`` is the first CUDA GPU when one is present, else the CPU. On a GPU the base model is held
and run in bf16 (its compute dtype there); on the CPU in float32, exactly as before ``--device``
existed, so CPU results are bit-identical to earlier versions. Plans never record the device: a
plan and its hash are the same whichever device found or rebuilt it (the weights it rebuilds are
not: see the README's "Real model sizes" section).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from autocompress.errors import DeviceError

DEVICE_HELP = "Where to compute: auto (a CUDA GPU when present, else the CPU) | cpu | cuda | cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Give the torch device ``spec`` names (None means auto); refuse a malformed or absent one."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    m = _PATTERN.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {text}: no CUDA GPU is available here (torch {torch.__version__}); use cpu")
    n = torch.cuda.device_count()
    i = int(index or 0)
    if i >= n:
        raise DeviceError(f"--device {text}: this machine has {n} CUDA GPU(s) (cuda:0 to cuda:{n - 1})")
    return torch.device("cuda", i)


def compute_dtype(device: torch.device) -> torch.dtype:
    """Give the dtype the base model is held and run in on ``device``: bf16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_device(model: nn.Module) -> torch.device:
    """Give the device of ``model``'s weights (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` in its compute dtype there (in place; a no-op for a float32 model on the CPU)."""
    if device.type == "cpu":
        return model.to(device)  # the CPU keeps the dtype the model was loaded in (float32)
    return model.to(device=device, dtype=compute_dtype(device))


def cache_tag(model: nn.Module) -> str:
    """Give the suffix of disk-cache names for statistics computed with ``model``: empty for a float32
    model (the names of earlier versions), else its dtype (bf16 statistics never pass for fp32 ones)."""
    p = next(model.parameters(), None)
    return "" if p is None or p.dtype == torch.float32 else f"-{str(p.dtype).removeprefix('torch.')}"
