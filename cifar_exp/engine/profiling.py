"""torch.profiler over a few training steps (trainer.profile_steps, debug=profile): where a
step's time goes, operator by operator, and its timeline."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity

# The steps before the profiled ones pay for warm-up (lazy initialisation, cuDNN's algorithm
# search, compilation): skipped, then traced but not kept.
SKIPPED, WARMUP = 1, 1


def activities(device: torch.device) -> list[ProfilerActivity]:
    """What to trace on `device`: the CPU, and the GPU's kernels on a CUDA device."""
    return [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")


def steps_profiler(
    steps: int, device: torch.device, on_ready: Callable[[torch.profiler.profile], None]
) -> torch.profiler.profile:
    """A profiler of training steps SKIPPED + WARMUP + 1 to + `steps` (the loop calls its
    `step()` after each training step); `on_ready` gets it once they are recorded, or when it
    stops before (an epoch with fewer steps)."""
    return torch.profiler.profile(
        activities=activities(device),
        schedule=torch.profiler.schedule(wait=SKIPPED, warmup=WARMUP, active=steps, repeat=1),
        on_trace_ready=on_ready,
        record_shapes=True,
    )


def operator_table(profiler: torch.profiler.profile, rows: int = 30) -> str:
    """The operators that took the most time in themselves (on the GPU when it was profiled,
    else on the CPU), PyTorch's table."""
    on_gpu = ProfilerActivity.CUDA in profiler.activities
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
