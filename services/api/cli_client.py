"""The API-client half of `dlrl`: submit, follow and inspect jobs of a running `dlrl serve`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from dlrl.config import JobSpec

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def progress_line(job: dict[str, Any], width: int = 24) -> str:
    """`RUNNING   [######------------------]  3/10 steps  reward 0.531  eval 0.420  v3`"""
    p = job.get("progress") or {}
    step, total = p.get("step", 0), p.get("total_steps", 0)
    filled = int(width * min(max(p.get("fraction", 0.0), 0.0), 1.0))
    parts = [f"{job.get('state', '?'):<9}", f"[{'#' * filled}{'-' * (width - filled)}]", f"{step}/{total} steps"]
    if job.get("reward") is not None:
        parts.append(f"reward {job['reward']:.3f}")
    if job.get("eval_reward") is not None:
        parts.append(f"eval {job['eval_reward']:.3f}")
    if job.get("policy_version") is not None:
        parts.append(f"v{job['policy_version']}")
    return "  ".join(parts)


def submit(client: Any, spec: JobSpec, args: argparse.Namespace) -> int:
    job = client.submit(spec, idempotency_key=args.idempotency_key)
    if args.quiet:
        print(job["id"], flush=True)
    elif args.json and not args.wait:
        print(json.dumps(job, indent=2))
    else:
        print(f"submitted {job['id']} ({job['name']}): {job['state']}", flush=True)
        print(f"  dashboard: {job['links']['dashboard_job'] or job['links']['dashboard']}", flush=True)
    if not args.wait:
        return 0
    try:
        job = wait(client, job["id"], args.poll, quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"\ndlrl: stopped watching; the job goes on (dlrl stop {job['id']} ends it)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(job, indent=2))
    return 0 if job["state"] == "SUCCEEDED" else 1


def wait(client: Any, job_id: str, poll_s: float = 2.0, quiet: bool = False, out: Any = None,
         patience_s: float = 120.0) -> dict[str, Any]:
    """Poll the job until it ends, drawing a progress bar (rewritten in place on a terminal, a new
    line per change otherwise). Rides out an API restart of up to `patience_s`."""
    from services.api.client import ApiError

    out = out or sys.stderr
    tty = out.isatty()
    last, failing_since = "", None
    while True:
        try:
            job = client.job(job_id)
            failing_since = None
        except ApiError as exc:
            if exc.status not in (0, 502, 503, 504):
                raise
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > patience_s:
                raise
            time.sleep(poll_s)
            continue
        line = progress_line(job)
        if not quiet and line != last:
            out.write(("\r" + line + "\033[K") if tty else line + "\n")
            out.flush()
            last = line
        if job["state"] in FINAL_STATES:
            if not quiet:
                if tty:
                    out.write("\n")
                if job.get("message") and job["state"] != "SUCCEEDED":  # why it failed or stopped
                    out.write(f"{job['state']}: {job['message']}\n")
                out.flush()
            return job
        time.sleep(poll_s)


def _jobs(client: Any, args: argparse.Namespace) -> int:
    page = client.jobs(state=args.state, limit=args.limit, cursor=args.cursor)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    print(f"{'ID':<16} {'NAME':<20} {'STATE':<10} {'STEP':>11} {'REWARD':>7} {'EVAL':>7}  CREATED")
    for j in page["jobs"]:
        p = j["progress"]
        reward = f"{j['reward']:.3f}" if j["reward"] is not None else "-"
        evr = f"{j['eval_reward']:.3f}" if j["eval_reward"] is not None else "-"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created"]))
        print(f"{j['id']:<16} {j['name'][:20]:<20} {j['state']:<10} {p['step']:>5}/{p['total_steps']:<5} "
              f"{reward:>7} {evr:>7}  {created}")
    if page["next_cursor"] is not None:
        print(f"(more: dlrl jobs --cursor {page['next_cursor']})")
    return 0


def _status(client: Any, args: argparse.Namespace) -> int:
    job = client.job(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(f"{job['id']}  {job['name']}")
    print("  " + progress_line(job))
    if job.get("message"):
        print(f"  message: {job['message']}")
    if job.get("latest_metrics"):
        m = job["latest_metrics"]
        # loss and |d| only where they moved: on-policy with one update per batch d = 0 exactly and
        # the loss is 0 by construction (services.driver.progress.loss_moves)
        moved = ("loss", "d_abs") if m.get("d_abs") else ()
        keys = [k for k in ("reward", "reward_std_in_group", "zero_adv_groups", *moved, "grad_norm", "step_seconds")
                if isinstance(m.get(k), (int, float))]
        print("  latest: " + "  ".join(f"{k} {m[k]:.4g}" for k in keys))
    print(f"  run dir: {job['run_dir']}")
    print(f"  dashboard: {job['links']['dashboard_job'] or job['links']['dashboard']}")
    return 0


def _stop(client: Any, args: argparse.Namespace) -> int:
    job = client.stop(args.job_id)
    print(json.dumps(job, indent=2) if args.json else f"stopping {job['id']}: {job['state']}")
    return 0


def _resume(client: Any, args: argparse.Namespace) -> int:
    """`dlrl resume ID`: the job starts again from its last checkpoint, in the same run folder."""
    job = client.resume(args.job_id)
    if args.json and not args.wait:
        print(json.dumps(job, indent=2))
        return 0
    print(f"resuming {job['id']} ({job['name']}) from step {job['progress']['step']}: {job['state']}", flush=True)
    if not args.wait:
        return 0
    try:
        job = wait(client, job["id"], args.poll)
    except KeyboardInterrupt:
        print(f"\ndlrl: stopped watching; the job goes on (dlrl stop {job['id']} ends it)", file=sys.stderr)
        return 130
    return 0 if job["state"] == "SUCCEEDED" else 1


def _checkpoints(client: Any, args: argparse.Namespace) -> int:
    data = client.checkpoints(args.job_id)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for c in data["checkpoints"]:
        step = c["step"] if c["step"] is not None else "-"
        print(f"{c['path']:<30} step {step!s:>6}  {c['size_bytes'] / 2**20:8.1f} MiB  "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(c['mtime']))}")
    return 0


def _logs(client: Any, args: argparse.Namespace) -> int:
    if args.follow:
        for chunk in client.follow_logs(args.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(client.logs(args.job_id, tail=args.tail))
    return 0


COMMANDS = {"jobs": _jobs, "status": _status, "stop": _stop, "resume": _resume, "checkpoints": _checkpoints,
            "logs": _logs}

