"""What a run shows a person: the progress line, step numbers, sample completions, the tracker, quiet logs.

Real pieces throughout: RunLog writing a real run folder, the shipped tiny model evaluating real
held-out puzzles, TensorBoard's own writer and reader (skipped where `tensorboard`, the `tracker`
extra, is not installed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dlrl.config import JobSpec
from services.driver.driver import truncate_metrics
from services.driver.progress import RunLog, loss_moves, read_metrics
from services.driver.samples import SAMPLES, console_line, one_line
from services.driver.tracker import open_tracker, scalars

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"loss": 3.7e-09, "d_abs": 0.0, "grad_norm": 0.58, "reward": 0.506, "reward_std_in_group": 0.131,
         "zero_adv_groups": 0.25, "rollout_tokens_per_s": 731.2, "learner_tokens_per_s": 3435.9,
         "step_seconds": 2.5, "version": 1, "staleness_hist": {"0": 16}}
SAMPLE = {"id": "7", "prompt": "12..\n..21\n", "completion": "1234\n3421", "reward": 0.75}


def spec(**sections) -> JobSpec:
    return JobSpec.model_validate(sections)


def test_loss_and_d_are_shown_only_where_they_can_move():
    assert not loss_moves(spec())  # on-policy, one update per batch: d = 0, loss = 0 by construction
    assert loss_moves(spec(train={"updates_per_batch": 2}))
    assert loss_moves(spec(runtime={"max_staleness": 1}))


def test_progress_line_shows_what_moves_on_policy(tmp_path, capsys):
    log = RunLog(tmp_path, total_steps=10, show_loss=False)
    log.step(1, TRAIN)
    line = capsys.readouterr().out.strip()
    assert line.startswith("step    1/10  reward 0.506 (group std 0.131, 25% groups flat)")
    assert "gnorm 0.58" in line and "gen 731 tok/s" in line and "learn 3436 tok/s" in line and "ETA " in line
    assert "loss" not in line and "|d|" not in line
    RunLog(tmp_path, total_steps=10, show_loss=True).step(2, {**TRAIN, "loss": -0.0123, "d_abs": 0.0456})
    assert "loss -0.0123  |d| 0.0456" in capsys.readouterr().out


def test_step_numbers_agree_in_metrics_console_and_plot(tmp_path, capsys):
    """One convention: `step` counts the learner steps done (= the weights version)."""
    log = RunLog(tmp_path, total_steps=3, show_loss=False)
    log.eval(0, {"eval_reward": 0.5})
    for k in (1, 2, 3):
        log.step(k, {**TRAIN, "version": k})
    log.eval(3, {"eval_reward": 0.6})
    out = capsys.readouterr().out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), ("train", 1), ("train", 2), ("train", 3),
                                                         ("eval", 3)]
    assert all(r["step"] == r["version"] for r in records if r["kind"] == "train")
    assert re.findall(r"^step +(\d+)/3", out, re.M) == ["1", "2", "3"]
    assert re.findall(r"^\[eval\] step +(\d+)/3", out, re.M) == ["0", "3"]


def test_truncation_keeps_what_the_checkpoint_holds(tmp_path):
    """Resumed from the checkpoint of step 2: train steps 1-2 stay, the evaluation of version 2 and
    everything after it is redone (and its samples go too)."""
    log = RunLog(tmp_path, total_steps=4)
    for k in range(5):
        if k % 2 == 0:
            log.eval(k, {"eval_reward": 0.5, "samples": [SAMPLE]})
        if k < 4:
            log.step(k + 1, TRAIN)
    truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        ("eval", 0), ("train", 1), ("train", 2)]
    assert [json.loads(x)["step"] for x in (tmp_path / SAMPLES).read_text().splitlines()] == [0]


def test_eval_samples_go_to_samples_jsonl_and_one_to_the_console(tmp_path, capsys):
    sunk = []
    log = RunLog(tmp_path, total_steps=10, sink=sunk.append)
    samples = [SAMPLE, {**SAMPLE, "id": "8", "reward": 0.25}]
    log.eval(10, {"eval_reward": 0.5, "eval_solved": 0.1, "samples": samples})
    lines = [json.loads(x) for x in (tmp_path / SAMPLES).read_text().splitlines()]
    assert lines == [{"step": 10, "index": 0, **SAMPLE}, {"step": 10, "index": 1, **samples[1]}]
    record = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert "samples" not in record and "samples" not in sunk[0]  # metrics stay numbers
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "[sample] reward 0.750  prompt: 12.. / ..21  ->  1234 / 3421"
    RunLog(tmp_path, total_steps=10)  # a fresh run (start_step 0) starts a new samples.jsonl
    assert not (tmp_path / SAMPLES).exists() or (tmp_path / SAMPLES).read_text() == ""


def test_console_sample_is_one_bounded_line():
    assert one_line("a\n\n b \nc") == "a / b / c"
    long = one_line("x" * 500)
    assert len(long) == 160 and long.endswith("...")
    assert console_line([]) is None


def test_evaluation_returns_its_first_examples_as_samples_without_changing_its_numbers():
    """The shipped model on real held-out puzzles: the samples are the first examples, their
    rewards are the task's score of the completion shown, and the metrics are the same with or
    without them."""
    from dlrl.models import load_model, special_ids
    from dlrl.tasks import get_task
    from rollout.completion import evaluate
    from rollout.engines import make_engine

    s = spec(task={"name": "sudoku"}, rollout={"gen_length": 20, "block_length": 20, "steps": 10})
    model, tokenizer = load_model("builtin:tiny-sudoku")
    model.requires_grad_(False)
    task = get_task("sudoku")
    examples = task.examples("test", 6, 1234)
    decoding = s.rollout.decoding()
    engine = make_engine(decoding, model, special_ids(model, tokenizer))
    plain = evaluate(engine, tokenizer, task, examples, decoding, 8, "compact")
    shown = evaluate(engine, tokenizer, task, examples, decoding, 8, "compact", samples=3)
    samples = shown.pop("samples")
    assert "samples" not in plain
    assert {k: v for k, v in shown.items() if k != "eval_seconds"} == \
        {k: v for k, v in plain.items() if k != "eval_seconds"}
    assert [x["id"] for x in samples] == [str(ex.id) for ex in examples[:3]]
    for x, ex in zip(samples, examples):
        assert x["prompt"] == task.prompt(ex, "compact")
        assert x["reward"] == task.reward(x["completion"], ex)
    assert abs(sum(x["reward"] for x in samples) / 3 - plain["eval_reward"]) < 1.0  # real rewards in [0, 1]


def test_eval_samples_and_tracker_fields_default_to_the_old_behaviour():
    s = JobSpec()
    assert s.eval.samples == 4 and s.runtime.tracker is None
    assert open_tracker(None, Path("/nonexistent")) is None
    with pytest.raises(ValueError):
        JobSpec.model_validate({"runtime": {"tracker": "mlflow"}})
    with pytest.raises(ValueError):
        JobSpec.model_validate({"eval": {"samples": -1}})


def test_tracker_scalars_are_the_numeric_fields_of_a_record():
    got = scalars({"time": 1.0, "kind": "train", "step": 3, **TRAIN, "weight_sync_transport": "collective",
                   "bad": float("nan"), "flag": True})
    assert got["train/reward"] == 0.506 and got["train/grad_norm"] == 0.58 and got["train/version"] == 1.0
    assert not {"train/time", "train/step", "train/kind", "train/staleness_hist", "train/bad", "train/flag",
                "train/weight_sync_transport"} & set(got)
    assert scalars({"kind": "eval", "step": 0, "eval_reward": 0.5}) == {"eval/eval_reward": 0.5}


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracker extra (pip install 'dlrl[tracker]') is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, total_steps=2, tracker=open_tracker("tensorboard", tmp_path))
    log.eval(0, {"eval_reward": 0.5, "eval_solved": 0.1})
    log.step(1, {**TRAIN, "reward": 0.25})
    log.step(2, {**TRAIN, "reward": 0.75})
    log.eval(2, {"eval_reward": 0.625, "eval_solved": 0.2})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = read_metrics(tmp_path / "metrics.jsonl")
    tags = set(events.Tags()["scalars"])
    for r in records:
        for tag, value in scalars(r).items():
            assert tag in tags
            got = {e.step: e.value for e in events.Scalars(tag)}
            assert got[r["step"]] == pytest.approx(value, rel=1e-6), tag
    assert [(e.step, e.value) for e in events.Scalars("train/reward")] == [(1, 0.25), (2, 0.75)]
    assert [e.step for e in events.Scalars("eval/eval_reward")] == [0, 2]


def test_quiet_logs_silences_bars_and_colour_in_files():
    """Run in a child whose stdout is a pipe (as a log file is): progress bars off, Ray's colour
    prefixes off; a value the user set wins."""
    code = ("import os; from dlrl.quiet import quiet_logs; quiet_logs(); "
            "print(os.environ['HF_HUB_DISABLE_PROGRESS_BARS'], os.environ['TQDM_DISABLE'], "
            "os.environ['RAY_COLOR_PREFIX'])")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX")}
    env["TQDM_DISABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "0", "0"]


def test_jobs_submitted_through_the_api_get_the_quiet_environment(tmp_path):
    from dlrl.quiet import QUIET_ENV
    from services.api.launcher import job_env
    from services.api.settings import ApiSettings

    env = job_env(ApiSettings(token="t", runs_dir=tmp_path), JobSpec(), "j-1")
    assert QUIET_ENV.items() <= env.items()


def test_protocol_evaluations_log_their_first_examples_as_samples(tmp_path):
    """A run with eval.protocol: the samples are the protocol's own first examples, prompts as the
    protocol renders them, and the completion and reward its results.jsonl recorded."""
    from dlrl.eval_protocol import EvalProtocol, load_examples
    from rollout.evaluation import evaluate_checkpoint, read_samples, resolve_task

    protocol = EvalProtocol.from_toml(ROOT / "deploy/eval/tiny-sudoku.toml")
    task = resolve_task("sudoku", protocol)
    evaluate_checkpoint("builtin:tiny-sudoku", "sudoku", protocol, out_dir=tmp_path, limit=5)
    examples = load_examples(protocol, task)
    samples = read_samples(tmp_path, task, protocol, examples, 3)
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == [r["id"] for r in results[:3]] == [str(ex.id) for ex in examples[:3]]
    assert [(s["completion"], s["reward"]) for s in samples] == [(r["completions"][0], r["rewards"][0])
                                                                 for r in results[:3]]
    assert samples[0]["prompt"] == task.prompt(examples[0], "compact")
    assert read_samples(tmp_path, task, protocol, examples, 0) == []


# A driver joining the running head, as `dlrl train` with RAY_ADDRESS does (services.driver.start_ray):
# its actor prints the quiet variables it sees.
_JOINING_DRIVER = """
import json, os, ray
from dlrl.quiet import quiet_logs, quiet_runtime_env
quiet_logs()
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env=quiet_runtime_env())

