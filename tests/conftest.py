"""Shared fixtures: tiny real models of the project (never mocks)."""

from __future__ import annotations

import os
from collections.abc import Callable

# A one-machine Ray cluster stays on loopback: read by Ray when it is imported, so set first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel


@pytest.fixture
def tiny_model_f64() -> BidirectionalModel:
    """A 2-layer built-in model in float64, for exact-equivalence checks."""
    torch.manual_seed(0)
    cfg = BidirectionalConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64,
                              initializer_range=0.2)
    return BidirectionalModel(cfg).double()


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server (AOF on, password) per test session, on a free loopback port."""
    from tests.local_cluster import RedisProcess

    server = RedisProcess().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray head (`ray start --head`) per test session; this process is connected to it."""
    import ray

    from tests.local_cluster import RayHead

    head = RayHead().start()
    ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
    yield head
    ray.shutdown()
    head.cleanup()


RUN_COUNTS = pytest.StashKey[list[str]]()


@pytest.fixture
def report_counts(request) -> Callable[[str], None]:
    """Adds a line to the "run counts" section at the end of the session: the chaos tests' counts
    (groups trained, duplicates dropped, recovery seconds) show in a plain `pytest -q` CI log."""
    return request.config.stash.setdefault(RUN_COUNTS, []).append


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    lines = config.stash.get(RUN_COUNTS, [])
    if lines:
        terminalreporter.section("run counts")
        for line in lines:
            terminalreporter.write_line(line)
