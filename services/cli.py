"""The `dlrl` command: run jobs here, or serve and use the job API.

    dlrl train deploy/jobs/tiny-sudoku.toml                 # the embedded default job, in this process
    dlrl train spec.toml --set train.steps=3 --set name=smoke
    dlrl train spec.toml --resume                           # continue from <run>/checkpoint
    dlrl train spec.toml --overwrite                        # delete the run under this name, start again
    dlrl validate spec.toml                                 # check a spec (and that its model, task and data
                                                            #  exist), print it resolved, as TOML
    dlrl validate --explain [spec.toml]                     # the same with every field's documentation
    dlrl plan spec.toml --gpus 8 --gpu-memory 80            # per-GPU memory and a learner/rollout split
    dlrl plan deploy/jobs/tiny-sudoku.toml                  # a CPU spec: sized from this host's memory
    dlrl --version

    dlrl serve --host 127.0.0.1 --port 8000                 # the job API (DLRL_API_TOKEN, DLRL_REDIS_URL,
                                                            #  DLRL_RAY_ADDRESS from the environment)
    dlrl serve --settings api.toml --data-root /srv/data --allow-model GSAI-ML/LLaDA-8B-Instruct
                                                            # its admission policy (services/README.md)
    dlrl submit spec.toml [--set k=v] [--wait]              # the client (DLRL_API_URL, DLRL_API_TOKEN)
    dlrl jobs [--state RUNNING]
    dlrl status ID
    dlrl logs ID [-f]
    dlrl stop ID
    dlrl resume ID [--wait]                                 # a stopped or failed job, from its last checkpoint
    dlrl checkpoints ID

    dlrl eval builtin:tiny-sudoku --protocol deploy/eval/tiny-sudoku.toml [--out DIR] [--limit N]
    dlrl eval runs/<run> --protocol deploy/eval/gsm8k.toml   # every checkpoint; names the best
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dlrl.config import JobSpec
from dlrl.spec_toml import to_toml
from dlrl.tasks import IMPORT_PATHS_ENV
from services.api.cli_client import COMMANDS, progress_line, submit, wait  # noqa: F401  (re-exported)
from services.driver import sigterm


def _parse_value(text: str) -> Any:
    """A --set value: JSON if it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_spec(path: str, overrides: list[str]) -> JobSpec:
    """The TOML spec with dotted `section.key=value` overrides applied, validated as a whole."""
    spec = JobSpec.from_toml(path)
    data = spec.model_dump()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"dlrl: --set needs key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"dlrl: --set {key}: {part!r} is not a section")
            node = node[part]
        node[leaf] = _parse_value(value)
    return JobSpec.model_validate(data)


def _explain(exc: ValidationError) -> str:
    lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}" for err in exc.errors()]
    return "invalid job spec:\n" + "\n".join(lines)


