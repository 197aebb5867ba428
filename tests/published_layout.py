"""A random-init checkpoint written as a hub repository lays it out, for the native loading tests.

Each family's test (test_native_models for LLaDA / Dream, test_sdar, test_llada2) checks that such
a folder loads natively, by name, without running its remote code: the published config.json's
fields (auto_map included) at the tiny model's sizes, a modeling file that raises if it is ever
imported, the weights under the published names in one file or two shards with an index, and a
tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase


def write_published_layout(
    ckpt: Path, published: dict, native: nn.Module, modeling_file: str, tokenizer: PreTrainedTokenizerBase,
    *, shards: bool, **config_overrides,
) -> Path:
    """Write `native`'s weights into the new folder `ckpt`, under `published` config.json fields
    (those `native`'s config also has take its values; `config_overrides` last)."""
    ckpt.mkdir()
    config = dict(published)
    config.update({k: v for k, v in native.config.to_dict().items() if k in config and k != "auto_map"})
    config.update(config_overrides)
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / modeling_file).write_text("raise RuntimeError('remote code ran')\n")
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    if shards:
        names = sorted(state)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in part}, ckpt / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(ckpt)
    return ckpt
