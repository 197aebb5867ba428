"""The `dlrl` client commands against a real `dlrl serve` (real Ray, real Redis), and the server's
refusal to start without a token.

    dlrl submit spec.toml --wait     progress lines of steps and reward, exit 0 on SUCCEEDED, 1 otherwise
    dlrl jobs / status / logs [-f] / checkpoints / stop
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.local_cluster import free_port
from services.cli import progress_line
from tests.test_api import TINY, ApiServer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "train.steps=2", "--set", "eval.every=2", "--set", "eval.steps=5", "--set", "task.eval_size=4",
         "--set", "rollout.prompts_per_step=4", "--set", "rollout.group_size=4", "--set", "rollout.steps=5",
         "--set", "train.n_mc=2"]


@pytest.fixture(scope="module")
def api(redis_server, ray_cluster, tmp_path_factory) -> Iterator[ApiServer]:
    server = ApiServer(redis_server.url, ray_cluster.dashboard_url, tmp_path_factory.mktemp("cli-runs")).start()
    yield server
    server.stop()


def dlrl(api: ApiServer | None, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DLRL_API")}
    if api is not None:
        base.update(DLRL_API_URL=api.url, DLRL_API_TOKEN=api.token)
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_submit_wait_shows_progress_and_the_other_commands_see_the_job(api: ApiServer):
    run = dlrl(api, "submit", str(TINY), *SMALL, "--set", "name=cli-tiny", "--wait", "--poll", "0.5", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    first = run.stdout.splitlines()[0]
    assert first.startswith("submitted j-") and "(cli-tiny)" in first
    job_id = first.split()[1]
    bars = [line for line in run.stderr.splitlines() if line.startswith(("PENDING", "RUNNING", "SUCCEEDED"))]
    assert bars[-1].startswith("SUCCEEDED") and "2/2 steps" in bars[-1] and "reward" in bars[-1] and "v2" in bars[-1]
    assert any("[" in b and "reward" in b and b.startswith("RUNNING") for b in bars)  # seen while it ran

    listed = dlrl(api, "jobs", "--state", "SUCCEEDED")
    assert listed.returncode == 0 and job_id in listed.stdout and "cli-tiny" in listed.stdout
    status = dlrl(api, "status", job_id)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "latest: reward" in status.stdout
    logs = dlrl(api, "logs", job_id, "--tail", "0")
    assert logs.returncode == 0 and "step    2/2" in logs.stdout
    follow = dlrl(api, "logs", "-f", job_id)  # the job is over: the stream ends by itself
    assert follow.returncode == 0 and "step    2/2" in follow.stdout
    ckpt = dlrl(api, "checkpoints", job_id)
    assert ckpt.returncode == 0 and ckpt.stdout.startswith("checkpoint ")
    stop = dlrl(api, "stop", job_id)
    assert stop.returncode == 1 and "HTTP 409" in stop.stderr and "already ended" in stop.stderr


def test_submit_wait_exits_nonzero_when_the_job_fails(api: ApiServer):
    run = dlrl(api, "submit", str(TINY), *SMALL, "--set", "name=cli-broken", "--set", "model.path=builtin:no-such-model",
               "--wait", "--poll", "0.5", "-q", timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    job_id = run.stdout.strip()
    assert job_id.startswith("j-")
    status = dlrl(api, "status", job_id, "--json")
    assert '"state": "FAILED"' in status.stdout
    assert "no-such-model" in dlrl(api, "logs", job_id, "--tail", "0").stdout


def test_client_errors_are_plain_messages(api: ApiServer):
    bad = dlrl(api, "submit", str(TINY), "--set", "rollout.block_length=6")
    assert bad.returncode == 2 and "rollout" in bad.stderr and "not a multiple" in bad.stderr  # caught locally
    wrong = dlrl(api, "jobs", "--token", "wrong")
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
    unknown = dlrl(api, "status", "j-000000000000")
    assert unknown.returncode == 1 and "HTTP 404" in unknown.stderr
    down = dlrl(None, "jobs", "--api-url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the job API" in down.stderr


def test_serve_refuses_to_start_open_unless_told_and_on_loopback(tmp_path, redis_server):
    no_token = dlrl(None, "serve", "--port", str(free_port()), env={"DLRL_API_TOKEN": "", "DLRL_API_TOKEN_FILE": ""})
    assert no_token.returncode == 2 and "no API token" in no_token.stderr
    public = dlrl(None, "serve", "--host", "0.0.0.0", "--insecure-open", "--port", str(free_port()))
    assert public.returncode == 2 and "loopback" in public.stderr
    missing = dlrl(None, "serve", "--port", str(free_port()), env={"DLRL_API_TOKEN_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 2 and "DLRL_API_TOKEN_FILE" in missing.stderr

    short = dlrl(None, "serve", "--port", str(free_port()), env={"DLRL_API_TOKEN": "x"})
    assert short.returncode == 2 and "the API token is 1 characters long; it must have at least 16" in short.stderr
    (tmp_path / "short").write_text("fifteen-chars-x\n")
    short_file = dlrl(None, "serve", "--port", str(free_port()),
                      env={"DLRL_API_TOKEN": "", "DLRL_API_TOKEN_FILE": str(tmp_path / "short")})
    assert short_file.returncode == 2 and "at least 16" in short_file.stderr

    # A token from a secret file.
    (tmp_path / "token").write_text("file-token-0123456789\n")
    server = ApiServer(redis_server.url, "http://127.0.0.1:1", tmp_path, token="")
    server.env["DLRL_API_TOKEN_FILE"] = str(tmp_path / "token")
    server.start()
    try:
        assert httpx.get(server.url + "/v1/jobs", timeout=10).status_code == 401
        ok = httpx.get(server.url + "/v1/jobs", headers={"Authorization": "Bearer file-token-0123456789"}, timeout=10)
        assert ok.status_code == 200
    finally:
        server.stop()
    # Open, on loopback, only when asked.
    server = ApiServer(redis_server.url, "http://127.0.0.1:1", tmp_path, "--insecure-open", token="")
    server.start()
    try:
        assert httpx.get(server.url + "/v1/jobs", timeout=10).status_code == 200
    finally:
        server.stop()


def test_progress_line():
    job = {"state": "RUNNING", "progress": {"step": 3, "total_steps": 12, "fraction": 0.25},
           "reward": 0.5312, "eval_reward": 0.42, "policy_version": 3}
    assert progress_line(job, width=8) == "RUNNING    [##------]  3/12 steps  reward 0.531  eval 0.420  v3"
    fresh = {"state": "PENDING", "progress": {"step": 0, "total_steps": 5, "fraction": 0.0},
             "reward": None, "eval_reward": None, "policy_version": None}
    assert progress_line(fresh, width=4) == "PENDING    [----]  0/5 steps"


def test_train_resume_without_a_checkpoint_is_a_plain_error(tmp_path):
    run = dlrl(None, "train", str(TINY), "--resume", "--set", f"runtime.out_dir={tmp_path}", "--set", "name=never-ran")
    assert run.returncode == 2 and "cannot resume" in run.stderr, run.stderr[-2000:]


def test_serve_refuses_bad_settings(tmp_path):
    env = {"DLRL_API_TOKEN": "t"}
    missing = dlrl(None, "serve", "--port", str(free_port()), "--settings", str(tmp_path / "nope.toml"), env=env)
    assert missing.returncode == 2 and "cannot read settings file" in missing.stderr
    (tmp_path / "api.toml").write_text('[admission]\nallow_everything = true\n')
    unknown = dlrl(None, "serve", "--port", str(free_port()), "--settings", str(tmp_path / "api.toml"), env=env)
    assert unknown.returncode == 2 and "unknown admission settings ['allow_everything']" in unknown.stderr
    negative = dlrl(None, "serve", "--port", str(free_port()), "--rate-limit", "-1", env=env)
    assert negative.returncode == 2 and "rate_limit_per_minute must be a non-negative integer" in negative.stderr
    for flag, value, words in [("--header-timeout", "0", "header_timeout_s must be a number of seconds"),
                               ("--body-timeout", "-1", "body_timeout_s must be a number of seconds"),
                               ("--max-connections", "0", "max_connections must be a positive integer"),
                               ("--max-connections", "100000000", "lower max_connections or raise the limit")]:
        bad = dlrl(None, "serve", "--port", str(free_port()), flag, value, env={"DLRL_API_TOKEN": "t" * 16})
        assert bad.returncode == 2 and words in bad.stderr, (flag, bad.stderr)