@ray.remote(num_cpus=0)
def seen():
    return {k: os.environ.get(k) for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}

print(json.dumps(ray.get(seen.remote())))
"""


def test_actors_of_a_run_joining_a_cluster_get_the_quiet_environment(ray_cluster):
    """The head's raylet was started without the quiet variables (an operator's cluster), so its
    workers do not inherit them from the driver: they reach the actors through the job's
    runtime_env. Inside a Ray Job whose runtime_env already sets them (the API's jobs), the driver
    leaves them to the job: Ray refuses to merge two runtime_envs naming the same variable. A value
    the user set wins."""
    from dlrl.quiet import JOB_CONFIG_VAR, QUIET_ENV

    base = {k: v for k, v in ray_cluster.env().items() if k not in QUIET_ENV and k != JOB_CONFIG_VAR}
    base.update({"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)})

    def actor_env(**extra: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", _JOINING_DRIVER], cwd=ROOT, env={**base, **extra},
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    head_env = Path(f"/proc/{ray_cluster.proc.pid}/environ").read_bytes().split(b"\0")
    assert not any(line.split(b"=")[0].decode() in QUIET_ENV for line in head_env if b"=" in line)
    assert actor_env() == QUIET_ENV
    assert actor_env(TQDM_DISABLE="0") == {**QUIET_ENV, "TQDM_DISABLE": "0"}
    job = {"runtime_env": {"env_vars": dict(QUIET_ENV)}, "metadata": {}}
    assert actor_env(**{JOB_CONFIG_VAR: json.dumps(job)}) == QUIET_ENV
