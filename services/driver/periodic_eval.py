"""The run's periodic held-out evaluation, and the kept checkpoint it rates best.

Every `eval.every` learner steps (and after the last) rollout worker 0 evaluates the weights of
that step. With `eval.protocol` it runs the protocol through rollout.evaluation.evaluate_model,
the function `dlrl eval` runs, so a run's curve and a later `dlrl eval` of its checkpoints are one
measurement (same eval set, prompts, answer extraction, decoding, seeds): the record in
metrics.jsonl gets `eval_score` (the protocol's headline metric) and <run>/eval/step-<k>/ gets
results.jsonl, summary.json and summary.md. Without one it is the built-in greedy held-out reward
(rollout.completion.evaluate), as before.

BGPO reports the best checkpoint of a run, evaluated every 20 steps. With
`runtime.keep_checkpoints` the learner keeps each checkpoint as <run>/checkpoints/step-<k>, and
after every logged evaluation <run>/best.json names the kept step whose evaluation scored highest
(ties: the earliest step), which is what `dlrl eval <run> --protocol <eval.protocol>` selects
after the run (rollout.evaluation.evaluate_run). best.json is recomputed from metrics.jsonl each
time, so a rewound or resumed run (whose metrics are truncated to its checkpoint) stays right.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray

from dlrl.config import JobSpec
from services.driver.progress import read_metrics

EVAL_DIR, KEPT_DIR, BEST = "eval", "checkpoints", "best.json"


def step_name(step: int) -> str:
    return f"step-{step}"


class PeriodicEval:
    """Starts the run's evaluations on one worker and keeps best.json up to date."""

    def __init__(self, spec: JobSpec, run_dir: Path, worker: ray.actor.ActorHandle) -> None:
        self.spec, self.run_dir, self.worker = spec, run_dir, worker
        self.metric = "eval_score" if spec.eval.protocol else "eval_reward"
        self.protocol = None
        if spec.eval.protocol:
            from dlrl.eval_protocol import EvalProtocol

            p = EvalProtocol.from_toml(spec.eval.protocol)
            self.protocol = {"file": p.path, "name": p.name, "sha256": p.sha256, "metric": p.metric}

    def start(self, step: int, handle) -> ray.ObjectRef:
        """The evaluation of the weights `handle` names, as the metrics record of `step`."""
        if self.spec.eval.protocol:
            out = self.run_dir / EVAL_DIR / step_name(step)
            return self.worker.evaluate_protocol.remote(step, str(out), handle=handle)
        steps = self.spec.eval.steps or self.spec.rollout.steps
        return self.worker.evaluate.remote(self.spec.task.eval_size, steps, handle=handle)

    def kept(self, step: int) -> str | None:
        """Where the learner keeps the checkpoint of `step` (None: checkpoints are not kept)."""
        return str(self.run_dir / KEPT_DIR / step_name(step)) if self.spec.runtime.keep_checkpoints else None

    def update_best(self) -> dict | None:
        """Rewrite <run>/best.json from the evaluations of the kept steps (None when not keeping)."""
        if not self.spec.runtime.keep_checkpoints:
            return None
        best = best_step(self.run_dir, self.metric)
        if best is None:
            return None
        best = {**best, "protocol": self.protocol}
        tmp = self.run_dir / f"{BEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(best, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.run_dir / BEST)
        return best


def best_step(run_dir: Path, metric: str) -> dict | None:
    """The evaluated step with a kept checkpoint whose `metric` is highest, ties to the earliest;
    None before any such step."""
    scores: dict[int, float] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        step = record.get("step")
        if record.get("kind") == "eval" and metric in record and (run_dir / KEPT_DIR / step_name(step)).is_dir():
            scores[step] = float(record[metric])
    if not scores:
        return None
    best = None
    for step in sorted(scores):
        if best is None or scores[step] > scores[best]:
            best = step
    return {"metric": metric, "best_step": best, "score": scores[best],
            "checkpoint": f"{KEPT_DIR}/{step_name(best)}",
            "candidates": [{"step": s, "score": scores[s]} for s in sorted(scores)]}


def clear_outputs(run_dir: Path) -> None:
    """A fresh run under an old run's name: its evaluations, kept checkpoints and best.json go."""
    for name in (EVAL_DIR, KEPT_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / BEST).unlink(missing_ok=True)
