"""Logs a person can read: no progress bars from actors, no ANSI colour codes in files.

Torch-free, so the job API (which never imports torch) can pass QUIET_ENV to the jobs it submits.
"""

from __future__ import annotations

import json
import os
import sys

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
"""The environment that silences Hugging Face's and tqdm's progress bars. An actor's output reaches
the run's log through Ray's log pipe, where a bar's carriage returns are not redrawn but kept: every
model load left a "Loading weights: 0%|...|100%" line among each actor's lines (transformers reads
HF_HUB_DISABLE_PROGRESS_BARS through huggingface_hub; tqdm >= 4.66 reads TQDM_DISABLE)."""


def quiet_logs() -> None:
    """Silence progress bars in this process and in the processes it starts (a local Ray's raylet,
    and so its actors, inherit this environment; a job submitted through the API gets QUIET_ENV in
    its runtime environment). When stdout is not a terminal (a log file, a Ray Job's driver log),
    Ray's "(RolloutWorker pid=...)" prefixes are written without ANSI colour codes too (Ray reads
    RAY_COLOR_PREFIX each time it prints an actor's line). A value the user set wins."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Where a Ray Job's driver finds the job's config (Ray sets it; ray._private.runtime_env.constants)."""


def quiet_runtime_env() -> dict:
    """The job-level runtime_env for `ray.init` when joining a running cluster: QUIET_ENV (with the
    values this process holds after `quiet_logs`) in the env_vars of every actor the run starts.

    A cluster's raylets were started by someone else, so its actors do not inherit this process's
    environment the way a local Ray's do. Keys the enclosing Ray Job's runtime_env already sets are
    left out: Ray refuses to merge a job's and a driver's runtime_env that name the same variable
    (ray._private.worker.init, "Failed to merge the Job's runtime env"); the API's jobs carry
    QUIET_ENV that way (services.api.launcher)."""
    job_vars: dict = {}
    if JOB_CONFIG_VAR in os.environ:
        config = json.loads(os.environ[JOB_CONFIG_VAR])
        job_vars = (config.get("runtime_env") or {}).get("env_vars") or {}
    env_vars = {key: os.environ.get(key, value) for key, value in QUIET_ENV.items() if key not in job_vars}
    return {"env_vars": env_vars} if env_vars else {}
