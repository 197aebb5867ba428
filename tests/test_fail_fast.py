"""Fail fast, say it once (issue 21): a spec that cannot run fails before or right after Ray
starts, with one line that says why and what to do.

- The cluster check (services/driver/resources.py): a `device = "cuda"` job on the test's real,
  CPU-only Ray head (no autoscaler) fails within seconds, naming the request and the remedy,
  in-process and as a real `dlrl train` process; the comparison itself is checked on hand-made
  capacities, an autoscaler's included.
- `dlrl validate` (dlrl/resolve.py): a missing model folder, a built-in model typo, an unknown
  task and a missing data file are each one line, exit 2, with the close name where there is one.
- A run whose actors raise in their `__init__` prints the root cause once, as its last line, and
  keeps the traceback in <run>/error.log.
- The smaller front-door items: `dlrl plan` of the tiny CPU job without --gpus, `dlrl --version`,
  `dlrl validate` printing TOML (and field docs with --explain).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from dlrl import footprint
from dlrl.config import JobSpec
from services.cli import load_spec, main
from services.driver.placement import plan_placement
from services.driver.resources import Capacity, CapacityError, shortfall

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "deploy/jobs/tiny-sudoku.toml"
SMALL = ["train.steps=1", "eval.every=1", "eval.steps=5", "task.eval_size=2", "rollout.prompts_per_step=2",
         "rollout.group_size=2", "rollout.steps=5", "train.n_mc=1", "runtime.max_restarts=0"]
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\((\w+) pid=")
"""A line Ray streamed from an actor's stdout/stderr (log_to_driver), e.g. "(RolloutWorker pid=12)"."""


def tiny(*overrides: str) -> JobSpec:
    return load_spec(str(TINY), [*SMALL, *overrides])


# ---------------------------------------------------------------- the cluster check


def test_shortfall_names_the_request_what_the_cluster_has_and_the_remedy():
    cuda = tiny("runtime.device=cuda", "rollout.num_workers=2")
    placement = plan_placement(cuda, 0)
    cpu_only = Capacity(total={"CPU": 16, "GPU": 0}, largest_node={"CPU": 16, "GPU": 0}, autoscaler=False)
    why = shortfall(cuda, placement, cpu_only)
    assert why.startswith("runtime.device = 'cuda' asks for 1 GPU per learner rank (x1) and 1 GPU per rollout "
                          "worker (x2): 3 GPUs in all; this cluster has 0 GPUs and no autoscaler")
    assert "set runtime.device = 'cpu'" in why and "connect to a cluster with GPUs" in why
    # An autoscaler that can add eight 1-GPU nodes: the job fits, though no GPU is up now.
    scaling = Capacity(total={"CPU": 64, "GPU": 8}, largest_node={"CPU": 8, "GPU": 1}, autoscaler=True)
    assert shortfall(cuda, placement, scaling) is None
    # ... but not a learner rank that wants 2 GPUs on one node.
    two = tiny("runtime.device=cuda", "runtime.learner_gpus=2")
    assert "2 GPUs per learner rank, on one node; the largest node this cluster has or can add has 1" in \
        shortfall(two, plan_placement(two, 0), scaling)
    # CPUs: a cuda job's actors take one CPU each.
    small = Capacity(total={"CPU": 2, "GPU": 8}, largest_node={"CPU": 2, "GPU": 8}, autoscaler=False)
    assert "3 CPUs in all; this cluster has 2 CPUs and no autoscaler: lower rollout.num_workers" in \
        shortfall(cuda, placement, small)
    # The CPU job shares one CPU among all its actors: it fits the smallest machine.
    assert shortfall(tiny(), plan_placement(tiny(), 0), cpu_only) is None


def test_cuda_job_on_a_cluster_without_gpus_fails_in_seconds(ray_cluster, tmp_path):
    """The real Ray head of the tests (2 CPUs, no GPU, no autoscaler): `run` raises CapacityError
    well before the placement timeout (600 s) would have ended the wait."""
    from services.driver.driver import run

    spec = tiny("runtime.device=cuda", "name=cuda-here", f"runtime.out_dir={tmp_path}")
    t0 = time.monotonic()
    with pytest.raises(CapacityError, match=r"this cluster has 0 GPUs and no autoscaler: set runtime.device = 'cpu'"):
        run(spec)
    assert time.monotonic() - t0 < 60  # the placement timeout is 600 s


