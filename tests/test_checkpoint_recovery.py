"""What a save killed half-way leaves, cleared before a learner is (re)built (learner.train's
recover_checkpoint, services.driver.driver's recover_saves): on real folders, as `save` and
`_replace_dir` leave them at each point a SIGKILL can land."""

from __future__ import annotations

import json
from pathlib import Path

from learner.train import STATE_JSON, read_state, recover_checkpoint
from services.driver.driver import recover_saves


def checkpoint(path: Path, version: int) -> Path:
    path.mkdir(parents=True)
    (path / STATE_JSON).write_text(json.dumps({"version": version}) + "\n")
    return path


def test_a_killed_saves_temporary_folder_goes_and_the_last_checkpoint_stays(tmp_path):
    ckpt = checkpoint(tmp_path / "checkpoint", 2)
    checkpoint(tmp_path / "checkpoint.tmp-4242", 4)  # single learner: killed before the rename
    checkpoint(tmp_path / "checkpoint.tmp-v4", 4)  # learner group: the same
    recover_checkpoint(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert read_state(ckpt)["version"] == 2


def test_a_save_killed_between_its_two_renames_gets_the_last_checkpoint_back(tmp_path):
    checkpoint(tmp_path / "checkpoint.old", 2)  # `checkpoint` renamed away, the new one not yet in place
    checkpoint(tmp_path / "checkpoint.tmp-4242", 4)
    recover_checkpoint(tmp_path / "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert read_state(tmp_path / "checkpoint")["version"] == 2  # its queue entries were the last acknowledged


def test_a_save_killed_after_the_new_checkpoint_was_in_place_keeps_it(tmp_path):
    checkpoint(tmp_path / "checkpoint", 4)
    checkpoint(tmp_path / "checkpoint.old", 2)  # not yet removed
    recover_checkpoint(tmp_path / "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert read_state(tmp_path / "checkpoint")["version"] == 4


def test_recover_saves_clears_the_kept_checkpoints_too(tmp_path):
    checkpoint(tmp_path / "checkpoint", 2)
    kept = tmp_path / "checkpoints"
    checkpoint(kept / "step-2", 2)
    checkpoint(kept / "step-4.tmp-4242", 4)
    checkpoint(kept / "step-4.old", 4)  # an earlier try of step 4, mid-replacement
    recover_saves(tmp_path)
    assert sorted(p.name for p in kept.iterdir()) == ["step-2", "step-4"]
    recover_saves(tmp_path / "missing")  # no run folder yet: nothing to do, no error
