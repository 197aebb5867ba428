"""A `JobSpec` written back as TOML, optionally with each field's docstring above it.

`dlrl validate spec.toml` prints the spec it resolved in the format it was given, and
`dlrl validate --explain` prints the same with every field documented: the docs are the field
docstrings of dlrl.config (pydantic keeps them as descriptions, `use_attribute_docstrings`), so
they cannot drift from the type. The spec is flat (sections of scalars, lists and the task's
options; `model.lora` one level down), which is all this writer knows how to write. TOML has no
null: a field set to None is written as a comment, which is what leaving it out means for every
field whose default is None.
"""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

from pydantic import BaseModel

WIDTH = 100


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML cannot hold {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (same escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _doc(model: type[BaseModel], name: str) -> list[str]:
    text = " ".join((model.model_fields[name].description or "").split())
    return [f"# {line}" for line in textwrap.wrap(text, WIDTH - 2)] if text else []


def to_toml(spec: BaseModel, explain: bool = False) -> str:
    """`spec` as TOML that `JobSpec.from_toml` reads back to the same spec (None fields aside, see
    the module docstring); with `explain`, each field's docstring as comments above it."""
    out: list[str] = []
    _table(spec, [], out, explain)
    return "\n".join(out).strip() + "\n"


def _table(model: BaseModel, path: list[str], out: list[str], explain: bool,
           parent: type[BaseModel] | None = None) -> None:
    cls = type(model)
    if path:
        out.append("")
        if explain and parent is not None:
            own = parent.model_fields[path[-1]].description
            text = " ".join((own or cls.__doc__ or "").split())
            out.extend(f"# {line}" for line in textwrap.wrap(text, WIDTH - 2))
        out.append(f"[{'.'.join(path)}]")
    tables = []
    for name in cls.model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            tables.append(name)
            continue
        if explain:
            out.extend(_doc(cls, name))
        out.append(f"# {name} = (none)" if value is None else f"{_key(name)} = {_value(value)}")
    for name in tables:
        _table(getattr(model, name), [*path, name], out, explain, cls)
