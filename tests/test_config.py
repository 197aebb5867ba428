"""JobSpec: TOML in, clear errors out, and the CLI's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dlrl.config import JobSpec
from services.cli import load_spec, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "deploy/jobs/tiny-sudoku.toml"


def test_shipped_specs_validate():
    for path in (ROOT / "deploy/jobs").glob("*.toml"):
        JobSpec.from_toml(path)


def test_overrides_are_typed_and_validated():
    spec = load_spec(str(TINY), ["train.steps=3", "name=smoke", "train.algorithm=naive_elbo"])
    assert spec.train.steps == 3 and spec.name == "smoke" and spec.train.algorithm == "naive_elbo"
    with pytest.raises(ValidationError):
        load_spec(str(TINY), ["train.mc_chunk=99"])  # chunk larger than n_mc


def test_mc_chunk_is_a_number_or_auto():
    assert load_spec(str(TINY), ["train.mc_chunk=auto"]).train.mc_chunk == "auto"
    assert JobSpec.model_validate({"train": {"n_mc": 4, "mc_chunk": "auto"}}).train.mc_chunk == "auto"
    for bad in ("Auto", "4", 0, True):
        with pytest.raises(ValidationError):
            JobSpec.model_validate({"train": {"n_mc": 4, "mc_chunk": bad}})
    spec = JobSpec.model_validate({"train": {"mc_chunk": "auto", "activation_checkpointing": True}})
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec  # the API's round trip


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"train": {"n_mc": 0}}, "train.n_mc"),
        ({"train": {"algorithm": "ppo"}}, "train.algorithm"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"nmc": 4}}, "train.nmc"),  # typo: unknown keys are errors
        ({"rollout": {"gen_length": 30, "block_length": 20}}, "rollout"),
        ({"rollout": {"steps": 3, "gen_length": 40, "block_length": 20}}, "rollout"),
        ({"name": "../etc"}, "name"),
        ({"task": {"style": "fancy"}}, "task.style"),
    ],
)
def test_bad_specs_name_the_field(patch, field):
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(patch)
    locs = {".".join(str(p) for p in e["loc"]) for e in err.value.errors()}
    assert any(loc.startswith(field) for loc in locs), locs


def test_cli_reports_invalid_spec_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nn_mc = "many"\n')
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.n_mc" in err and "Traceback" not in err
    assert main(["validate", str(tmp_path / "missing.toml")]) == 2


def test_front_door_refuses_what_the_named_engine_cannot_do(capsys):
    """The schema (core) cannot know the engines; `dlrl validate` / `train` ask the registry
    before any Ray process starts, with the engine's own sentence."""
    spec = str(ROOT / "deploy/jobs/tiny-sudoku.toml")
    assert main(["validate", spec, "--set", 'rollout.engine="fast"']) == 2
    assert "engine 'fast' is not a rollout engine: one of reference, cached" in capsys.readouterr().err
    assert main(["validate", spec, "--set", "rollout.threshold=0.9"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["validate", spec, "--set", 'rollout.engine="cached"', "--set", "rollout.threshold=0.9"]) == 0
