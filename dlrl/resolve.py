"""Whether what a job spec names exists: its model, its task and its data files.

A spec can be valid as a type and still name things that are not there: a model folder that was
never written, `builtin:tiny-sudok`, a task `sudoku2`, a data file that moved. Without this check
such a job starts Ray, places its actors, and fails 14-41 s later inside one of them. `problems`
finds these before anything starts, reading folders and config files only (never weights, never a
network call: a hub id is checked only when the hub is off, HF_HUB_OFFLINE, against the local cache);
`dlrl validate` and `dlrl train` print each problem as one line. A close name is suggested where
the name is a typo of a known one (difflib, as argparse does for sub-commands).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

from dlrl.config import JobSpec, TaskSpec

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent / "assets"
"""Where `builtin:<name>` models live (the same folder dlrl.models.loading reads)."""
MODEL_FILES = ("config.json", "adapter_config.json")
"""A checkpoint folder holds one of these (a full model, or a LoRA adapter over a base)."""


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def builtin_models() -> list[str]:
    return (sorted(f"{BUILTIN_PREFIX}{p.name}" for p in ASSETS.iterdir() if (p / "config.json").is_file())
            if ASSETS.is_dir() else [])


def model_problem(path: str) -> str | None:
    """Why `model.path` will not load, or None (a hub id is taken on trust unless the hub is off)."""
    if path.startswith(BUILTIN_PREFIX):
        if (ASSETS / path.removeprefix(BUILTIN_PREFIX)).is_dir():
            return None
        known = builtin_models()
        return (f"model.path: no built-in model {path!r}{_did_you_mean(path, known)} "
                f"(built-in models: {', '.join(known) or 'none'})")
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():
        if not local.is_dir():
            return f"model.path: no model checkpoint at {path!r}: no such folder"
        if not any((local / f).is_file() for f in MODEL_FILES):
            return f"model.path: {path!r} is a folder but no checkpoint: it has no {' or '.join(MODEL_FILES)}"
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return (f"model.path: no folder {path!r} here, and it is no hub id (org/name): check the path "
                f"(builtin:<name> for a shipped model: {', '.join(builtin_models())})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            return (f"model.path: hub model {path!r} is not in the local cache and HF_HUB_OFFLINE is set: "
                    f"download it first (huggingface-cli download {path}) or unset HF_HUB_OFFLINE")
    return None


def task_problem(task: TaskSpec) -> str | None:
    """Why `task.name` names no task, or None. An import path is looked up (its module found, not
    run: running it is the job's business, and where import paths are allowed is dlrl.tasks')."""
    from dlrl.tasks import TASKS

    name = task.name
    if name in TASKS:
        return None
    if ":" not in name:
        return (f"task.name: unknown task {name!r}{_did_you_mean(name, sorted(TASKS))} "
                f"(known tasks: {', '.join(sorted(TASKS))}; or an import path 'package.module:factory')")
    module, _, attr = name.partition(":")
    try:
        found = importlib.util.find_spec(module) if module and attr else None
    except (ImportError, ValueError):
        found = None
    if found is None:
        return f"task.name: cannot find the module of task import path {name!r} ('package.module:factory')"
    return None


def data_problems(task: TaskSpec) -> list[str]:
    """Data files the task's options name that are not there. A path with "{split}" names one file
    per split; a job reads both (train for rollouts, test for evaluation)."""
    from dlrl.tasks.data_root import DataPathError, resolve_data_path

    out = []
    for key, value in task.options.items():
        if key != "path" and not key.endswith("_path"):
            continue
        if not isinstance(value, str):
            continue
        for one in sorted({value.replace("{split}", s) for s in ("train", "test")}):
            try:
                full = resolve_data_path(one)
            except DataPathError as exc:
                out.append(f"task.options.{key}: {exc}")
                continue
            if not full.is_file():
                out.append(f"task.options.{key}: no data file {one!r}" + ("" if one == value else f" (from {value!r})"))
    return out


def problems(spec: JobSpec) -> list[str]:
    """Everything the spec names that will not resolve, one line each ([] when all is there)."""
    found = [model_problem(spec.model.path), task_problem(spec.task), *data_problems(spec.task)]
    return [p for p in found if p]
