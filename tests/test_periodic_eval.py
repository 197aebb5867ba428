"""The run's periodic evaluation under an eval protocol (eval.protocol) and its kept checkpoints
(runtime.keep_checkpoints): spec validation, the API's admission rule, best-step selection, and a
tiny real run (real Ray, the shipped tiny model) whose evaluations are exactly what `dlrl eval`
measures afterwards on the same protocol.

    pytest tests/test_periodic_eval.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dlrl.config import JobSpec
from services.api.admission import AdmissionPolicy, AdmissionRefused, admit
from services.driver.periodic_eval import best_step
from services.driver.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "deploy/eval"
TINY_PROTOCOL = (EVAL / "tiny-sudoku.toml").read_text()


def small_protocol(folder: Path, edits: dict[str, str] | None = None) -> Path:
    """The shipped tiny-sudoku protocol on its first 8 puzzles, with the text `edits` applied."""
    text = TINY_PROTOCOL.replace("n = 96", "n = 8")
    for old, new in (edits or {}).items():
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-sudoku-small.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the spec

def test_eval_protocol_is_validated_with_the_spec(tmp_path):
    spec = JobSpec.model_validate({"eval": {"protocol": "deploy/eval/tiny-sudoku.toml"}})
    assert spec.eval.protocol == str(EVAL / "tiny-sudoku.toml")  # from any cwd: the checkout's
    assert JobSpec.model_validate({}).eval.protocol is None

    bad = small_protocol(tmp_path, {"steps = 20": 'steps = "many"'})
    cases = {str(bad): "decoding.steps", str(tmp_path / "absent.toml"): "cannot read protocol",
             "/etc/passwd": "not a protocol file"}
    for path, reason in cases.items():
        with pytest.raises(ValidationError) as info:
            JobSpec.model_validate({"eval": {"protocol": path}})
        (err,) = info.value.errors()
        assert err["loc"] == ("eval", "protocol") and reason in err["msg"]
    with pytest.raises(ValidationError, match="written for task 'gsm8k'"):
        JobSpec.model_validate({"eval": {"protocol": str(EVAL / "gsm8k.toml")}})


@pytest.mark.parametrize("every,ckpt,ok", [(2, 2, True), (2, 4, True), (2, 3, False), (2, 0, False)])
def test_kept_checkpoints_must_all_be_evaluated(every, ckpt, ok):
    body = {"eval": {"every": every}, "runtime": {"keep_checkpoints": True, "checkpoint_every": ckpt}}
    if ok:
        assert JobSpec.model_validate(body).runtime.keep_checkpoints
    else:
        with pytest.raises(ValidationError, match="keep_checkpoints needs runtime.checkpoint_every"):
            JobSpec.model_validate(body)


def _api_spec(protocol: str) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"path": "builtin:tiny-sudoku"}, "task": {"name": "sudoku"}, "train": {"steps": 2},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "gen_length": 20, "block_length": 20, "steps": 10},
        "eval": {"protocol": protocol}})


def _refusals(spec: JobSpec, policy: AdmissionPolicy) -> dict[str, str]:
    try:
        admit(spec, policy)
    except AdmissionRefused as exc:
        return dict(exc.errors)
    return {}


def test_api_admits_shipped_protocols_and_those_in_the_data_root_only(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    policy = AdmissionPolicy(data_root=str(root))
    assert _refusals(_api_spec(str(EVAL / "tiny-sudoku.toml")), policy) == {}
    assert _refusals(_api_spec(str(small_protocol(root))), policy) == {}

    outside = _refusals(_api_spec(str(small_protocol(elsewhere))), policy)
    assert "not a protocol file in deploy/eval/ or the API's data root" in outside["eval.protocol"]
    no_root = _refusals(_api_spec(str(small_protocol(root))), AdmissionPolicy())
    assert "this API has no data root" in no_root["eval.protocol"]
    # a protocol in the data root must not make the job read a file outside it
    (elsewhere / "puzzles.csv").write_text("Puzzle,Solution\n")
    leaky = small_protocol(root / "sub", {'format = "task"': 'format = "d1_sudoku_csv"\npath = "../../elsewhere/puzzles.csv"'})
    assert "is outside deploy/eval/" in _refusals(_api_spec(str(leaky)), policy)["eval.protocol"]


# --------------------------------------------------------------------------- best.json

def test_best_step_is_the_best_kept_evaluation_ties_to_the_earliest(tmp_path):
    records = [{"kind": "eval", "step": s, "eval_score": v} for s, v in [(0, 0.9), (2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6)]]
    records.insert(2, {"kind": "train", "step": 1, "eval_score": 5.0})  # not an evaluation
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert best_step(tmp_path, "eval_score") is None  # no kept checkpoint yet
    for s in (2, 4, 6, 8):  # step 0 (the initial model) has no checkpoint to select
        (tmp_path / "checkpoints" / f"step-{s}").mkdir(parents=True)
    best = best_step(tmp_path, "eval_score")
    assert (best["best_step"], best["score"], best["checkpoint"]) == (4, 0.7, "checkpoints/step-4")
    assert [c["step"] for c in best["candidates"]] == [2, 4, 6, 8]
    assert best_step(tmp_path, "eval_reward") is None


# --------------------------------------------------------------------------- a real run

def dlrl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_a_run_evaluates_its_protocol_keeps_its_checkpoints_and_names_the_best(tmp_path):
    """4 steps of the tiny job, evaluated every 2 under the tiny-sudoku protocol (8 puzzles),
    checkpoints kept every 2: what the run logged and chose is what `dlrl eval` finds afterwards."""
    protocol = small_protocol(tmp_path / "protocol")
    train = ["train", str(ROOT / "deploy/jobs/tiny-sudoku.toml"),
             "--set", "train.steps=4", "--set", "eval.every=2", "--set", "train.lr=0.002",
             "--set", "rollout.prompts_per_step=4", "--set", "rollout.group_size=4",
             "--set", "runtime.checkpoint_every=2", "--set", "runtime.keep_checkpoints=true",
             "--set", f"eval.protocol={protocol}", "--set", f"runtime.out_dir={tmp_path}",
             "--set", "runtime.num_cpus=2", "--set", "name=kept"]
    r = dlrl(*train)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "kept"
    evals = [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "eval"]
    assert [x["step"] for x in evals] == [0, 2, 4]
    periodic = {x["step"]: x["eval_score"] for x in evals}
    for x in evals:
        summary = json.loads((run / f"eval/step-{x['step']}/summary.json").read_text())
        assert summary["n"] == 8 and summary["protocol"]["sha256"] == json.loads(
            (run / "best.json").read_text())["protocol"]["sha256"]
        assert x["eval_score"] == summary["score"] == x["eval_reward"]  # metric: mean_reward
        assert x["eval_solved"] == summary["accuracy"] and x["eval_n"] == 8
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-2", "step-4"]
    for name in kept:
        assert (run / "checkpoints" / name / "model.safetensors").is_file()
        assert not (run / "checkpoints" / name / "trainer_state.pt").exists()  # no optimizer state
    best = json.loads((run / "best.json").read_text())
    scores = {2: periodic[2], 4: periodic[4]}
    assert best["best_step"] == min(s for s in scores if scores[s] == max(scores.values()))
    assert best["score"] == periodic[best["best_step"]]

    # `dlrl eval` of the run afterwards: the same scores per step, the same best step
    r = dlrl("eval", str(run), "--protocol", str(protocol), "--out", str(tmp_path / "after"))
    assert r.returncode == 0, r.stderr
    after = json.loads((tmp_path / "after/summary.json").read_text())
    assert {c["step"]: c["score"] for c in after["checkpoints"]} == scores
    assert after["best_step"] == best["best_step"]

    # the first periodic evaluation is `dlrl eval` of the starting model, to the digit
    r = dlrl("eval", "builtin:tiny-sudoku", "--protocol", str(protocol), "--out", str(tmp_path / "start"))
    assert r.returncode == 0, r.stderr
    start = json.loads((tmp_path / "start/summary.json").read_text())
    assert start["score"] == periodic[0]
    first = json.loads((run / "eval/step-0/summary.json").read_text())
    assert (run / "eval/step-0/results.jsonl").read_bytes() == (tmp_path / "start/results.jsonl").read_bytes()
    assert first["data"] == start["data"] and first["protocol"] == start["protocol"]

    # resuming (here: the finished run, which redoes its final evaluation) keeps the kept
    # checkpoints and arrives at the same best.json
    r = dlrl(*train, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept
    assert json.loads((run / "best.json").read_text()) == best
    assert [x["step"] for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "eval"] == [0, 2, 4]
