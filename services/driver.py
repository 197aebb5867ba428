"""The job driver: wires rollout workers, the trajectory queue and the learner into an RL run.

`dlrl train spec.toml` calls `run`. It starts (or joins) Ray, launches the rollout actor(s) and the
learner actor, and runs synchronous on-policy RL:

    publish weights v -> workers sample + score groups -> Ray queue -> learner pops a batch,
    chunked BGPO step -> weights v+1 (object store) -> ...

Every `eval.every` steps worker 0 decodes the held-out set greedily. The run directory gets
spec.json, metrics.jsonl, reward.png and a final HF checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import ray
from ray.util.queue import Queue

from dlrl.config import JobSpec
from learner.train import Learner
from rollout.worker import RolloutWorker
from services.progress import RunLog, plot_rewards, read_metrics


def start_ray(spec: JobSpec) -> None:
    """Join the configured cluster, or start an in-process Ray sized for this machine."""
    if ray.is_initialized():
        return
    if spec.runtime.ray_address:
        ray.init(address=spec.runtime.ray_address, log_to_driver=True)
    else:
        ray.init(num_cpus=spec.runtime.num_cpus, include_dashboard=False, log_to_driver=True,
                 object_store_memory=256 * 1024 * 1024)


def _actor_resources(spec: JobSpec) -> dict[str, float]:
    """Sync actors take turns, so they share the machine: a fraction of a CPU (and GPU) each."""
    n = spec.rollout.num_workers + 1
    res = {"num_cpus": 1.0 / n}
    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.runtime.device != "cpu" and gpus >= 1:
        res["num_gpus"] = 1.0 / n
    return res


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run(spec: JobSpec, *, resume: bool = False, on_record: Callable[[dict], None] | None = None) -> dict:
    """Run the whole job; returns the final summary (also written to <run>/summary.json).

    `resume`: continue from <run>/state/ (the last atomic checkpoint). `on_record`: called with every
    metrics record as it is appended to metrics.jsonl (the job service mirrors them into Redis).
    """
    run_dir = Path(spec.runtime.out_dir) / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    start_ray(spec)
    res = _actor_resources(spec)
    n_workers = spec.rollout.num_workers
    queue = Queue(maxsize=spec.rollout.prompts_per_step * 2)
    workers = [ray.remote(RolloutWorker).options(**res).remote(spec, i, n_workers) for i in range(n_workers)]
    learner = ray.remote(Learner).options(**res).remote(spec)
    log = RunLog(run_dir, spec.train.steps, sink=on_record)
    eval_steps = spec.eval.steps or spec.rollout.steps
    print(f"dlrl: job {spec.name!r}: {spec.train.algorithm} on {spec.task.name}, model {spec.model.path}, "
          f"{n_workers} rollout worker(s), {spec.train.steps} steps -> {run_dir}", flush=True)

    weights = learner.weights.remote()
    version = 0
    for step in range(spec.train.steps):
        t0 = time.perf_counter()
        ray.get([w.set_weights.remote(version, weights) for w in workers])
        if step % spec.eval.every == 0:
            log.eval(step, ray.get(workers[0].evaluate.remote(spec.task.eval_size, eval_steps)))
        shares = _split(spec.rollout.prompts_per_step, n_workers)
        rollouts = [w.rollout_to_queue.remote(queue, k, step) for w, k in zip(workers, shares) if k]
        metrics = ray.get(learner.step_from_queue.remote(queue, spec.rollout.prompts_per_step))
        rolled = ray.get(rollouts)
        weights = learner.weights.remote()
        version = metrics["version"]
        rollout_seconds = max(r["rollout_seconds"] for r in rolled)
        metrics.update(
            rollout_seconds=rollout_seconds,
            rollout_tokens_per_s=sum(r["rollout_tokens"] for r in rolled) / max(rollout_seconds, 1e-9),
            step_seconds=time.perf_counter() - t0,
        )
        log.step(step, metrics)
        if spec.runtime.checkpoint_every and (step + 1) % spec.runtime.checkpoint_every == 0:
            ray.get(learner.save.remote(str(run_dir / "checkpoint")))
        if (step + 1) % spec.eval.every == 0:
            plot_rewards(run_dir, f"{spec.name}: {spec.train.algorithm} on {spec.task.name}")

    ray.get([w.set_weights.remote(version, weights) for w in workers])
    log.eval(spec.train.steps, ray.get(workers[0].evaluate.remote(spec.task.eval_size, eval_steps)))
    checkpoint = ray.get(learner.save.remote(str(run_dir / "checkpoint")))
    png = plot_rewards(run_dir, f"{spec.name}: {spec.train.algorithm} on {spec.task.name}")
    evals = [r["eval_reward"] for r in _evals(run_dir)]
    summary = {
        "name": spec.name,
        "steps": spec.train.steps,
        "algorithm": spec.train.algorithm,
        "first_eval_reward": evals[0],
        "last3_eval_reward": sum(evals[-3:]) / len(evals[-3:]),
        "eval_rewards": evals,
        "seconds": time.time() - log.t0,
        "checkpoint": checkpoint,
        "reward_png": str(png),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"dlrl: done in {summary['seconds'] / 60:.1f} min: held-out reward {summary['first_eval_reward']:.3f}"
          f" -> {summary['last3_eval_reward']:.3f} (mean of last 3 evals); checkpoint {checkpoint}; curve {png}",
          flush=True)
    for actor in [*workers, learner]:
        ray.kill(actor)
    return summary


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
