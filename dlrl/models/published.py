"""The published checkpoints' parameter names, mapped explicitly onto the native modules.

`published_names(config)` lists every tensor a published LLaDA / Dream checkpoint holds for that
config (taken from the published modeling files' module trees) -> our parameter name. The
native modules keep the published tree, so the map is the identity today; it is still written
out, because it is what `check_checkpoint` compares a checkpoint against before loading:
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

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _llada_names(cfg: PretrainedConfig) -> dict[str, str]:
    # modeling_llada.py: LLaDAModelLM.model (LLaDAModel).transformer = {wte, blocks[i] (LLaDALlamaBlock),
    # ln_f, ff_out (absent when weight_tying)}; q/k/v biases iff include_bias | include_qkv_bias.
    qkv_bias = cfg.include_bias or cfg.include_qkv_bias
    norm_bias = cfg.include_bias if cfg.bias_for_layer_norm is None else cfg.bias_for_layer_norm
    linear = {"q_proj": qkv_bias, "k_proj": qkv_bias, "v_proj": qkv_bias, "attn_out": cfg.include_bias,
              "ff_proj": cfg.include_bias, "up_proj": cfg.include_bias, "ff_out": cfg.include_bias}
    norms = ("attn_norm", "ff_norm")
    names = {"model.transformer.wte.weight": "model.transformer.wte.weight"}
    for i in range(cfg.n_layers):
        block = f"model.transformer.blocks.{i}"
        for proj, bias in linear.items():
            names[f"{block}.{proj}.weight"] = f"{block}.{proj}.weight"
            if bias:
                names[f"{block}.{proj}.bias"] = f"{block}.{proj}.bias"
        for norm in norms:
            if cfg.layer_norm_with_affine:
                names[f"{block}.{norm}.weight"] = f"{block}.{norm}.weight"
                if norm_bias:
                    names[f"{block}.{norm}.bias"] = f"{block}.{norm}.bias"
    if cfg.layer_norm_with_affine:
        names["model.transformer.ln_f.weight"] = "model.transformer.ln_f.weight"
        if norm_bias:
            names["model.transformer.ln_f.bias"] = "model.transformer.ln_f.bias"
    if not cfg.weight_tying:
        names["model.transformer.ff_out.weight"] = "model.transformer.ff_out.weight"
        if cfg.include_bias:
            names["model.transformer.ff_out.bias"] = "model.transformer.ff_out.bias"
    return names


def _dream_names(cfg: PretrainedConfig) -> dict[str, str]:
    # modeling_dream.py: DreamModel = {model (DreamBaseModel: embed_tokens, layers[i] (DreamDecoderLayer),
    # norm), lm_head}; Qwen2 biases on q/k/v only.
    names = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight"}
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                names[f"{layer}.self_attn.{proj}.{kind}"] = f"{layer}.self_attn.{proj}.{kind}"
        names[f"{layer}.self_attn.o_proj.weight"] = f"{layer}.self_attn.o_proj.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{layer}.mlp.{proj}.weight"] = f"{layer}.mlp.{proj}.weight"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{layer}.{norm}.weight"] = f"{layer}.{norm}.weight"
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


NAME_MAPS = {"llada": _llada_names, "Dream": _dream_names}
"""model_type -> config -> {published tensor name: native parameter name}."""

OPTIONAL = {"Dream": {"lm_head.weight"}}
"""Published tensors a checkpoint may carry even when the config ties them (dropped on load)."""


def published_names(config: PretrainedConfig) -> dict[str, str]:
    """Every tensor name of the published layout for `config` -> the native parameter name."""
    try:
        return NAME_MAPS[config.model_type](config)
    except KeyError:
        raise ValueError(f"no published name map for model_type {config.model_type!r}") from None


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
    unexpected = sorted(found - expected - OPTIONAL.get(config.model_type, set()))
    if missing or unexpected:
        raise ValueError(
            f"{directory} is not in the published {config.model_type} layout for its config.json: "
            f"missing {len(missing)} tensors {missing[:4]}, unexpected {len(unexpected)} {unexpected[:4]}"
        )
