"""Load any supported masked-diffusion checkpoint as (model, tokenizer).

One entry point for the registered families (the built-in model, native LLaDA / Dream), other
dLLMs through their remote code (opt-in), and adapter-only LoRA checkpoints written by
`save_checkpoint`.

The class is chosen from config.json alone, read as data: a `model_type` or `architectures` entry
of a registered family with native code (dlrl.models.families) loads our own code even when the
checkpoint also ships modeling files (the published LLaDA and Dream repositories do, and their
code does not run under transformers 5); otherwise a config with an `auto_map` needs
`trust_remote_code` (off by default: it runs Python from the checkpoint), and anything else goes
through the registered Auto mappings. Native checkpoints load strictly: a missing or unexpected
tensor is an error, not a random init.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dlrl.models.families import Family, registered
from dlrl.models.lora import LoraSpec, apply_lora
from dlrl.models.published import check_checkpoint
from dlrl.models.shard_load import DeferredWeights, parameters_on_meta, standing_in

# Preferred Auto classes, best first. A masked-diffusion model is a masked LM; LLaDA's remote code
# maps AutoModel and AutoModelForCausalLM to the same LM class and Dream maps only AutoModel (its
# DreamModel carries the LM head), so whichever comes first in this order is the LM.
AUTO_CLASSES = (
    ("AutoModelForMaskedLM", AutoModelForMaskedLM),
    ("AutoModelForCausalLM", AutoModelForCausalLM),
    ("AutoModel", AutoModel),
)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,  # JobSpec allows float64 master weights
}

ADAPTER_CONFIG = "adapter_config.json"
BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
"""Shipped checkpoints (`builtin:<name>` -> dlrl/assets/<name>), built by scripts/ in this repo."""


class CheckpointNotFoundError(OSError):
    """A model name is neither a loadable local directory nor a reachable hub repository."""


class RemoteCodeRequiredError(ValueError):
    """The checkpoint's family has no native code and remote code was not allowed."""


def native_family(config: dict) -> Family | None:
    """The family with native code for a config.json dict (by model_type, then architectures), or None."""
    family = registered(config)
    return family if family is not None and family.native else None


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """torch dtype from a dtype or its name ("bfloat16", "bf16", ...); "auto" passes through."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.").lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'") from None


def auto_class_for(config: PretrainedConfig) -> type:
    """The Auto class that builds the LM for `config`: from `auto_map` if any, else the registry."""
    auto_map = getattr(config, "auto_map", None) or {}
    for name, auto_cls in AUTO_CLASSES:
        if name in auto_map:
            return auto_cls
    for _, auto_cls in AUTO_CLASSES:
        if type(config) in auto_cls._model_mapping:
            return auto_cls
    raise ValueError(f"no Auto model class knows config type {type(config).__name__}")


def resolve_model_path(name: str) -> str:
    """`builtin:<name>` -> the shipped asset directory; anything else unchanged."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    path = ASSETS / name.removeprefix(BUILTIN_PREFIX)
    if not path.is_dir():
        known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.is_dir() else []
        raise CheckpointNotFoundError(f"no built-in model {name!r}; built-in models: {known}")
    return str(path)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _not_found(name: str, exc: Exception | None = None) -> CheckpointNotFoundError:
    if _looks_local(name):
        return CheckpointNotFoundError(f"no model checkpoint at local path {name!r}: check the path")
    return CheckpointNotFoundError(
        f"could not load {name!r}: it is not a local directory and the Hugging Face Hub did not "
        f"serve it (no network, HF_HUB_OFFLINE set, or a wrong repo id) — check the path or id, "
        f"or download the checkpoint first ({type(exc).__name__}: {exc})"
    )


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    lora: LoraSpec | None = None,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """Load a checkpoint (local dir or hub id) onto `device` in `dtype`; returns (model, tokenizer).

    An adapter-only directory (with adapter_config.json) loads its base model from
    `base_model_name_or_path` and applies the adapter with its weights trainable, so a learner can
    resume from it. `lora` wraps a full model with fresh adapters. The model is returned in the
    mode from_pretrained left it in (the caller decides train/eval). The tokenizer pads on the
    left: prompts are left-padded so that every row's completion starts at the same column.
    """
    name = resolve_model_path(str(name_or_path))
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise _not_found(name)
        name = str(path.resolve())  # absolute, so an adapter saved later points at it from anywhere
        if (path / ADAPTER_CONFIG).is_file():
            return _load_adapter(path.resolve(), dtype=dtype, device=device,
                                 trust_remote_code=trust_remote_code, lora=lora)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name)  # JSON only: runs no code
    except (OSError, HFValidationError) as exc:
        raise _not_found(name, exc) from exc
    family = native_family(config_dict)
    if family is not None:
        model = _load_native(name, family, dtype)
    else:
        if config_dict.get("auto_map") and not trust_remote_code:
            raise RemoteCodeRequiredError(
                f"{name} (model_type {config_dict.get('model_type')!r}) has no native dlrl code and "
                f"ships its own modeling code; set model.trust_remote_code = true in the job spec "
                f"(trust_remote_code=True) to run it, if you trust that repository"
            )
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = auto_class_for(config).from_pretrained(
            name, config=config, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
        )
    model = model.to(device)
    tokenizer = _load_tokenizer(name, trust_remote_code, native=family is not None)
    tokenizer.padding_side = "left"
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def _load_tokenizer(name: str, trust_remote_code: bool, *, native: bool) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer. A native family whose tokenizer_config names a remote tokenizer
    class (Dream ships tokenization_dream.py, a Qwen2 BPE tokenizer) gets the plain fast tokenizer
    from its tokenizer.json instead of running that code."""
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if not native or trust_remote_code:
            raise
        try:
            return PreTrainedTokenizerFast.from_pretrained(name)
        except (OSError, ValueError):
            raise exc from None


def _load_native(name: str, family: Family, dtype: torch.dtype | str) -> PreTrainedModel:
    """A native family's model, strictly: every published tensor present, nothing unknown."""
    config = family.config_class.from_pretrained(name)
    if Path(name).is_dir():
        check_checkpoint(name, config)  # the explicit published name map, before any weight is read
    model, info = family.model_class.from_pretrained(
        name, config=config, dtype=resolve_dtype(dtype), output_loading_info=True
    )
    unexpected = set(info["unexpected_keys"]) - family.optional_tensors
    if info["missing_keys"] or unexpected:
        raise ValueError(f"{name} does not match the native {family.name} model: missing "
                         f"{sorted(info['missing_keys'])[:4]}, unexpected {sorted(unexpected)[:4]}")
    return model


