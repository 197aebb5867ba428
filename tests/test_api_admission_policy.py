"""The admission policy (services.api.admission) field by field, without HTTP: what a submitted spec may
ask for, what the server decides instead, and the settings that change it. The same policy is
exercised over real HTTP in tests/test_api_admission.py.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dlrl.config import JobSpec
from dlrl.tasks import get_task
from dlrl.tasks.data_root import DATA_ROOT_ENV, DataPathError, resolve_data_path
from services.api.admission import DEFAULT_LIMITS, REQUIRED_FIELDS, AdmissionPolicy, AdmissionRefused, admit
from services.api.launcher import SPEC_ENV, adopt_redis_url_file, job_entrypoint, job_env, wall_clock_message
from services.api.ratelimit import RateLimit, token_key
from services.api.settings import ApiSettings, ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data"


def small(**sections: Any) -> dict[str, Any]:
    """A spec giving every field admission requires (tiny sizes), with `sections` merged in."""
    spec: dict[str, Any] = {"model": {"path": "builtin:tiny-sudoku"}, "task": {"name": "sudoku"},
                            "rollout": {"prompts_per_step": 2, "group_size": 2, "gen_length": 20, "block_length": 20,
                                        "steps": 10},
                            "train": {"steps": 2}}
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values} if isinstance(values, dict) else values
    return spec


def refusals(body: dict[str, Any], policy: AdmissionPolicy | None = None) -> dict[str, str]:
    """{field path: reason} of every rule `body` breaks ({} if admitted)."""
    try:
        admit(JobSpec.model_validate(body), policy or AdmissionPolicy())
    except AdmissionRefused as exc:
        return dict(exc.errors)
    return {}


def admitted(body: dict[str, Any], policy: AdmissionPolicy | None = None) -> JobSpec:
    return admit(JobSpec.model_validate(body), policy or AdmissionPolicy())


# ---------------------------------------------------------------- what runs


def test_a_small_registered_job_is_admitted_and_builtins_load_without_remote_code():
    spec = admitted(small())
    assert spec.task.name == "sudoku" and spec.train.steps == 2
    assert spec.model.trust_remote_code is False  # the default
    assert admitted(small(task={"name": "countdown", "options": {"sizes": [3], "train_size": 100}})).task.options == \
        {"sizes": [3], "train_size": 100}


def test_an_empty_spec_starts_nothing_every_sizing_field_is_required():
    assert set(refusals({})) == set(REQUIRED_FIELDS)
    body = small()
    del body["rollout"]["group_size"]
    assert list(refusals(body)) == ["rollout.group_size"]


@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "runpy:run_path", "builtins:exec",
                                  "dlrl.tasks.sudoku:sudoku_task", "sudokku", "os.system"])
def test_tasks_outside_the_registry_are_refused(name):
    reason = refusals(small(task={"name": name, "options": {"command": "true"}}))["task.name"]
    assert repr(name) in reason and "registered tasks only" in reason


def test_an_operator_listed_import_path_is_admitted_and_given_to_the_job(tmp_path):
    policy = AdmissionPolicy(tasks=("mypkg.tasks:factory",))
    assert refusals(small(task={"name": "mypkg.tasks:factory", "options": {"k": 1}}), policy) == {}
    assert "task.name" in refusals(small(task={"name": "os:system"}), policy)
    env = job_env(ApiSettings(token="t", admission=policy, runs_dir=tmp_path), admitted(small()), "j-000000000001")
    assert env["DLRL_TASK_IMPORT_PATHS"] == "mypkg.tasks:factory"
    assert job_env(ApiSettings(token="t", runs_dir=tmp_path), admitted(small()), "j-1")["DLRL_TASK_IMPORT_PATHS"] == ""


def test_task_options_are_the_factorys_own_with_small_json_values():
    assert "task.options.command" in refusals(small(task={"options": {"command": "rm -rf /"}}))
    assert "task.options.max_blanks" not in refusals(small(task={"options": {"max_blanks": 8}}))
    for value in [10**9, float("inf"), -float("nan"), "x" * 5000, list(range(300)), [[[[[1]]]]]]:
        assert "task.options.max_blanks" in refusals(small(task={"options": {"max_blanks": value}})), value


# ---------------------------------------------------------------- files


def test_file_options_must_lie_in_the_data_root(tmp_path):
    outside = refusals(small(task={"name": "math", "options": {"path": "/etc/passwd"}}))
    assert "no data root" in outside["task.options.path"]
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text("{}\n")
    (root / "escape.jsonl").symlink_to("/etc/passwd")
    policy = AdmissionPolicy(data_root=str(root))
    for path in ["/etc/passwd", "../x.jsonl", "gsm8k/../../x.jsonl", str(tmp_path / "x.jsonl"), "escape.jsonl",
                 "{split}/../../x.jsonl"]:
        reason = refusals(small(task={"name": "math", "options": {"path": path}}), policy)["task.options.path"]
        assert "outside the API's data root" in reason, path
    spec = admitted(small(task={"name": "math", "options": {"path": "gsm8k/{split}.jsonl"}}), policy)
    assert spec.task.options["path"] == str(root.resolve() / "gsm8k" / "{split}.jsonl")  # absolute, split kept
    assert refusals(small(task={"name": "gsm8k", "options": {"path": 5}}), policy)  # not a path at all
    listed = AdmissionPolicy(data_root=str(root), tasks=("mypkg.tasks:factory",))  # the operator's own task
    for key in ["train_file", "dataDir", "filename", "rootFolder"]:
        body = small(task={"name": "mypkg.tasks:factory", "options": {key: "/etc/passwd"}})
        assert "outside the API's data root" in refusals(body, listed)[f"task.options.{key}"], key


def test_tasks_read_files_only_inside_DLRL_DATA_ROOT_at_load_time(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    (root / "math.jsonl").write_text((DATA / "math_tiny.jsonl").read_text())
    (root / "late.jsonl").symlink_to(DATA / "math_tiny.jsonl")  # swapped in after admission
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    assert len(get_task("math", path="math.jsonl").examples("test")) > 0  # relative to the root
    with pytest.raises(DataPathError, match="outside the data root"):
        get_task("math", path="late.jsonl").examples("test")
    with pytest.raises(DataPathError):
        get_task("math", path="/etc/hostname").examples("test")
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert resolve_data_path("tests/data/math_tiny.jsonl") == (Path.cwd() / "tests/data/math_tiny.jsonl").resolve()


# ---------------------------------------------------------------- models


def test_models_are_builtin_approved_folders_or_listed_hub_ids(tmp_path):
    roots = tmp_path / "models"
    (roots / "llada").mkdir(parents=True)
    (roots / "link").symlink_to("/etc")
    adapter = roots / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "evil/model"}))
    policy = AdmissionPolicy(model_roots=(str(roots),), models=("GSAI-ML/LLaDA-8B-Instruct", "Dream-org/*"))
    ok = ["builtin:tiny-sudoku", "builtin:no-such-model", str(roots / "llada"), "GSAI-ML/LLaDA-8B-Instruct",
          "Dream-org/Dream-v0-Instruct-7B"]
    for path in ok:
        assert refusals(small(model={"path": path}), policy) == {}, path
    bad = {"builtin:../../etc": "built-in name", "/etc": "not inside", str(roots / "link"): "not inside",
           str(roots / "llada" / ".." / ".."): "not inside", "./llada": "not inside", "~/models": "not inside",
           "evil/model": "not on the operator's list", "GSAI-ML/other": "not on the operator's list",
           "https://x.example/m": "neither", "org/../x": "neither", str(adapter): "base model 'evil/model'"}
    for path, words in bad.items():
        assert words in refusals(small(model={"path": path}), policy).get("model.path", ""), path
    assert "approves none" in refusals(small(model={"path": "/models/x"}))["model.path"]
    assert "lists none" in refusals(small(model={"path": "org/x"}))["model.path"]


def test_trust_remote_code_needs_the_operator():
    hub = AdmissionPolicy(models=("org/m",))
    assert "model.trust_remote_code" in refusals(small(model={"path": "org/m", "trust_remote_code": True}), hub)
    assert admitted(small(model={"path": "org/m"}), hub).model.trust_remote_code is False  # the default
    allowed = AdmissionPolicy(models=("org/m",), allow_trust_remote_code=True)
    assert admitted(small(model={"path": "org/m", "trust_remote_code": True}), allowed).model.trust_remote_code


def test_lora_targets_cannot_be_backtracking_regexes():
    assert refusals(small(model={"lora": {"target_modules": ["q_proj", "v_proj"]}})) == {}
    assert refusals(small(model={"lora": {"target_modules": "all-linear"}})) == {}
    assert "model.lora.target_modules" in refusals(small(model={"lora": {"target_modules": "(a+)+$"}}))
    assert "model.lora.target_modules.1" in refusals(small(model={"lora": {"target_modules": ["q", ".*"]}}))


# ---------------------------------------------------------------- addresses and sizes


def test_queue_and_ray_addresses_are_the_servers(tmp_path):
    got = refusals(small(queue={"backend": "redis", "redis_url": "redis://:pw@10.0.0.1:6379/0"},
                         runtime={"ray_address": "ray://10.0.0.2:10001"}))
    assert "set by the server" in got["queue.redis_url"] and "set by the server" in got["runtime.ray_address"]
    assert refusals(small(queue={"backend": "redis"})) == {}  # the server's Redis is used
    url = "redis://:s3cret@127.0.0.1:1/0"
    env = job_env(ApiSettings(token="t", redis_url=url, runs_dir=tmp_path), admitted(small()), "j-1")
    # The URL holds the password: Ray logs a runtime env in clear, so only a 0600 file's path goes there.
    assert "DLRL_REDIS_URL" not in env and not any("s3cret" in v for v in env.values())
    secret = Path(env["DLRL_REDIS_URL_FILE"])
    assert secret.parent == tmp_path / "j-1" and secret.read_text() == url
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    job = {**env}
    adopt_redis_url_file(job)  # what the job does first: the URL into its own environment, the file gone
    assert job["DLRL_REDIS_URL"] == url and "DLRL_REDIS_URL_FILE" not in job and not secret.exists()
    assert JobSpec.model_validate_json(env[SPEC_ENV]).runtime.ray_address is None


def test_size_fields_have_hard_bounds_and_server_limits():
    for section, key, huge in [("train", "steps", 10**30), ("rollout", "gen_length", 10**9),
                               ("rollout", "group_size", 10**6), ("rollout", "num_workers", 1000 * 1000),
                               ("train", "n_mc", 10**5), ("rollout", "batch_size", 10**7)]:
        with pytest.raises(ValidationError, match="less than or equal"):
            JobSpec.model_validate({section: {key: huge}})
    over = {"train.steps": 10_001, "rollout.group_size": 65, "rollout.num_workers": 9, "train.n_mc": 65,
            "task.eval_size": 5001, "runtime.max_restarts": 11}
    for path, value in over.items():
        section, key = path.split(".")
        body = small(**{section: {key: value}})
        assert f"exceeds the API's limit of {DEFAULT_LIMITS[path]}" in refusals(body)[path], path
    body = small(rollout={"gen_length": 4096, "block_length": 4096, "steps": 4096})
    assert set(refusals(body)) == {"rollout.gen_length", "rollout.block_length", "rollout.steps"}
    lowered = AdmissionPolicy.from_dict({"limits": {"train.steps": 1}})
    assert "train.steps" in refusals(small(), lowered) and lowered.limits["rollout.group_size"] == 64


@pytest.mark.parametrize("patch,words", [
    ({"train": {"steps": "5"}}, "valid integer"), ({"train": {"steps": True}}, "valid integer"),
    ({"train": {"steps": 5.0}}, "valid integer"), ({"train": {"lr": math.inf}}, "finite number"),
    ({"train": {"lr": math.nan}}, "finite number"), ({"rollout": {"temperature": "1"}}, "valid number"),
    ({"model": {"trust_remote_code": "yes"}}, "valid boolean"), ({"train": {"betas": [0.9, "0.99"]}}, "valid number"),
    ({"train": {"betas": [0.9, 1.5]}}, "less than 1"),
])
def test_types_are_strict_and_numbers_finite(patch, words):
    with pytest.raises(ValidationError, match=words):
        JobSpec.model_validate(patch)
    with pytest.raises(ValidationError, match="finite number"):
        JobSpec.model_validate_json('{"train": {"lr": Infinity}}')
    assert JobSpec.model_validate({"train": {"betas": [0.9, 0.95], "lr": 1}}).train.betas == (0.9, 0.95)


# ---------------------------------------------------------------- settings, launcher, rate limits


def test_settings_file_flags_and_environment(tmp_path):
    f = tmp_path / "api.toml"
    f.write_text('max_active_jobs = 2\nrate_limit_per_minute = 30\n[admission]\nmodels = ["org/m"]\n'
                 'max_job_seconds = 60\n[admission.limits]\n"train.steps" = 100\n')
    s = ApiSettings.from_env({"DLRL_API_TOKEN": "t", "DLRL_DATA_ROOT": str(tmp_path)}, settings_file=f,
                             max_active_jobs=3, admission={"tasks": ["mypkg:f"], "models": None})
    assert (s.max_active_jobs, s.rate_limit_per_minute, s.submit_limit_per_minute) == (3, 30, 10)
    assert s.admission.models == ("org/m",) and s.admission.tasks == ("mypkg:f",)
    assert s.admission.data_root == str(tmp_path) and s.admission.limits["train.steps"] == 100
    defaults = ApiSettings.from_env({"DLRL_API_TOKEN": "t"})
    assert defaults.max_active_jobs == 4 and defaults.admission.max_job_seconds == 86400
    for text, words in [("nope = 1\n", "unknown keys"), ("[admission]\nmodelz = []\n", "unknown admission"),
                        ('[admission.limits]\n"train.stepz" = 1\n', "unknown limits"),
                        ("max_active_jobs = -1\n", "non-negative"), ("[admission]\nmax_job_seconds = 0\n", "positive"),
                        ("max_active_jobs = [\n", "cannot read")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=words):
            ApiSettings.from_env({"DLRL_API_TOKEN": "t"}, settings_file=f)


def test_the_job_runs_under_the_wall_clock_limit():
    limited = ApiSettings(token="t", job_command=("dlrl",), admission=AdmissionPolicy(max_job_seconds=90.5))
    assert job_entrypoint(limited, "j-1") == "timeout --kill-after=30 91 dlrl train --spec-env DLRL_JOB_SPEC --job-id j-1"
    free = ApiSettings(token="t", job_command=("dlrl",), admission=AdmissionPolicy(max_job_seconds=None))
    assert job_entrypoint(free, "j-1").startswith("dlrl train")
    ray_says = "Job entrypoint command failed with exit code 124, last available logs: ..."
    assert "wall-clock limit of 90.5 s" in wall_clock_message(ray_says, limited)
    assert wall_clock_message("exit code 1", limited) == "exit code 1"


def test_rate_limit_counts_per_token_in_redis(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    limit = RateLimit(r, f"dlrl-rate-{os.getpid()}", "requests", 3, window_s=60)
    a, b = token_key("Bearer token-a"), token_key("Bearer token-b")
    assert a != b and "token-a" not in a
    now = 6000.0 * 60 + 10  # 10 s into a window
    assert [limit.hit(a, now) for _ in range(3)] == [None, None, None]
    assert limit.hit(a, now) == 50 and limit.hit(b, now) is None  # Retry-After: the window's rest
    assert limit.hit(a, now + 60) is None  # the next window
    assert RateLimit(r, "x", "requests", None).hit(a) is None
    dead = RateLimit(redis.Redis(port=1, socket_connect_timeout=0.2), "x", "requests", 1)
    assert dead.hit(a) is None and dead.hit(a) is None  # fails open: the route then answers 503 itself


def test_untrusted_validation_reads_no_protocol_file(tmp_path):
    """Over the API (dlrl.config.FILE_CHECKS off) a spec cannot probe the server's files through
    eval.protocol: an existing valid protocol outside the allowed folders and a missing file get
    the same refusal, from admission, and a shipped protocol is still read and checked."""
    from dlrl.config import FILE_CHECKS

    outside = tmp_path / "elsewhere.toml"
    outside.write_text((Path(__file__).parents[1] / "deploy/eval/tiny-sudoku.toml").read_text())
    token = FILE_CHECKS.set(False)
    try:
        reasons = {str(p): refusals(small(eval={"protocol": str(p)}))["eval.protocol"]
                   for p in (outside, tmp_path / "absent.toml")}
        assert len(set(r.replace(p, "") for p, r in reasons.items())) == 1
        assert "not a protocol file in deploy/eval/" in reasons[str(outside)]
        assert refusals(small(eval={"protocol": "deploy/eval/tiny-sudoku.toml"})) == {}
        wrong_task = refusals(small(eval={"protocol": "deploy/eval/gsm8k.toml"}))
        assert "written for task 'gsm8k'" in wrong_task["eval.protocol"]
    finally:
        FILE_CHECKS.reset(token)
    with pytest.raises(ValidationError, match="written for task 'gsm8k'"):  # trusted: read at validation
        JobSpec.model_validate(small(eval={"protocol": "deploy/eval/gsm8k.toml"}))


# ---------------------------------------------------------------- paths: resolved once, refused plainly


def _untrusted(body: dict[str, Any], policy: AdmissionPolicy) -> JobSpec | dict[str, str]:
    """Admission as the API runs it (no file read at validation): the admitted spec, or the refusals."""
    from dlrl.config import FILE_CHECKS

    token = FILE_CHECKS.set(False)
    try:
        return admit(JobSpec.model_validate(body), policy)
    except AdmissionRefused as exc:
        return dict(exc.errors)
    finally:
        FILE_CHECKS.reset(token)


def test_unresolvable_paths_are_refusals_naming_the_field(tmp_path):
    """A symlink loop or another process's /proc/<pid>/cwd used to raise out of admission (a 500)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    for root in ("models", "data"):
        (tmp_path / root / "a").symlink_to(tmp_path / root / "b")
        (tmp_path / root / "b").symlink_to(tmp_path / root / "a")
    policy = AdmissionPolicy(model_roots=(str(tmp_path / "models"),), data_root=str(tmp_path / "data"))
    cases = [({"model": {"path": str(tmp_path / "models/a/x")}}, "model.path"),
             ({"model": {"path": "/proc/1/cwd/models"}}, "model.path"),
             ({"eval": {"protocol": str(tmp_path / "data/a/p.toml")}}, "eval.protocol"),
             ({"eval": {"protocol": "/proc/1/cwd/p.toml"}}, "eval.protocol"),
             ({"task": {"name": "math", "options": {"path": str(tmp_path / "data/a/m.jsonl")}}}, "task.options.path"),
             ({"task": {"name": "math", "options": {"path": "/proc/1/cwd/m.jsonl"}}}, "task.options.path")]
    for sections, field_path in cases:
        reasons = _untrusted(small(**sections), policy)
        assert isinstance(reasons, dict) and field_path in reasons, (sections, reasons)
        assert "cannot be resolved" in reasons[field_path] or "not inside" in reasons[field_path], reasons
    assert "symlink loop" in _untrusted(small(model={"path": str(tmp_path / "models/a/x")}), policy)["model.path"]


