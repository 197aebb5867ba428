"""Let the GPU benchmarks import the learner and weight-sync code where Ray is not installed.

A lent GPU machine has torch and transformers but no Ray, and Ray's wheel (about 70 MB) is over
what a call can carry (64 MiB). The benchmarks use no Ray: they call the learner step, the
engines and dlrl.weights' encode / collective broadcast directly. But `dlrl.weights` imports its
object-store ends (endpoints.py, object_store.py), which `import ray` at module level for
`ray.put` / `ray.get` inside functions, and learner.step imports dlrl.weights (via
learner.sharding). Where Ray is missing, `allow_missing_ray()` registers a module named "ray" in
its place whose every attribute raises ImportError naming Ray: the imports succeed, and any path
that would really use Ray (ray.put, ray.get) fails loudly instead of running without it.
Where Ray is installed it does nothing. (The lasting fix is a function-level `import ray` in those
two dlrl/weights modules.)
"""

from __future__ import annotations

import importlib.util
import sys
import types


class _MissingRay(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # import machinery and introspection probe dunders
            raise AttributeError(name)
        raise ImportError(f"ray.{name}: Ray is not installed here; this benchmark path needs the Ray object store")


def allow_missing_ray() -> bool:
    """Register the placeholder if Ray cannot be imported; True if it did."""
    if "ray" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("ray") is not None:
            return False
    except ImportError:  # a finder that refuses Ray (as the test that hides it does)
        pass
    sys.modules["ray"] = _MissingRay("ray", "placeholder: Ray is not installed (bench/without_ray.py)")
    return True
