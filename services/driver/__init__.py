"""The job driver process (`dlrl train`): places the run's actors, runs rollout workers, the
trajectory queue and the learner (group) step by step, evaluates, checkpoints and logs
(services/driver/driver.py reads top to bottom)."""
