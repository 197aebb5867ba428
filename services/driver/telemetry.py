"""Run metrics in the Ray dashboard: `ray.util.metrics` gauges, counters and a staleness histogram.

The driver records every step's metrics here as well as in metrics.jsonl. Ray exports them in
Prometheus format from each node's metrics agent (the dashboard's "Metrics" tab shows them once
Prometheus/Grafana are set up, see README "Watching a run"); every series is tagged with the job.
"""

from __future__ import annotations

from typing import Any

from ray.util import metrics as ray_metrics

GAUGES = {
    "reward": "Mean training reward of the step's groups",
    "eval_reward": "Greedy held-out reward",
    "loss": "BGPO loss of the step",
    "rollout_tokens_per_s": "Generated tokens per second, all rollout workers",
    "learner_tokens_per_s": "Trajectory tokens per second the learner scores (each row's tokens once per forward of "
                            "it: its n_mc ELBO samples per update and the old-policy pass), whatever the family",
    "learner_forward_tokens_per_s": "Token positions per second through the learner's model: learner_tokens_per_s, "
                                    "x2 for a block-diffusion family ([x_t ; x_0])",
    "queue_depth": "Trajectory groups queued or delivered but not yet acknowledged",
    "weight_sync_seconds": "Seconds to publish and deliver one weights version",
    "weight_sync_bytes": "Bytes of one weights version",
    "step_seconds": "Wall-clock seconds per learner step",
    "learner_idle_fraction": "Fraction of the step the learner waited for groups",
    "rollout_idle_fraction": "Fraction of the step rollout workers were not generating",
    "learner_memory_bytes": "Peak resident memory of the learner (CUDA: peak allocated)",
    "policy_version": "Weights version the learner holds",
}
COUNTERS = {
    "stale_dropped": "Groups dropped for exceeding max_staleness",
    "duplicates_dropped": "Redelivered groups dropped because their id was already trained on",
    "future_dropped": "Groups from weights newer than the learner's (after a rewind), dropped",
    "reward_errors": "Reward calls that raised or timed out (scored 0)",
}


class RunMetrics:
    """The dashboard series of one job; `record` takes the same dict that goes to metrics.jsonl."""

    def __init__(self, job: str, max_staleness: int) -> None:
        self.tags = {"job": job}
        self.gauges = {k: ray_metrics.Gauge(f"dlrl_{k}", description=d, tag_keys=("job",)) for k, d in GAUGES.items()}
        self.counters = {k: ray_metrics.Counter(f"dlrl_{k}_total", description=d, tag_keys=("job",))
                         for k, d in COUNTERS.items()}
        self.staleness = ray_metrics.Histogram(
            "dlrl_staleness", description="Weight versions between a group's policy and the learner's",
            boundaries=[float(b) + 0.5 for b in range(max(max_staleness, 1) + 1)], tag_keys=("job",))
        self.steps = ray_metrics.Counter("dlrl_steps_total", description="Learner steps", tag_keys=("job",))

    def record(self, metrics: dict[str, Any]) -> None:
        for k, gauge in self.gauges.items():
            if k in metrics:
                gauge.set(float(metrics[k]), tags=self.tags)
        if "version" in metrics:
            self.gauges["policy_version"].set(float(metrics["version"]), tags=self.tags)
        for k, counter in self.counters.items():
            if metrics.get(k):
                counter.inc(float(metrics[k]), tags=self.tags)
        for s, n in (metrics.get("staleness_hist") or {}).items():
            for _ in range(int(n)):
                self.staleness.observe(float(s), tags=self.tags)
        if metrics.get("kind") == "train":
            self.steps.inc(1.0, tags=self.tags)
