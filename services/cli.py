"""The `dlrl` command.

    dlrl train deploy/jobs/tiny-sudoku.toml                 # the embedded default job
    dlrl train spec.toml --set train.steps=3 --set name=smoke
    dlrl validate spec.toml                                 # check a spec, print it resolved
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from dlrl.config import JobSpec


def _parse_value(text: str) -> Any:
    """A --set value: JSON if it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_spec(path: str, overrides: list[str]) -> JobSpec:
    """The TOML spec with dotted `section.key=value` overrides applied, validated as a whole."""
    spec = JobSpec.from_toml(path)
    data = spec.model_dump()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"dlrl: --set needs key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"dlrl: --set {key}: {part!r} is not a section")
            node = node[part]
        node[leaf] = _parse_value(value)
    return JobSpec.model_validate(data)


def _explain(exc: ValidationError) -> str:
    lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}" for err in exc.errors()]
    return "invalid job spec:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlrl", description="RL for diffusion language models (BGPO).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run an RL job from a TOML spec")
    validate = sub.add_parser("validate", help="validate a TOML spec and print it with defaults")
    for p in (train, validate):
        p.add_argument("spec", help="job spec (TOML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. --set train.steps=3 (repeatable)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
    except ValidationError as exc:
        print(f"dlrl: {_explain(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # missing file, TOML syntax
        print(f"dlrl: cannot read {args.spec}: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(spec.model_dump_json(indent=2))
        return 0
    from services.driver import run  # heavy imports (ray, torch) only when training

    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
