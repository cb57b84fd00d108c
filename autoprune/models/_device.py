"""The compute device a worker runs on, checked before any model is loaded."""

from __future__ import annotations

import torch

from autoprune.errors import AutopruneError


def compute_device(name: str) -> torch.device:
    """``name`` as a device this machine has. A mistyped or absent device is the user's mistake,
    said in one line, not torch's traceback from the first transfer after a model load."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutopruneError(f"unknown device {name!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= available:
            raise AutopruneError(
                f"device {name!r} is not on this machine ({available} CUDA devices)"
            )
    return device
