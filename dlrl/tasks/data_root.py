"""Where task data files may be read from: the operator's data root, when one is set.

A job started by the job API gets `DLRL_DATA_ROOT` in its environment (the API's admission policy
already refused paths outside it); this is the second lock, at the moment a file is opened, so a
symlink swapped in after admission, or a path that reached a task some other way, still cannot
name a file outside the root. Without the variable (`dlrl train` on the operator's own command
line) any path is allowed: there the user is the operator.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "DLRL_DATA_ROOT"


class DataPathError(ValueError):
    """A task data path lies outside the data root."""


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink and `..` resolved, is `root` or below it."""
    real, base = path.expanduser().resolve(), root.expanduser().resolve()
    return real == base or base in real.parents


def resolve_data_path(path: str | Path, root: str | Path | None = None) -> Path:
    """`path` as an absolute, symlink-free path, checked against the data root (`root`, else
    $DLRL_DATA_ROOT; no check when neither is set). A relative path is taken relative to the root."""
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or None
    path = Path(path).expanduser()
    if root is None:
        return path.resolve()
    base = Path(root).expanduser().resolve()
    full = (path if path.is_absolute() else base / path).resolve()
    if not inside(full, base):
        raise DataPathError(f"data path {str(path)!r} is outside the data root {str(base)!r}")
    return full
