"""The checkpoints a job's run has written: HF folders under its run directory, found on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.api.views import CheckpointInfo

_CHECKPOINT_MARKERS = ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors")


def list_checkpoints(run_dir: Path, max_depth: int = 3) -> list[CheckpointInfo]:
    """HF checkpoint folders under the run directory (half-written `.tmp-*` / `.old` ones skipped)."""
    found: list[CheckpointInfo] = []
    if not run_dir.is_dir():
        return found
    for root, dirs, files in os.walk(run_dir):
        here = Path(root)
        depth = len(here.relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if ".tmp-" not in d and not d.endswith(".old")) if depth < max_depth else []
        if depth == 0 or not any(m in files for m in _CHECKPOINT_MARKERS):
            continue
        size, mtime = 0, 0.0
        for sub, _, names in os.walk(here):
            for name in names:
                try:
                    st = (Path(sub) / name).stat()
                except OSError:
                    continue  # replaced while we looked
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
        step, version = _step_and_version(here)
        found.append(CheckpointInfo(name=here.name, path=str(here.relative_to(run_dir)), step=step,
                                    policy_version=version, size_bytes=size, mtime=mtime))
    return found


def checkpoint_step(path: Path) -> int | None:
    """The learner step a checkpoint folder resumes from (None: no resume state there)."""
    return _step_and_version(path)[0]


def _step_and_version(path: Path) -> tuple[int | None, int | None]:
    """(learner step, policy version) from the resume state saved with the checkpoint, if any."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(state, dict):
        return None, None
    step = state.get("step")
    version = state.get("version")
    return (step if isinstance(step, int) else None), (version if isinstance(version, int) else None)