def test_admitted_paths_are_the_resolved_ones_the_check_saw(tmp_path):
    """model.path, eval.protocol and file options reach the job as the resolved path admission
    checked, not the spelling submitted (a `..`, a symlink, a relative shipped protocol)."""
    models, data = tmp_path / "models", tmp_path / "data"
    (models / "llada").mkdir(parents=True)
    (models / "alias").symlink_to(models / "llada")
    data.mkdir()
    (data / "m.jsonl").write_text("{}\n")
    (data / "via").symlink_to(data / "m.jsonl")
    policy = AdmissionPolicy(model_roots=(str(models),), data_root=str(data))
    spec = _untrusted(small(model={"path": str(models / "alias" / ".." / "alias")},
                            eval={"protocol": "deploy/eval/./tiny-sudoku.toml"}), policy)
    assert isinstance(spec, JobSpec), spec
    assert spec.model.path == str(models.resolve() / "llada")
    assert spec.eval.protocol == str((ROOT / "deploy/eval/tiny-sudoku.toml").resolve())
    spec = _untrusted(small(task={"name": "math", "options": {"path": "via"}}), policy)
    assert isinstance(spec, JobSpec) and spec.task.options["path"] == str((data / "m.jsonl").resolve())


def _adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


def test_adapter_chains_are_checked_to_their_end(tmp_path):
    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    policy = AdmissionPolicy(model_roots=(str(models),), models=("ok-org/m",))
    # Adapter on adapter on a base model: every hop allowed, so admitted.
    good = _adapter(models / "a2", str(_adapter(models / "a1", str(models / "base"))))
    assert refusals(small(model={"path": str(good)}), policy) == {}
    assert refusals(small(model={"path": str(_adapter(models / "h2", str(_adapter(models / "h1", "ok-org/m"))))}),
                    policy) == {}
    # The second hop names a hub model nobody listed, or a folder outside the roots: refused.
    for name, base in [("hub", "evil/model"), ("outside", str(tmp_path)), ("relative", "./base")]:
        chain = _adapter(models / f"{name}2", str(_adapter(models / f"{name}1", base)))
        reason = refusals(small(model={"path": str(chain)}), policy).get("model.path", "")
        assert f"base model {base!r} of adapter {str(models / (name + '1'))!r}" in reason, (name, reason)
    # A loop, and a chain deeper than MAX_ADAPTER_DEPTH.
    (models / "loop1").mkdir()
    _adapter(models / "loop2", str(models / "loop1"))
    (models / "loop1" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(models / "loop2")}))
    assert "a loop" in refusals(small(model={"path": str(models / "loop1")}), policy)["model.path"]
    from services.api.admission import MAX_ADAPTER_DEPTH

    deep = str(models / "base")
    for i in range(MAX_ADAPTER_DEPTH + 1):
        deep = str(_adapter(models / f"d{i}", deep))
    assert "stacked" in refusals(small(model={"path": deep}), policy)["model.path"]
    broken = models / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    assert "unreadable" in refusals(small(model={"path": str(_adapter(models / "b2", str(broken)))}),
                                    policy)["model.path"]
