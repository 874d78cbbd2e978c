"""On a ZeroGPU Space, functions that need the GPU must be decorated with `spaces.GPU`; elsewhere
(no `spaces` package) the decorator does nothing."""
from __future__ import annotations

import os
from typing import Callable

try:
    import spaces
except ImportError:
    spaces = None

# Seconds a ZeroGPU call may hold the GPU; a tuning run must finish within it.
GPU_SECONDS = int(os.environ.get("PETSTUDIO_GPU_SECONDS", "300"))


def gpu_bound(function: Callable) -> Callable:
    if spaces is None:
        return function
    return spaces.GPU(duration=GPU_SECONDS)(function)