def _spec_arguments(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("spec", nargs="?" if optional else None, help="job spec (TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.steps=3 (repeatable)")


def _client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-url", default=None, help="job API URL (default: $DLRL_API_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", default=None, help="API token (default: $DLRL_API_TOKEN or $DLRL_API_TOKEN_FILE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlrl", description="RL for diffusion language models (BGPO).")
    parser.add_argument("--version", action="version", version=f"dlrl {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run an RL job from a TOML spec, in this process")
    _spec_arguments(train, optional=True)
    train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the run this spec's folder holds (<out_dir>/<name>) and start again")
    train.add_argument("--spec-env", metavar="VAR",
                       help="read the spec as JSON from this environment variable (how the API starts jobs)")
    train.add_argument("--job-id", help="the API's job id: mirror metrics to Redis ($DLRL_REDIS_URL)")
    validate = sub.add_parser("validate", help="validate a TOML spec (its model, task and data must exist) and "
                                               "print it with defaults")
    _spec_arguments(validate, optional=True)
    validate.add_argument("--explain", action="store_true",
                          help="document every field (the spec's, or the defaults without a spec)")
    validate.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    plan = sub.add_parser("plan", help="per-GPU memory of a job and a learner/rollout GPU split that fits")
    _spec_arguments(plan)
    plan.add_argument("--gpus", type=int, default=None,
                      help="GPUs in the cluster (a CPU spec: none needed, it is sized from this host's memory)")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                      help="memory of each GPU (1e9 bytes)")
    plan.add_argument("--prompt-length", type=int, default=256, metavar="TOKENS",
                      help="longest prompt in tokens, chat template included (default 256)")

    serve = sub.add_parser("serve", help="run the job API (token from $DLRL_API_TOKEN or $DLRL_API_TOKEN_FILE)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--runs-dir", default=None, help="where job runs are written (default: $DLRL_RUNS_DIR or ./runs)")
    serve.add_argument("--settings", metavar="FILE", help="settings file (TOML; services/README.md); flags override it")
    serve.add_argument("--max-active-jobs", type=int, default=None,
                       help="pending+running jobs before submissions get 429 (0: accept none; default 4)")
    serve.add_argument("--max-body-kib", type=int, default=None, help="request body limit (413 beyond; default 64)")
    serve.add_argument("--rate-limit", type=int, default=None, metavar="N",
                       help="requests per token per minute before 429 (default 600)")
    serve.add_argument("--submit-limit", type=int, default=None, metavar="N",
                       help="jobs a token may start per minute (default 10)")
    serve.add_argument("--header-timeout", type=float, default=None, metavar="S",
                       help="seconds a client has to send a request's headers (default 10)")
    serve.add_argument("--body-timeout", type=float, default=None, metavar="S",
                       help="seconds a client has to send a request's body once its headers are in (default 30)")
    serve.add_argument("--max-connections", type=int, default=None, metavar="N",
                       help="open connections before a new one gets 503 (default 512)")
    serve.add_argument("--max-job-seconds", type=float, default=None, metavar="S",
                       help="wall-clock limit of one job; it is stopped past it (default 86400)")
    serve.add_argument("--data-root", default=None, metavar="DIR",
                       help="task data files must lie here (default: $DLRL_DATA_ROOT; none: file options refused)")
    serve.add_argument("--model-root", dest="model_roots", action="append", default=None, metavar="DIR",
                       help="a folder whose checkpoints jobs may load (repeatable)")
    serve.add_argument("--allow-model", dest="models", action="append", default=None, metavar="ORG/NAME",
                       help="a hub model jobs may load, or ORG/* (repeatable)")
    serve.add_argument("--allow-task", dest="tasks", action="append", default=None, metavar="NAME",
                       help="a task besides the registry's, e.g. a vetted import path pkg.mod:factory (repeatable)")
    serve.add_argument("--allow-trust-remote-code", action="store_true", default=None,
                       help="let jobs set model.trust_remote_code=true")
    serve.add_argument("--insecure-open", action="store_true",
                       help="serve without a token (refused unless the host is a loopback address)")
    serve.add_argument("--log-level", default="info")

    submit = sub.add_parser("submit", help="submit a job to the API")
    _spec_arguments(submit)
    _client_arguments(submit)
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends (exit 1 unless it succeeds)")
    submit.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    submit.add_argument("--poll", type=float, default=2.0, help="seconds between progress polls")
    submit.add_argument("--json", action="store_true", help="print the job as JSON")
    submit.add_argument("-q", "--quiet", action="store_true", help="print only the job id")

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    _client_arguments(jobs)
    jobs.add_argument("--state", choices=["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"])
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--cursor", type=int, default=None, help="next_cursor of the previous page")
    jobs.add_argument("--json", action="store_true")

    for name, text in [("status", "a job's state, progress and latest metrics"), ("stop", "stop a job"),
                       ("checkpoints", "a job's checkpoints"),
                       ("resume", "resume a stopped or failed job from its last checkpoint")]:
        p = sub.add_parser(name, help=text)
        _client_arguments(p)
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true")
        if name == "resume":
            p.add_argument("--wait", action="store_true", help="show progress until the job ends")
            p.add_argument("--poll", type=float, default=2.0, help="seconds between progress polls")
    logs = sub.add_parser("logs", help="a job's log (the Ray Job's output)")
    _client_arguments(logs)
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--tail", type=int, default=200, help="last lines (0: all)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint (or every checkpoint of a run) under a protocol file")
    ev.add_argument("model", help="checkpoint folder, run directory, `builtin:<name>` or hub id")
    ev.add_argument("--protocol", required=True, help="protocol file (deploy/eval/*.toml)")
    ev.add_argument("--task", default=None, help="task name (default: the protocol's; must agree with it)")
    ev.add_argument("--out", default=None, help="output folder (default: runs/eval/<protocol>/<model>)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N examples of the eval set")
    ev.add_argument("--no-resume", action="store_true", help="start over instead of resuming --out")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own model code")

    queue = sub.add_parser("queue", help="a run's trajectory queue")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    delete = queue_sub.add_parser("delete", help="delete a run's queue state (stream, dead letters, put "
                                                 "tokens, consumers): what a SIGKILLed driver left behind")
    delete.add_argument("run_id", help="the run's id (its spec name, or the API's job id)")
    delete.add_argument("--backend", choices=["redis", "ray"], default="redis")
    delete.add_argument("--redis-url", default=None, help="default: $DLRL_REDIS_URL")
    delete.add_argument("--ray-address", default=None, help="the Ray cluster holding a 'ray' queue "
                                                            "(default: $RAY_ADDRESS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except KeyboardInterrupt:
        if args.command != "train":
            raise
        return _interrupted(args, argv, signal.SIGINT)
    except SystemExit:
        if not sigterm.received():  # SIGTERM (kill, `ray job stop`: the API's stop) while a run goes
            raise
        return _interrupted(args, argv, signal.SIGTERM)


def _command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "queue":
        return _queue_delete(args)
    if args.command == "validate" and args.explain and not args.spec:
        print(to_toml(JobSpec(), explain=True), end="")
        return 0
    if args.command in ("train", "validate", "submit", "plan"):
        spec = _read_spec(args)
        if isinstance(spec, int):
            return spec
        if (problem := _engine_problem(spec)) is not None:
            print(f"dlrl: invalid job spec:\n  rollout: {problem}", file=sys.stderr)
            return 2
        if args.command == "validate":
            return _validate(spec, args)
        if args.command == "plan":
            return _plan(spec, args)
        if args.command == "train":
            if not args.spec_env:  # a spec file on the operator's own command line: import paths allowed
                os.environ.setdefault(IMPORT_PATHS_ENV, "*")
            return _train(spec, args)
    from services.api.client import ApiClient, ApiError

    client = ApiClient.from_env(args.api_url, args.token)
    try:
        if args.command == "submit":
            return submit(client, spec, args)
        return COMMANDS[args.command](client, args)
    except ApiError as exc:
        print(f"dlrl: {exc}", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err.get('path')}: {err.get('reason')}", file=sys.stderr)
        return 1


def _interrupted(args: argparse.Namespace, argv: list[str], signum: signal.Signals) -> int:
    """Ctrl-C or SIGTERM (services.driver.sigterm): the run's actors and queue are gone (the
    driver's `finally`) and its checkpoints are whole (saved atomically); the last line says which
    step resumes and how. Exits 128 + the signal's number, as a process the signal ended."""
    import shlex

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # no actor output streamed in after the last lines (on a cluster it keeps coming)
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}"
    try:
        spec = _read_spec(args)
    except KeyboardInterrupt:
        spec = 2
    if isinstance(spec, int):
        print(f"\ndlrl: {how}", file=sys.stderr)
        return 128 + signum
    from services.driver.run_dir import last_checkpoint

    run_dir = os.path.join(spec.runtime.out_dir, spec.name)
    step = last_checkpoint(Path(run_dir))
    if args.job_id:
        again = f"dlrl resume {args.job_id}"
    else:
        again = shlex.join(["dlrl", *[a for a in argv if a not in ("--overwrite", "--resume")], "--resume"])
    if step is None:
        print(f"\ndlrl: {how} before the run's first checkpoint: nothing to resume in {run_dir}; "
              f"start it again with --overwrite", file=sys.stderr)
    else:
        print(f"\ndlrl: {how}; the last checkpoint is step {step} of {spec.train.steps} "
              f"({os.path.join(run_dir, 'checkpoint')}). Resume with:\n  {again}", file=sys.stderr)
    return 128 + signum


def _engine_problem(spec: JobSpec) -> str | None:
    """What the engine the spec names refuses in its decoding options, or None.

    The spec's schema lives in the core, which imports no role, so it checks the bounds every
    engine shares but not the engine's own rules (dlrl.decoding). This front door checks those
    before any Ray process starts; the job API, which imports no role either, leaves them to the
    job, whose workers check them first thing (rollout.engines.make_engine).
    """
    from rollout.engines import check_decoding  # lazily: rollout pulls in torch

    try:
        check_decoding(spec.rollout)
    except ValueError as exc:
        return str(exc)
    return None


def package_version() -> str:
    """The installed distribution's version; from pyproject.toml in a checkout that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dlrl")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, ValueError):
            return "unknown"


def _validate(spec: JobSpec, args: argparse.Namespace) -> int:
    """Print the resolved spec as TOML, the format it was read in (with --explain each field's
    docs; --json: JSON); exit 2, one line per problem, when its model, task or data do not resolve."""
    from dlrl.resolve import problems

    found = problems(spec)
    if found:
        print("dlrl: the spec names what is not there:\n" + "\n".join(f"  {p}" for p in found), file=sys.stderr)
        return 2
    if args.json:
        print(spec.model_dump_json(indent=2))
    else:
        print(to_toml(spec, explain=args.explain), end="")
    return 0


def _read_spec(args: argparse.Namespace) -> JobSpec | int:
    source = args.spec
    try:
        if getattr(args, "spec_env", None):
            if args.spec or args.overrides:
                print("dlrl: --spec-env takes neither a spec file nor --set", file=sys.stderr)
                return 2
            source = f"${args.spec_env}"
            text = os.environ.get(args.spec_env)
            if text is None:
                print(f"dlrl: environment variable {args.spec_env} is not set", file=sys.stderr)
                return 2
            return JobSpec.model_validate_json(text)  # JSON parsed by pydantic: never a pickle
        if not args.spec:
            print("dlrl: a spec file is needed (or --spec-env)", file=sys.stderr)
            return 2
        return load_spec(args.spec, args.overrides)
    except ValidationError as exc:
        print(f"dlrl: {_explain(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # missing file, TOML syntax
        print(f"dlrl: cannot read {source}: {exc}", file=sys.stderr)
        return 2


def _plan(spec: JobSpec, args: argparse.Namespace) -> int:
    """Print the memory plan; exit 1, with what would fit instead, when no layout fits."""
    from dlrl import footprint
    from learner.objectives import objective_for

    host = args.gpus is None and args.gpu_memory is None
    if host:  # no GPUs named: a CPU job (runtime.device 'cpu' or 'auto'), sized on this host's memory
        if spec.runtime.device == "cuda":
            print("dlrl plan: runtime.device = 'cuda': give the cluster's --gpus and --gpu-memory", file=sys.stderr)
            return 2
        args.gpus, args.gpu_memory = 1, host_memory_gb()
        print(f"planned for the CPU (runtime.device = {spec.runtime.device!r}, no --gpus): the learner and a "
              f"rollout worker share this host's {args.gpu_memory:.1f} GB; prompts of {args.prompt_length} tokens")
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"device": "cpu"})})
    elif args.gpus is None or args.gpu_memory is None:
        print("dlrl plan: give both --gpus and --gpu-memory (or neither, for a CPU job)", file=sys.stderr)
        return 2
    if args.gpus < 1 or args.gpu_memory <= 0 or args.prompt_length < 1:
        print("dlrl plan: --gpus, --gpu-memory and --prompt-length must be positive", file=sys.stderr)
        return 2
    try:
        copies = objective_for(spec.train).graph_copies  # the objective's memory term
        plan = footprint.plan(spec, args.gpus, args.gpu_memory, args.prompt_length, graph_copies=copies)
    except FileNotFoundError as exc:
        print(f"dlrl plan: {exc}", file=sys.stderr)
        return 2
    print(footprint.describe(plan, spec, host=host))
    if plan.fits:
        print("fits")
        return 0
    print(f"does not fit: this job needs more than {args.gpus} x {args.gpu_memory:g} GB "
          f"(the closest layout above). What would fit instead:")
    instead = footprint.alternatives(spec, args.gpus, args.gpu_memory, args.prompt_length, graph_copies=copies)
    for line in instead or ["nothing up to 64 GPUs of this size"]:
        print(f"  - {line}")
    return 1


def host_memory_gb() -> float:
    """This machine's physical memory in GB (1e9 bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _train(spec: JobSpec, args: argparse.Namespace) -> int:
    from services.api.launcher import adopt_redis_url_file

    from dlrl.resolve import problems

    adopt_redis_url_file()  # an API job: its Redis URL comes in a 0600 file, never in Ray's runtime env
    on_record, store = None, None
    if args.job_id:
        from services.api.jobstore import JobStore, MetricMirror

        url = os.environ.get("DLRL_REDIS_URL")
        if not url:
            print("dlrl: --job-id needs DLRL_REDIS_URL", file=sys.stderr)
            return 2
        store = JobStore.from_url(url, os.environ.get("DLRL_REDIS_PREFIX") or "dlrl")
        on_record = MetricMirror(store, args.job_id)
    if found := problems(spec):  # before Ray starts: a missing model or file fails in seconds, not in an actor
        print("dlrl: the spec names what is not there:\n" + "\n".join(f"  {p}" for p in found), file=sys.stderr)
        _record_failure(store, args.job_id, "; ".join(found))
        return 2
    from services.driver.driver import ResumeError, run  # heavy imports (ray, torch) only when training
    from services.driver.failure import one_line, write_traceback
    from services.driver.run_dir import RunFolderError

    try:
        # An API job's id names its queue: two jobs of the same name must not share (or purge) one.
        run(spec, resume=args.resume, overwrite=args.overwrite, on_record=on_record, run_id=args.job_id)
    except ResumeError as exc:
        print(f"dlrl: cannot resume: {exc}", file=sys.stderr)
        return 2
    except RunFolderError as exc:
        print(f"dlrl: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the run failed: its root cause once, as the last line
        where = write_traceback(exc, Path(spec.runtime.out_dir) / spec.name)
        cause = one_line(exc)
        _record_failure(store, args.job_id, cause)
        import ray

        if ray.is_initialized():
            ray.shutdown()  # no actor output streamed after the root cause: it stays the last line
        print(f"dlrl: the run failed{f' (full traceback: {where})' if where else ''}:", file=sys.stderr)
        print(f"dlrl: {cause}", file=sys.stderr, flush=True)
        return 1
    return 0


def _record_failure(store, job_id: str | None, cause: str) -> None:
    """An API job: put its one-line failure in its record, where the API reads a FAILED job's
    message from (services.api.routes). Redis being down must not hide the failure itself."""
    if store is None or job_id is None:
        return
    import redis

    try:
        store.update(job_id, failure=cause[:2000])
    except redis.RedisError as exc:
        print(f"dlrl: could not record the failure in the job store: {exc}", file=sys.stderr)


def _queue_delete(args: argparse.Namespace) -> int:
    """`dlrl queue delete RUN`: remove every key (or the actor) of the run's queue."""
    from dlrl.queue import QueueError, open_queue

    spec = JobSpec.model_validate({"queue": {"backend": args.backend, "redis_url": args.redis_url}})
    try:
        if args.backend == "ray":
            import ray

            ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR",
                     log_to_driver=False)
        queue = open_queue(spec, args.run_id, consumer="dlrl-cli")
        queue.delete()
        queue.close()
    except (QueueError, ConnectionError) as exc:
        print(f"dlrl: cannot delete the queue of {args.run_id!r}: {exc}", file=sys.stderr)
        return 1
    print(f"dlrl: deleted the {args.backend} queue of run {args.run_id!r}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.api.api import ApiSettings, ConfigError, serve

    try:
        settings = ApiSettings.from_env(
            settings_file=args.settings,
            runs_dir=Path(args.runs_dir).resolve() if args.runs_dir else None,
            max_active_jobs=args.max_active_jobs,
            max_body_bytes=args.max_body_kib * 1024 if args.max_body_kib is not None else None,
            rate_limit_per_minute=args.rate_limit, submit_limit_per_minute=args.submit_limit,
            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
            max_connections=args.max_connections,
            admission=dict(max_job_seconds=args.max_job_seconds, data_root=args.data_root,
                           model_roots=args.model_roots, models=args.models, tasks=args.tasks,
                           allow_trust_remote_code=args.allow_trust_remote_code))
        serve(settings, host=args.host, port=args.port, insecure_open=args.insecure_open, log_level=args.log_level)
    except (ConfigError, ValueError) as exc:
        print(f"dlrl serve: {exc}", file=sys.stderr)
        return 2
    return 0


def eval_progress(done: int, total: int, reused: int, seconds: float) -> None:
    """`dlrl eval`'s progress line on stderr: items done of all, those reused from an earlier run
    in --out (a resumed or extended run), and the time left at this run's own pace."""
    if done == reused:
        if reused:
            print(f"eval: {reused}/{total} items already in the output folder, reused", file=sys.stderr, flush=True)
        return
    fresh = done - reused
    eta = seconds / fresh * (total - done)
    print(f"eval: {done}/{total} items ({100 * done / total:.0f}%)  {seconds:.0f}s  ETA {eta:.0f}s",
          file=sys.stderr, flush=True)


def _eval(args: argparse.Namespace) -> int:
    """`dlrl eval`: one model, or a run directory (no config.json of its own) whose checkpoints
    are all evaluated and the best named. Prints the markdown table; the JSON is in --out."""
    from pathlib import Path

    from rollout.evaluation import EvalProtocol, ProtocolError, ResumeMismatch, evaluate_checkpoint, evaluate_run

    try:
        protocol = EvalProtocol.from_toml(args.protocol)
    except ProtocolError as exc:
        print(f"dlrl eval: {exc}", file=sys.stderr)
        return 2
    model = Path(args.model)
    is_run = model.is_dir() and not any((model / m).is_file() for m in ("config.json", "adapter_config.json"))
    label = model.name if model.is_dir() else args.model.replace(":", "_").replace("/", "_")
    out = Path(args.out) if args.out else Path("runs/eval") / protocol.name / label
    kwargs = dict(out_dir=out, resume=not args.no_resume, limit=args.limit, device=args.device,
                  dtype=args.dtype, trust_remote_code=args.trust_remote_code, progress=eval_progress)
    try:
        if is_run:
            summary = evaluate_run(model, args.task, protocol, **kwargs)
        else:
            summary = evaluate_checkpoint(args.model, args.task, protocol, **kwargs)
    except (ProtocolError, ResumeMismatch, FileNotFoundError, ValueError, OSError) as exc:
        print(f"dlrl eval: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write((out / "summary.md").read_text())
    if is_run:
        print(f"best: {summary['best_checkpoint']} (step {summary['best_step']}), "
              f"{summary['metric']} {summary['score']:.4f}")
    print(f"results: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
