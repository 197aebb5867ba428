"""The published checkpoints' parameter names, mapped explicitly onto the native modules.

`published_names(config)` lists every tensor a published checkpoint of that config's family
holds (each family module restates it from the published modeling file's module tree) -> our
parameter name. The native modules keep the published tree, so the map is the identity today; it
is still written out, because it is what `check_checkpoint` compares a checkpoint against before loading:
transformers only warns about missing weights and initialises them at random, which for an 8B
checkpoint with a renamed tensor would silently train a broken model.

`checkpoint_names` reads the names of a single `model.safetensors` or of the shards an index
names; transformers' `from_pretrained` then loads the tensors (meta-device init, dtype, shards).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from transformers import PretrainedConfig

from dlrl.models.families import family_of

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def published_names(config: PretrainedConfig) -> dict[str, str]:
    """Every tensor name of the published layout for `config` -> the native parameter name."""
    family = family_of(config)
    if family.published_names is None:
        raise ValueError(f"no published name map for model_type {config.model_type!r}")
    return family.published_names(config)


def checkpoint_names(directory: str | Path) -> dict[str, str]:
    """Tensor name -> file it lives in, for a single-file or a sharded (indexed) checkpoint."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return {name: str(directory / f) for name, f in weight_map.items()}
    if (directory / SINGLE).is_file():
        with safe_open(directory / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), str(directory / SINGLE))
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {directory}")


def check_checkpoint(directory: str | Path, config: PretrainedConfig) -> None:
    """Raise if the checkpoint's tensor names are not exactly the published layout for `config`."""
    expected = set(published_names(config))
    found = set(checkpoint_names(directory))
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - family_of(config).optional_tensors)
    if missing or unexpected:
        raise ValueError(
            f"{directory} is not in the published {config.model_type} layout for its config.json: "
            f"missing {len(missing)} tensors {missing[:4]}, unexpected {len(unexpected)} {unexpected[:4]}"
        )