def _adapter_base(path: Path, lora: LoraSpec | None) -> str:
    """The base model an adapter-only checkpoint names."""
    if lora is not None:
        raise ValueError(f"{path} already holds a LoRA adapter; load it without `lora=`")
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def _with_adapter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                  trust_remote_code: bool) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The adapter at `path` on `model`, trainable, and the tokenizer saved beside it if any."""
    model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        tokenizer.padding_side = "left"
    return model, tokenizer


def _load_adapter(
    path: Path, *, dtype: torch.dtype | str, device: str | torch.device, trust_remote_code: bool,
    lora: LoraSpec | None,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    base = _adapter_base(path, lora)
    model, tokenizer = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return _with_adapter(model, tokenizer, path, trust_remote_code)


def load_empty_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    lora: LoraSpec | None = None,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase, DeferredWeights | None]:
    """`load_model` for a rank of a sharded learner group: (model, tokenizer, deferred weights).

    The model of a native family comes back empty: its parameters on the meta device (buffers and
    LoRA adapters real, on the CPU), checked against the checkpoint's tensor names as `load_model`
    checks them. Shard it, then `deferred.load(model, device)` reads only this rank's shards
    (dlrl.models.shard_load). Everything else `load_model` does is the same: the tokenizer, eval
    mode, `lora`, an adapter-only checkpoint over its base. A family without native code (remote
    code, or a plain transformers class) runs its own `__init__` and loading, which this cannot
    see into: it is loaded whole onto `device`, as by `load_model`, and `deferred` is None.
    """
    name = resolve_model_path(str(name_or_path))
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise _not_found(name)
        name = str(path.resolve())
        if (path / ADAPTER_CONFIG).is_file():
            base = _adapter_base(path.resolve(), lora)
            model, tokenizer, deferred = load_empty_model(base, dtype=dtype, device=device,
                                                          trust_remote_code=trust_remote_code)
            with standing_in(model):
                model, tokenizer = _with_adapter(model, tokenizer, path.resolve(), trust_remote_code)
            return model, tokenizer, deferred
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name)  # JSON only: runs no code
    except (OSError, HFValidationError) as exc:
        raise _not_found(name, exc) from exc
    family = native_family(config_dict)
    if family is None:
        model, tokenizer = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                      lora=lora)
        return model, tokenizer, None
    directory = name if Path(name).is_dir() else _download(name)
    model, deferred = _empty_native(name, directory, family, resolve_dtype(dtype))
    tokenizer = _load_tokenizer(name, trust_remote_code, native=True)
    tokenizer.padding_side = "left"
    if lora is not None:
        with standing_in(model):
            model = apply_lora(model, lora)
    return model, tokenizer, deferred


def _download(repo_id: str) -> str:
    """A hub checkpoint's config and safetensors in the local cache (what `from_pretrained` fetches
    for a native model); the local folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except (OSError, HFValidationError) as exc:
        raise _not_found(repo_id, exc) from exc


def _empty_native(name: str, directory: str, family: Family,
                  dtype: torch.dtype | str) -> tuple[PreTrainedModel, DeferredWeights]:
    """A native family's model with meta parameters, as `_load_native` would build it (config,
    dtype, name, eval mode), and where each of its tensors is in the checkpoint."""
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"loading a sharded model needs a concrete dtype, got {dtype!r}")
    config = family.config_class.from_pretrained(directory)
    check_checkpoint(directory, config)  # the explicit published name map, before any weight is read
    config.name_or_path = name  # what a LoRA adapter saved later names as its base
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # buffers made in __init__ take it, as under from_pretrained
    try:
        with parameters_on_meta():
            model = family.model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.config.dtype = dtype  # as from_pretrained records it (a checkpoint saved later says so)
    model.eval()
    return model, DeferredWeights.of(model, directory, family.optional_tensors)
