"""The HTTP API process (`dlrl serve`): admission, the job store in Redis, Ray Jobs submission,
and the client the `dlrl` commands use to talk to it (services/README.md).

It imports no role (rollout/, learner/) and not the job driver: a job runs as a Ray Job,
`dlrl train`, which the API only submits and watches (tests/test_import_walls.py)."""
