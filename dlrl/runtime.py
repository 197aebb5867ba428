"""Process-level runtime choices shared by every actor: device and CPU threads."""

from __future__ import annotations

import os

import torch


def pick_device(choice: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device = 'cuda' but no CUDA device is visible")
    return torch.device(choice)


def set_threads(threads: int | None) -> None:
    """torch intra-op threads. Ray pins actors to OMP_NUM_THREADS=num_cpus; in sync mode the
    rollout and learner actors take turns, so each may use every core (None)."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process's work: CUDA peak allocated on a GPU, else peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
