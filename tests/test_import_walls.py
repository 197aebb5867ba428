"""The walls between the packages, read from the source: no role imports another.

dlrl/ is the core every process shares; rollout/ (the rollout worker) and learner/ (the learner)
are the two roles; services/ holds the two processes that wire them, a package each: the job
driver (services/driver/) and the HTTP API (services/api/). The walls:

- rollout/ and learner/ never import each other (what both need lives in the core);
- the core (dlrl/) imports no role and no service;
- the API (services/api/) imports no role, and not the job driver either: it submits a job as a
  Ray Job (`dlrl train`) and reads the job store, it never runs one.

services/cli.py, the `dlrl` command, is the front door to both processes and may import either
side (lazily: `dlrl serve` never loads torch).

Every `import` and `from ... import` anywhere in a module counts, the lazy ones inside functions
and under `if TYPE_CHECKING:` too, relative imports resolved against the module's package, and so
does `importlib.import_module("...")` with a literal name.

    pytest tests/test_import_walls.py -q
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dlrl", "rollout", "learner", "services")
"""The shipped packages whose modules are read (tests/, bench/ and scripts/ may import anything)."""

API = "services.api"
"""The HTTP API process (and the client the `dlrl` commands use to talk to it)."""
DRIVER = "services.driver"
"""The job driver process."""


@dataclass(frozen=True)
class Wall:
    sources: tuple[str, ...]
    """Modules (dotted prefixes) the wall applies to."""
    forbidden: tuple[str, ...]
    """What they may not import (dotted prefixes)."""
    why: str


WALLS = (
    Wall(("rollout",), ("learner",), "rollout/ never imports learner/: what both need belongs in the core (dlrl/)"),
    Wall(("learner",), ("rollout",), "learner/ never imports rollout/: what both need belongs in the core (dlrl/)"),
    Wall(("dlrl",), ("rollout", "learner", "services"), "the core (dlrl/) imports no role and no service"),
    Wall((API,), ("rollout", "learner", DRIVER),
         "the API imports no role and not the job driver (it submits jobs, it never runs one)"),
)


@dataclass(frozen=True)
class Edge:
    path: Path
    line: int
    target: str
    """The imported module (or module.name for `from module import name`), absolute."""


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports(path: Path, root: Path) -> list[Edge]:
    """Every import in the module at `path`, at any depth, with relative ones made absolute.

    `from pkg import name` yields pkg.name (name may be a submodule: `from services import driver`
    imports services.driver), and `from pkg import *` yields pkg."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            edges += [Edge(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]  # level 1: this package; 2: its parent...
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            edges += [Edge(path, node.lineno, module if alias.name == "*" else f"{module}.{alias.name}")
                      for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            edges.append(Edge(path, node.lineno, node.args[0].value))
    return edges


def breaches(root: Path, packages: tuple[str, ...] = PACKAGES, walls: tuple[Wall, ...] = WALLS) -> list[str]:
    """One line per import that crosses a wall: `file:line: module imports target (why)`."""
    out = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            source = module_name(path, root)
            for wall in walls:
                if not any(under(source, s) for s in wall.sources):
                    continue
                for edge in imports(path, root):
                    if any(under(edge.target, f) for f in wall.forbidden):
                        out.append(f"{path.relative_to(root)}:{edge.line}: {source} imports {edge.target} ({wall.why})")
    return out


def test_no_role_imports_another():
    found = breaches(ROOT)
    assert not found, f"{len(found)} import(s) cross a wall between packages:\n" + "\n".join(found)


def test_every_services_module_is_on_a_side():
    """A module dropped straight into services/ would be under no wall: it belongs to the API or
    to the driver (only the `dlrl` command, the front door, sits between them)."""
    modules = {module_name(p, ROOT) for p in (ROOT / "services").rglob("*.py")}
    placed = {m for m in modules if under(m, API) or under(m, DRIVER)}
    assert modules - placed == {"services", "services.cli"}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_walker_sees_lazy_relative_and_dynamic_imports(tmp_path: Path):
    write(tmp_path, {
        "dlrl/__init__.py": "",
        "dlrl/core.py": "from . import trajectory\nfrom .trajectory import Group\n",  # inside the core: fine
        "dlrl/trajectory.py": "def load():\n    import importlib\n    return importlib.import_module('learner.step')\n",
        "rollout/__init__.py": "",
        "rollout/engines/__init__.py": "",
        "rollout/engines/cached.py": (
            "import torch\n\n\ndef old_terms(batch):\n    if batch:\n        from learner.step import elbo_chunk\n"
            "        return elbo_chunk(batch)\n"),
        "learner/__init__.py": "from rollout import *  # noqa\n",
        "services/__init__.py": "",
        "services/api/routes.py": (
            "from ..driver.driver import run\nfrom ..driver import placement\nfrom .jobstore import JobStore\n"
            "from services import cli\n"),
    })
    found = breaches(tmp_path)
    assert [line.split(" (")[0] for line in found] == [
        "dlrl/trajectory.py:3: dlrl.trajectory imports learner.step",
        "rollout/engines/cached.py:6: rollout.engines.cached imports learner.step.elbo_chunk",
        "learner/__init__.py:1: learner imports rollout",
        "services/api/routes.py:1: services.api.routes imports services.driver.driver.run",
        "services/api/routes.py:2: services.api.routes imports services.driver.placement",
    ]
    assert "the core (dlrl/) imports no role" in found[0]