def test_a_weights_hand_over_past_its_timeout_names_the_setting(ray_cluster, tmp_path):
    """The first weights version waits for the learner's start; past runtime.publish_timeout_s the
    run fails with the setting's name and the remedy, not Ray's bare GetTimeoutError."""
    from services.driver.driver import run

    spec = tiny("runtime.publish_timeout_s=0.01", "name=slow-start", f"runtime.out_dir={tmp_path}")
    with pytest.raises(TimeoutError, match=r"^the learner did not hand over weights version 0 within "
                                           r"runtime\.publish_timeout_s = 0\.01 s \(a new learner's first version "
                                           r"waits for its start.*raise runtime\.publish_timeout_s"):
        run(spec)
    assert JobSpec().runtime.publish_timeout_s == 1800  # the driver's wait for any learner call


def _train(ray_cluster, tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """`dlrl train` as its own process, joining the test's Ray head (its console as a user sees it)."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    sets = [x for o in [*SMALL, f"runtime.out_dir={tmp_path}", *overrides] for x in ("--set", o)]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "train", str(TINY), *sets], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, time.monotonic() - t0


def test_dlrl_train_of_a_cuda_job_without_gpus_ends_with_the_remedy(ray_cluster, tmp_path):
    proc, seconds = _train(ray_cluster, tmp_path, "runtime.device=cuda", "name=cuda-cli")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dlrl: CapacityError: runtime.device = 'cuda' asks for 1 GPU per learner rank"), last
    assert "no autoscaler: set runtime.device = 'cpu'" in last
    assert "Traceback" not in proc.stderr and "No available node types" not in proc.stderr + proc.stdout
    assert "Traceback" in (tmp_path / "cuda-cli/error.log").read_text()
    assert seconds < 180, seconds  # process start and imports included; it waited 600 s before


@pytest.mark.slow
def test_a_run_failing_in_an_actor_says_its_root_cause_once_as_its_last_line(ray_cluster, tmp_path):
    """A checkpoint folder whose config.json is torn passes `dlrl validate` (it is a folder with a
    config.json) and fails in the learner's and the workers' __init__: the driver does not rebuild a
    learner whose __init__ raised, its own output names the actor's error once, as its last line,
    and the full traceback is in <run>/error.log."""
    model = tmp_path / "torn-checkpoint"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": ')
    message = f"no model checkpoint at local path '{model}': check the path"
    proc, _ = _train(ray_cluster, tmp_path, f"model.path={model}", "name=torn", "runtime.max_restarts=3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines[-1] == f"dlrl: dlrl.models.loading.CheckpointNotFoundError: {message}", lines[-5:]
    own = [line for line in lines if not RAY_PREFIX.match(line)]  # the driver's lines, not the actors'
    assert sum(message in line for line in own) == 1, "\n".join(own)
    assert not any("Traceback" in line for line in own), "\n".join(own)
    assert "restarted from step" not in proc.stdout  # an __init__ that raised is not rebuilt 3 times
    log = (tmp_path / "torn/error.log").read_text()
    assert "Traceback" in log and message in log


def test_root_cause_peels_ray_and_the_drivers_wrappers():
    """What the driver catches, built as Ray builds it: a task's exception inside RayTaskError
    inside the driver's RolloutFailed; an __init__'s exception in an ActorDiedError's message
    inside LearnerDied. An error the code raised about something else stays itself."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from services.driver.driver import RolloutFailed
    from services.driver.failure import one_line
    from services.driver.learner_group import LearnerDied

    try:
        raise ValueError("no data file 'x.jsonl'")
    except ValueError as inner:
        task_error = RayTaskError("RolloutWorker.rollout_to_queue", "Traceback ...\nValueError: no data file 'x.jsonl'",
                                  inner).as_instanceof_cause()
    try:
        raise RolloutFailed(f"dlrl: rollout worker 0 failed on rollout batch 3: {task_error}") from task_error
    except RolloutFailed as wrapped:
        assert one_line(wrapped) == "ValueError: no data file 'x.jsonl'"
    init = RayTaskError("Learner.__init__", 'Traceback (most recent call last):\n  File "learner/train.py", line 1\n'
                        "dlrl.models.loading.CheckpointNotFoundError: no model checkpoint at '/m'", OSError("x"))
    died = ActorDiedError(init)
    assert died.actor_init_failed
    assert one_line(LearnerDied(died)) == "dlrl.models.loading.CheckpointNotFoundError: no model checkpoint at '/m'"
    assert one_line(TimeoutError("dlrl: the final evaluation did not answer within 600s")) == \
        "TimeoutError: dlrl: the final evaluation did not answer within 600s"


# ---------------------------------------------------------------- dlrl validate: what the spec names


@pytest.mark.parametrize("overrides,expected", [
    (["model.path=/nonexistent/model"], "model.path: no model checkpoint at '/nonexistent/model': no such folder"),
    (["model.path=builtin:tiny-sudok"], "model.path: no built-in model 'builtin:tiny-sudok'; did you mean "
                                        "'builtin:tiny-sudoku' or 'builtin:tiny-sudoku-block'?"),
    (["task.name=sudok"], "task.name: unknown task 'sudok'; did you mean 'sudoku'?"),
    (["task.name=math", 'task.options={"path": "/nonexistent/problems.jsonl"}'],
     "task.options.path: no data file '/nonexistent/problems.jsonl'"),
])
def test_validate_finds_what_will_not_resolve_one_line_each(overrides, expected, capsys):
    args = ["validate", str(TINY)] + [x for o in overrides for x in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "dlrl: the spec names what is not there:"
    assert len(err) == 2 and err[1].strip().startswith(expected), err


def test_train_refuses_a_missing_data_file_before_starting_ray(tmp_path, capsys):
    missing = tmp_path / "gone/{split}.jsonl"
    assert main(["train", str(TINY), "--set", "task.name=math", "--set", f'task.options={{"path": "{missing}"}}',
                 "--set", f"runtime.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"no data file '{tmp_path}/gone/test.jsonl'" in err and f"'{tmp_path}/gone/train.jsonl'" in err
    assert not (tmp_path / "tiny-sudoku").exists()  # nothing started


def test_validate_passes_what_resolves(tmp_path, capsys):
    data = tmp_path / "problems.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    assert main(["validate", str(TINY), "--set", "task.name=math", "--set", f'task.options={{"path": "{data}"}}',
                 "--set", f"model.path={ROOT / 'dlrl/assets/tiny-sudoku'}"]) == 0


# ---------------------------------------------------------------- the smaller front-door items


def test_validate_prints_the_resolved_spec_as_toml_and_explains_fields(capsys):
    assert main(["validate", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert JobSpec.model_validate(tomllib.loads(out)) == JobSpec.from_toml(TINY)
    assert out.startswith('name = "tiny-sudoku"\n\n[model]\n')
    assert main(["validate", "--explain", str(TINY)]) == 0
    explained = capsys.readouterr().out
    assert JobSpec.model_validate(tomllib.loads(explained)) == JobSpec.from_toml(TINY)
    assert "# Run name: the folder under out_dir.\nname = \"tiny-sudoku\"" in explained
    assert "# Prompts (groups) per learner step.\nprompts_per_step = 16" in explained
    assert main(["validate", "--explain"]) == 0  # no spec: the defaults, documented
    assert JobSpec.model_validate(tomllib.loads(capsys.readouterr().out)) == JobSpec()


def test_plan_of_the_tiny_cpu_job_needs_no_gpus_and_prints_real_numbers(capsys):
    assert main(["plan", str(TINY)]) == 0
    out = capsys.readouterr().out
    params = footprint.job_shape(JobSpec.from_toml(TINY)).params()
    assert 0.5e6 < params < 1e6 and f"{params / 1e6:.2f} M params" in out
    assert "compute float32 (auto, on the CPU)" in out and "compute auto," not in out
    assert "batch 128 (spec: 128)" in out and "0.00 B" not in out and " 0.0 GB" not in out
    assert "this host:" in out and out.strip().endswith("fits")
    assert main(["plan", str(TINY), "--set", "runtime.device=cuda"]) == 2
    assert "give the cluster's --gpus and --gpu-memory" in capsys.readouterr().err


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dlrl {importlib.metadata.version('dlrl')}"
