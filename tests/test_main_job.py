"""The main job end to end: `dlrl train` on the shipped tiny Sudoku spec, a few steps, real Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlrl.models import load_model
from services.driver.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def train_a_few_steps(job: str, steps: int, out_dir: Path, name: str) -> subprocess.CompletedProcess:
    """`dlrl train deploy/jobs/JOB.toml` shrunk to a CI-sized run: `steps` steps, evaluations every 2
    on 8 puzzles, 4 prompts x 4 completions, on local Ray with 2 CPUs."""
    cmd = [
        sys.executable, "-m", "services.cli", "train", str(ROOT / f"deploy/jobs/{job}.toml"),
        "--set", f"train.steps={steps}", "--set", "eval.every=2", "--set", "task.eval_size=8",
        "--set", "rollout.prompts_per_step=4", "--set", "rollout.group_size=4",
        "--set", f"runtime.out_dir={out_dir}", "--set", "runtime.num_cpus=2", "--set", f"name={name}",
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dlrl_train_runs_the_tiny_job(tmp_path):
    proc = train_a_few_steps("tiny-sudoku", 3, tmp_path, "smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "step    3/3" in out and "tok/s" in out and "ETA" in out  # progress lines
    run = tmp_path / "smoke"
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3]  # the steps done (services.driver.progress.RunLog)
    assert [r["step"] for r in evals] == [0, 2, 3]  # every 2 steps, and after the last
    assert all(0.0 <= r["reward"] <= 1.0 for r in train)
    assert [r["version"] for r in train] == [1, 2, 3]
    assert all(r["max_staleness"] == 0 for r in train)  # synchronous: exactly on-policy
    assert (run / "reward.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    # The final checkpoint is a loadable HF checkpoint that differs from the start.
    model, tok = load_model(run / "checkpoint")
    start, _ = load_model("builtin:tiny-sudoku")
    ids = torch.tensor([tok("12.4\n", add_special_tokens=False)["input_ids"]])
    assert not torch.equal(model(ids).logits, start(ids).logits)


@pytest.mark.slow
def test_dlrl_train_runs_the_tiny_block_job(tmp_path):
    """The block-diffusion job (deploy/jobs/tiny-sudoku-block.toml: the shipped SDAR checkpoint, the
    block engine, BGPO on the block ELBO) for a few steps through `dlrl train` and local Ray: every
    metric is written and finite, and the weights move."""
    proc = train_a_few_steps("tiny-sudoku-block", 2, tmp_path, "block")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "block"
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2]  # a train record's step is the steps done
    assert [r["step"] for r in evals] == [0, 2]
    for r in records:
        numbers = [v for v in r.values() if isinstance(v, (int, float))]
        assert all(math.isfinite(v) for v in numbers), r
    assert all(0.0 <= r["reward"] <= 1.0 for r in train) and all(0.0 <= r["eval_reward"] <= 1.0 for r in evals)
    for key in ("loss", "grad_norm", "elbo_old", "rollout_tokens_per_step"):
        assert all(key in r for r in train), key
    assert all(r["elbo_old"] < 0 for r in train)  # a log-likelihood bound, measured on the block ELBO
    assert all(r["max_staleness"] == 0 for r in train)
    model, tok = load_model(run / "checkpoint")
    start, _ = load_model("builtin:tiny-sudoku-block")
    assert type(model).__name__ == "SDARForCausalLM"
    ids = torch.tensor([tok("12.4\n", add_special_tokens=False)["input_ids"]])
    assert not torch.equal(model(ids).logits, start(ids).logits)
